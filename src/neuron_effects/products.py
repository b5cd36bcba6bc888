"""Split-bf16 products: float32-accurate ``W x`` from bf16 products with float32 accumulation.

A float32 number has a 24-bit significand, a bf16 number an 8-bit one with the same exponent
range. Rounding to nearest and subtracting, ``x = x1 + x2 + x3`` exactly, each ``x_i`` a bf16
tensor (``x1 = bf16(x)``, ``x2 = bf16(x - x1)``, ``x3 = x - x1 - x2``; every difference is exact
in float32). For a weight ``W`` that is exactly bf16 (Llama's published weights are):

    W x = W x3 + W x2 + W x1        (sum in float32, smallest part first)

Each ``W x_i`` is a bf16 x bf16 product whose elementwise products are exact in float32 (8 + 8
significant bits), accumulated in float32: float32-accurate with three bf16 products. Two parts
keep 16 bits of ``x`` (relative error <= 2^-17), one part is plain bf16. A weight that is not
exactly bf16 is split too (``W = Σ_j W_j``, as many parts as ``x``), and every ``W_j x_i`` is
summed.

Where it runs (``compute.products: split_bf16``): the downstream replay's linear layers (q, k, v
and o projections, gate, up and down projections; :func:`use_products` swaps each for a
:class:`SplitBf16Linear` holding only the bf16 weights) and the float32 readout against the
unembedding (:class:`SplitWeight`, used by :class:`neuron_effects.direct.Readout`). Norms,
softmax, SiLU and RoPE stay float32.

On CUDA each part product is ``torch.mm(a, b, out_dtype=torch.float32)`` (tensor cores, float32
output and accumulation; reduced-precision bf16 reductions are switched off); the parts of ``x``
are stacked into one product per weight part. The CPU has no such kernel: there the bf16 parts
are upcast (exactly) and multiplied in float32, the same mathematical product, not faster.
"""

from __future__ import annotations

import torch
from torch import nn

PRODUCTS = ("float32", "split_bf16")
SPLIT_PARTS = (2, 3)
REPLAY_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def split_bf16(x: torch.Tensor, parts: int) -> torch.Tensor:
    """The bf16 parts of a float32 tensor, largest first: [parts, *x.shape] with
    ``x = Σ_i parts[i]`` exactly for ``parts = 3`` (up to bf16 underflow below ~1e-38), and the
    first ``parts`` terms of that sum otherwise."""
    pieces, rest = [], x.float()
    for _ in range(parts):
        piece = rest.to(torch.bfloat16)
        pieces.append(piece)
        rest = rest - piece.float()
    return torch.stack(pieces)


def is_bf16_exact(weight: torch.Tensor) -> bool:
    """Whether every entry of ``weight`` is a bf16 number."""
    return bool(torch.equal(weight.to(torch.bfloat16).to(weight.dtype), weight))


def bf16_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for bf16 matrices a [M, K], b [K, N], accumulated and returned in float32:
    tensor cores on CUDA, an exact upcast then a float32 product on the CPU."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class SplitWeight:
    """A weight [out, in] kept as bf16 parts (one when it is exactly bf16) and its products
    ``x Wᵀ`` with float32 inputs split into ``parts`` bf16 parts."""

    def __init__(self, weight: torch.Tensor, parts: int):
        if parts not in SPLIT_PARTS:
            raise ValueError(f"split_parts must be one of {SPLIT_PARTS}, got {parts}")
        weight = weight.detach()
        self.parts = parts
        self.exact = is_bf16_exact(weight)
        self.weight_parts = split_bf16(weight, 1 if self.exact else parts)  # [q, out, in]
        self.shape = tuple(weight.shape)

    def float(self) -> torch.Tensor:
        """The weight in float32 (Σ of its parts; exact for an exactly-bf16 weight)."""
        parts = self.weight_parts.float()
        return parts[0] if self.exact else parts.flip(0).sum(0)

    def product_t(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ`` for x [..., in] (any float dtype) -> [..., out] float32: Σ over the parts
        of x and of W of the bf16 products, smallest first."""
        flat = x.reshape(-1, x.shape[-1])
        pieces = split_bf16(flat, self.parts)  # [p, rows, in]
        stacked = pieces.reshape(-1, flat.shape[-1])
        total = None
        for weight in self.weight_parts.flip(0):
            products = bf16_product(stacked, weight.T).view(self.parts, len(flat), -1)
            for part in products.flip(0):
                total = part if total is None else total + part
        return total.reshape(*x.shape[:-1], self.shape[0])


class SplitBf16Linear(nn.Module):
    """A bias-free ``nn.Linear`` whose product is a :class:`SplitWeight` product. Keeps only the
    bf16 weight parts; ``weight`` gives the float32 weight (the mediation split and the neurons'
    output directions read it), ``in_features``/``out_features`` as ``nn.Linear``."""

    def __init__(self, linear: nn.Linear, parts: int):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("split_bf16 products support bias-free linear layers only")
        self.split = SplitWeight(linear.weight, parts)
        self.out_features, self.in_features = self.split.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.split.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.split.product_t(x).to(x.dtype)


def use_products(model, products: str, parts: int = 3) -> None:
    """Make ``model`` (a float32 :class:`neuron_effects.model.LlamaFamily`) compute with
    ``products``: for ``split_bf16``, every replayed linear layer of every decoder layer becomes a
    :class:`SplitBf16Linear` (its float32 weight is dropped) and the readout's unembedding is held
    as a :class:`SplitWeight` (``model.split_unembedding``). ``float32`` changes nothing."""
    if products not in PRODUCTS:
        raise ValueError(f"unknown products {products!r} (use {', '.join(PRODUCTS)})")
    if products == "float32":
        return
    if model.dtype != torch.float32:
        raise ValueError(f"split_bf16 products need a float32 model, not {model.dtype}")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    for block in model.layers:
        for name in REPLAY_LINEARS:
            owner_name, attribute = name.split(".")
            owner = getattr(block, owner_name)
            linear = getattr(owner, attribute)
            if not isinstance(linear, SplitBf16Linear):
                setattr(owner, attribute, SplitBf16Linear(linear, parts))
    model.split_unembedding = SplitWeight(model.lm_head.weight, parts)
