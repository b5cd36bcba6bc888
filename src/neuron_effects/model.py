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

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from and how to run it (``auto``: bf16 on CUDA, float32 on CPU)."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            f"device {device!r} requested but no CUDA GPU is available here "
            "(torch.cuda.is_available() is False); use device: cpu or auto"
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
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


def load_model(spec: ModelSpec) -> "LlamaFamily":
    """Load the weights (dtype and device from ``spec``) and wrap them in the adapter."""
    from transformers import AutoModelForCausalLM

    load_config(spec)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    location, extra = model_location(spec.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, trust_remote_code=spec.trust_remote_code, **extra
        )
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load the model {spec.model}: {error}") from error
    model.to(device=device, dtype=dtype)
    return LlamaFamily(model)


class LlamaFamily:
    """Accessors for a loaded Llama-family ``...ForCausalLM``; raises a clear error otherwise.

    Puts the model in eval mode without gradients (everything here is inference)."""

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
        attention = self.layers[0].self_attn
        self.head_dim = int(attention.head_dim)
        self.n_heads = int(attention.q_proj.out_features) // self.head_dim
        self.n_kv_heads = int(attention.k_proj.out_features) // self.head_dim
        self.apply_rotary: Callable = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self._readout: tuple[torch.Tensor, torch.Tensor, float] | None = None

    @property
    def name(self) -> str:
        return str(getattr(self.config, "_name_or_path", "") or type(self.causal_lm).__name__)

    def output_directions(self, layers: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        """``w_n = layers[L].mlp.down_proj.weight[:, n]`` for each (L, n) row: [B, hidden], f32."""
        directions = torch.empty(len(layers), self.hidden_size, device=self.device)
        for layer in torch.unique(layers).tolist():
            rows = (layers == layer).nonzero().squeeze(1)
            weight = self.layers[layer].mlp.down_proj.weight
            directions[rows] = weight[:, neurons[rows].to(weight.device)].T.float()
        return directions

    def readout(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Float32 copies of the final norm weight ``g`` [hidden], the unembedding ``W_U``
        [vocab, hidden] and the norm's epsilon, made once."""
        if self._readout is None:
            norm = self.final_norm
            eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
            if eps is None:
                raise InputError(f"unsupported final norm {type(norm).__name__}: no epsilon")
            self._readout = (
                norm.weight.detach().float(),
                self.lm_head.weight.detach().float(),
                float(eps),
            )
        return self._readout

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ``(cos, sin)`` for integer positions [T]: each [T, head_dim] in the model dtype."""
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary_emb(probe, positions.to(self.device)[None, :])
        return cos[0], sin[0]
