"""The model adapter: loading a Llama-family causal LM and reaching the tensors the math needs.

Hook points and tensors, for decoder layer ``L`` of ``model.model.layers``:

* neuron ``n``'s activation ``a`` is entry ``n`` of the INPUT of ``layers[L].mlp.down_proj``
  (``act_fn(gate_proj(x)) * up_proj(x)``);
* its output direction is the column ``w_n = layers[L].mlp.down_proj.weight[:, n]``;
* the residual stream after layer ``L`` is the output of ``layers[L]``;
* ``model.model.norm`` is the final RMSNorm (``g * h / sqrt(mean(h^2) + eps)``) and ``lm_head``
  the unembedding (tied to the input embedding or not).

Supported: Llama 2/3.x, Mistral, Qwen2, Qwen3 and SmolLM2 (``model_type`` llama, mistral, qwen2,
qwen3), from a Hugging Face id, a local folder or a ``.gguf`` file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .inputs import InputError, Neuron, model_location
from .torch_builds import CudaUnusableError, cuda_unusable_message, nvidia_driver

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from and how to run it (``dtype: auto`` = float32 on every device)."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` where CUDA is unusable is an error
    naming torch's CUDA version, the driver's and the fix (:func:`cuda_unusable_message`)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CudaUnusableError(cuda_unusable_message(device, torch.__version__, torch.version.cuda,
                                               *nvidia_driver()))
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    """``auto`` -> float32 on every device. bfloat16/float16 are explicit choices only: they
    round single-neuron effects away (:func:`neuron_effects.precision.low_precision_warning`)."""
    if dtype == "auto":
        return torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load_config(spec: ModelSpec) -> Any:
    """The model's ``PretrainedConfig``, read without loading weights; checks the architecture."""
    from transformers import AutoConfig

    location, extra = model_location(spec.model)
    try:
        config = AutoConfig.from_pretrained(
            location, trust_remote_code=spec.trust_remote_code, **extra
        )
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read the model config of {spec.model}: {error}") from error
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"unsupported architecture {config.model_type!r} "
            f"({', '.join(getattr(config, 'architectures', None) or ['?'])}) in {spec.model}: "
            f"supported model types are {', '.join(SUPPORTED_MODEL_TYPES)} (decoder layers with "
            "mlp.down_proj, a final RMSNorm model.norm and lm_head)"
        )
    return config


def sliding_window(config: Any, layer: int) -> int | None:
    """The attention window of ``layer`` if it is a sliding-window layer, else None."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer] != "sliding_attention":
        return None
    return int(window)


def check_prompt_length(config: Any, n_tokens: int, where: str) -> None:
    """Prompts longer than the context, or than a sliding attention window, are rejected."""
    context = int(getattr(config, "max_position_embeddings", 1 << 30))
    if n_tokens > context:
        raise InputError(f"{where}: {n_tokens} tokens exceed the model's context of {context}")
    for layer in range(int(config.num_hidden_layers)):
        window = sliding_window(config, layer)
        if window is not None and n_tokens > window:
            raise InputError(
                f"{where}: {n_tokens} tokens exceed the sliding attention window ({window}) of "
                f"layer {layer}, which this tool does not model"
            )


def check_neurons(config: Any, neurons: Sequence[Neuron], source: str) -> None:
    """Every neuron's layer and index must exist in the model described by ``config``."""
    n_layers, intermediate = int(config.num_hidden_layers), int(config.intermediate_size)
    for neuron in neurons:
        if neuron.layer >= n_layers:
            raise InputError(
                f"{source}: neuron {neuron.neuron_id}: layer {neuron.layer} out of range "
                f"(the model has {n_layers} layers, 0..{n_layers - 1})"
            )
        if neuron.neuron >= intermediate:
            raise InputError(
                f"{source}: neuron {neuron.neuron_id}: index {neuron.neuron} >= the "
                f"intermediate size {intermediate}"
            )


def load_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer of ``spec.tokenizer`` or, by default, of the model."""
    from transformers import AutoTokenizer

    location, extra = model_location(spec.tokenizer or spec.model)
    try:
        return AutoTokenizer.from_pretrained(
            location, trust_remote_code=spec.trust_remote_code, **extra
        )
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load the tokenizer of {spec.model}: {error}") from error


def set_precision_flags() -> None:
    """Full-precision float32 products everywhere: TF32 off for CUDA matmuls and cuDNN,
    ``torch.set_float32_matmul_precision("highest")`` (also for the CPU's matmuls)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def precision_flags() -> dict[str, Any]:
    """The precision flags in force (for the validation summary): TF32 and the reduced-precision
    reductions that bf16/fp16 matmuls may use on CUDA."""
    matmul = torch.backends.cuda.matmul
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": bool(matmul.allow_tf32),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cuda_matmul_allow_bf16_reduced_precision_reduction":
            bool(matmul.allow_bf16_reduced_precision_reduction),
        "cuda_matmul_allow_fp16_reduced_precision_reduction":
            bool(matmul.allow_fp16_reduced_precision_reduction),
    }


def parameter_sizes(spec: ModelSpec) -> tuple[int, int]:
    """Number of parameters of ``spec``'s model and the size of its largest parameter tensor,
    from its config (on the meta device: no weights are read or allocated)."""
    from transformers import AutoModelForCausalLM

    config = load_config(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    sizes = [parameter.numel() for parameter in model.parameters()]
    return sum(sizes), max(sizes)


def load_model(spec: ModelSpec, compute_dtype: torch.dtype | None = None) -> "LlamaFamily":
    """Load the weights onto ``spec``'s device in ``spec``'s dtype and wrap them in the adapter.

    ``from_pretrained`` sets the dtype of the parameters only (the rotary ``inv_freq`` buffers
    stay float32, as published) and, through ``device_map``, streams the weights straight onto
    the device: host memory never holds the whole model. TF32 is switched off
    (:func:`set_precision_flags`).

    ``compute_dtype`` (the validation's reference path): load in this wider dtype instead, then
    round every parameter to ``spec``'s dtype and back, so that the model has exactly the run's
    rounded weights but computes at the higher precision.
    """
    from transformers import AutoModelForCausalLM

    config = load_config(spec)
    device = resolve_device(spec.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    weights_dtype = resolve_dtype(spec.dtype)
    set_precision_flags()
    location, extra = model_location(spec.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, config=config, dtype=compute_dtype or weights_dtype,
            device_map={"": str(device)}, trust_remote_code=spec.trust_remote_code, **extra
        )
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load the model {spec.model}: {error}") from error
    if compute_dtype is not None and compute_dtype != weights_dtype:
        round_parameters(model, weights_dtype)
    return LlamaFamily(model)


@torch.no_grad()
def round_parameters(module: nn.Module, dtype: torch.dtype) -> None:
    """Round every parameter of ``module`` to ``dtype`` and back, in place (same dtype after)."""
    for parameter in module.parameters():
        parameter.copy_(parameter.to(dtype))


@torch.no_grad()
def cast_parameters(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the parameters (not the buffers: the rotary ``inv_freq`` stays float32) of
    ``module`` to ``dtype`` in place, as ``from_pretrained(dtype=...)`` does; returns it."""
    for parameter in module.parameters():
        parameter.data = parameter.data.to(dtype)
    return module


def _float64_rms_norm(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """``g * h / sqrt(mean(h^2) + eps)`` in float64 (transformers' RMSNorm rounds through
    float32 whatever the model dtype)."""
    hidden = args[0]
    eps = getattr(module, "variance_epsilon", None) or module.eps
    return module.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps))


class LlamaFamily:
    """Accessors for a loaded Llama-family ``...ForCausalLM``; raises a clear error otherwise.

    Puts the model in eval mode without gradients (everything here is inference). A float64
    model gets its RMSNorms recomputed in float64 by forward hooks (transformers computes them in
    float32); its RoPE angles stay float32, as transformers computes them for every dtype."""

    def __init__(self, model: nn.Module):
        model.eval()
        model.requires_grad_(False)
        self.causal_lm = model
        self.config = model.config
        missing = [
            name
            for name, ok in (
                ("model.model.layers", hasattr(getattr(model, "model", None), "layers")),
                ("model.model.norm", hasattr(getattr(model, "model", None), "norm")),
                ("model.model.rotary_emb", hasattr(getattr(model, "model", None), "rotary_emb")),
                ("model.lm_head", isinstance(getattr(model, "lm_head", None), nn.Linear)),
            )
            if not ok
        ]
        if not missing:
            for part in ("mlp.down_proj", "self_attn.q_proj", "self_attn.k_proj",
                         "self_attn.v_proj", "self_attn.o_proj", "input_layernorm",
                         "post_attention_layernorm"):
                module = model.model.layers[0]
                for attribute in part.split("."):
                    module = getattr(module, attribute, None)
                if module is None:
                    missing.append(f"model.model.layers[i].{part}")
        if missing or self.config.model_type not in SUPPORTED_MODEL_TYPES:
            raise InputError(
                f"unsupported architecture {self.config.model_type!r} "
                f"({type(model).__name__}): missing {', '.join(missing) or 'nothing'}; supported "
                f"model types are {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model.lm_head.bias is not None:
            raise InputError(f"unsupported architecture {type(model).__name__}: lm_head has a bias")
        self.layers: Sequence[nn.Module] = model.model.layers
        self.final_norm: nn.Module = model.model.norm
        self.lm_head: nn.Linear = model.lm_head
        self.rotary_emb: nn.Module = model.model.rotary_emb
        self.n_layers = len(self.layers)
        self.hidden_size = int(self.config.hidden_size)
        self.intermediate_size = int(self.layers[0].mlp.down_proj.in_features)
        self.vocab_size = int(self.lm_head.out_features)
        self.device = self.lm_head.weight.device
        self.dtype = self.lm_head.weight.dtype
        # final norm, unembedding and effect differences: float32, or float64 in a float64 model
        self.readout_dtype = torch.promote_types(self.dtype, torch.float32)
        if self.dtype == torch.float64:
            for module in model.modules():
                if type(module).__name__.endswith("RMSNorm"):
                    module.register_forward_hook(_float64_rms_norm)
        attention = self.layers[0].self_attn
        self.head_dim = int(attention.head_dim)
        self.n_heads = int(attention.q_proj.out_features) // self.head_dim
        self.n_kv_heads = int(attention.k_proj.out_features) // self.head_dim
        self.apply_rotary: Callable = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self._readout: tuple[torch.Tensor, torch.Tensor, float] | None = None
        # compute.products: split_bf16 sets the unembedding's bf16 parts (products.use_products)
        self.split_unembedding: Any = None

    @property
    def name(self) -> str:
        return str(getattr(self.config, "_name_or_path", "") or type(self.causal_lm).__name__)

    def output_directions(self, layers: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        """``w_n = layers[L].mlp.down_proj.weight[:, n]`` for each (L, n) row: [B, hidden] in
        the readout dtype."""
        directions = torch.empty(len(layers), self.hidden_size, device=self.device,
                                 dtype=self.readout_dtype)
        for layer in torch.unique(layers).tolist():
            rows = (layers == layer).nonzero().squeeze(1)
            weight = self.layers[layer].mlp.down_proj.weight
            directions[rows] = weight[:, neurons[rows].to(weight.device)].T.to(self.readout_dtype)
        return directions

    def readout(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Copies in the readout dtype (float32; float64 for a float64 model) of the final norm
        weight ``g`` [hidden], the unembedding ``W_U`` [vocab, hidden] and the norm's epsilon,
        made once."""
        if self._readout is None:
            norm = self.final_norm
            eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
            if eps is None:
                raise InputError(f"unsupported final norm {type(norm).__name__}: no epsilon")
            self._readout = (
                norm.weight.detach().to(self.readout_dtype),
                self.lm_head.weight.detach().to(self.readout_dtype),
                float(eps),
            )
        return self._readout

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ``(cos, sin)`` for integer positions [T]: each [T, head_dim] in the model dtype."""
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary_emb(probe, positions.to(self.device)[None, :])
        return cos[0], sin[0]
