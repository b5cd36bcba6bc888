"""The slow, obviously-correct reference paths: full forwards of the unmodified model with hooks.

* TOTAL (the plan's method): one full forward per (neuron, prompt) with a forward hook on
  decoder layer ``L`` that adds ``V`` to its output (at the last position, or at every position
  with its own ``V_t``). Effect = its last-position logits - those of the same forward without
  the treatment.
* DIRECT, frozen downstream: one full forward in which every decoder layer ``l >= L`` has its
  output at the last position replaced by (clean output of layer ``l``) + ``V``, so that the
  final norm reads ``h_c + V``. Effect = its logits - the clean logits.
* DIRECT with the final-norm scale frozen: the same forward, read out with the clean
  ``r(h_c)`` instead of recomputing it.
* METRICS (:func:`plain_metrics`): every metric of a row from these effect vectors, with its own
  plain float64 code (softmax, a full sort for the top-k, differences).
* MEDIATION: the treated and the untreated full forward with hooks capturing, at the last
  position of every decoder layer, ``o_proj``'s input and output and ``down_proj``'s input and
  output, and the final norm's input; each layer's, head's and neuron's contribution is its
  change read out along ``u`` with the clean scale (heads: ``o_proj`` applied to the head's slice
  of the change alone; neurons: the change of ``act_m`` times column m of ``down_proj``).
* EDGE ACTIVATION CHANGES: the treated and the untreated full forward with pre-hooks reading the
  input of each target layer's ``down_proj`` at the last position: ``Δa_t`` = the difference.

Logits are read out from the final norm's input ``h`` (last position) in float32 (float64 for a
float64 model: the readout dtype of :class:`~neuron_effects.model.LlamaFamily`), as the
definitions ask: ``lm_head.weight @ (g * h) / sqrt(mean(h^2) + eps)``.

Nothing here is used by the fast path; tests and the workflow's validation rule compare them.
"""

from __future__ import annotations

import numpy as np
import torch

from .clean import CleanRun
from .model import LlamaFamily
from .treatments import add_to_residual


def _logits(
    model: LlamaFamily, input_ids: torch.Tensor, inverse_rms: torch.Tensor | None = None
) -> torch.Tensor:
    """One forward; the last position's logits [vocab] read out in the readout dtype from the
    final norm's input (with ``inverse_rms`` instead of ``1 / r(h)`` when given)."""
    captured = []
    handle = model.final_norm.register_forward_pre_hook(
        lambda module, args: captured.append(args[0][0, -1].to(model.readout_dtype)))
    try:
        model.causal_lm(input_ids=input_ids.reshape(1, -1).to(model.device), logits_to_keep=1)
    finally:
        handle.remove()
    return _readout(model, captured[0], inverse_rms)


def _readout(model: LlamaFamily, hidden: torch.Tensor,
             inverse_rms: torch.Tensor | None = None) -> torch.Tensor:
    """``W_U (g * h) / r(h)`` [vocab] of a final-norm input ``h`` [hidden] in the readout dtype
    (with ``inverse_rms`` in place of ``1 / r(h)`` when given)."""
    norm_weight, unembedding, eps = model.readout()
    hidden = hidden.to(model.readout_dtype)
    if inverse_rms is None:
        inverse_rms = torch.rsqrt(hidden.pow(2).mean() + eps)
    return unembedding @ (norm_weight * hidden) * inverse_rms


def _replace_output(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _adding_hook(vector: torch.Tensor):
    """A decoder-layer forward hook that adds ``vector`` to the layer's output: a [hidden]
    vector at the last position, or a [T, hidden] one at every position."""

    def treat(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        if vector.dim() == 1:
            hidden[:, -1] = add_to_residual(hidden[:, -1], vector.to(hidden.device))
        else:
            hidden[0] = add_to_residual(hidden[0], vector.to(hidden.device))
        return _replace_output(output, hidden)

    return treat


@torch.inference_mode()
def treated_logits(
    model: LlamaFamily, input_ids: torch.Tensor, layer: int, vector: torch.Tensor
) -> torch.Tensor:
    """Last-position logits [vocab] of one full forward in which a forward hook adds ``vector``
    to the output of decoder layer ``layer``: a [hidden] vector at the last position, or a
    [T, hidden] one at every position."""

    handle = model.layers[layer].register_forward_hook(_adding_hook(vector))
    try:
        return _logits(model, input_ids)
    finally:
        handle.remove()


@torch.inference_mode()
def reference_total(
    model: LlamaFamily, input_ids: torch.Tensor, layer: int, vector: torch.Tensor,
    clean_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Total effect [vocab]: :func:`treated_logits` minus the untreated forward's logits
    (``clean_logits``, from :func:`reference_clean_logits`, when given)."""
    if clean_logits is None:
        clean_logits = _logits(model, input_ids)
    return treated_logits(model, input_ids, layer, vector) - clean_logits


@torch.inference_mode()
def reference_direct(
    model: LlamaFamily, clean: CleanRun, layer: int, vector: torch.Tensor,
    freeze_norm: bool = False, clean_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Direct effect [vocab] of a last-position ``vector`` [hidden] added after layer ``layer``,
    with every downstream layer output frozen at its clean value (+ V): the final norm then
    reads the last layer's clean output + V, read out here in the readout dtype (a forward
    with the downstream layers frozen by hooks computes exactly this, at the cost of a whole
    forward; ``layer``, where V enters, therefore does not matter). ``freeze_norm`` also freezes
    the final norm's scale at its clean value. ``clean_logits``: as in
    :func:`reference_total`."""
    _, _, eps = model.readout()
    clean_inverse_rms = torch.rsqrt(clean.final_hidden.to(model.readout_dtype).pow(2).mean() + eps)
    frozen_final = add_to_residual(clean.layer_outputs[model.n_layers - 1], vector.to(model.device))
    direct_logits = _readout(model, frozen_final, clean_inverse_rms if freeze_norm else None)
    if clean_logits is None:
        clean_logits = _logits(model, clean.input_ids)
    return direct_logits - clean_logits


@torch.inference_mode()
def reference_clean_logits(model: LlamaFamily, input_ids: torch.Tensor) -> torch.Tensor:
    """The untreated forward's last-position logits [vocab], read out in the readout dtype."""
    return _logits(model, input_ids)


def _captured_components(model: LlamaFamily, input_ids: torch.Tensor, layer: int | None,
                         vector: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One full forward (treated after ``layer`` by ``vector`` as in :func:`treated_logits`, or
    untreated when ``layer`` is None) capturing at the last position, per decoder layer, the
    inputs and outputs of ``o_proj`` and ``down_proj`` ([n_layers, width], float32) and the
    final norm's input ``final`` [hidden]."""
    captured: dict[str, list[torch.Tensor]] = {"z": [], "attn": [], "act": [], "mlp": []}

    def capture(input_key: str, output_key: str):
        def hook(module, args, output):
            captured[input_key].append(args[0][0, -1].float())
            captured[output_key].append(output[0, -1].float())
        return hook

    handles = []
    for block in model.layers:
        handles.append(block.self_attn.o_proj.register_forward_hook(capture("z", "attn")))
        handles.append(block.mlp.down_proj.register_forward_hook(capture("act", "mlp")))
    final = []
    handles.append(model.final_norm.register_forward_pre_hook(
        lambda module, args: final.append(args[0][0, -1].float())))
    if layer is not None:
        handles.append(model.layers[layer].register_forward_hook(_adding_hook(vector)))
    try:
        model.causal_lm(input_ids=input_ids.reshape(1, -1).to(model.device), logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return {**{key: torch.stack(values) for key, values in captured.items()}, "final": final[0]}


@torch.inference_mode()
def reference_mediation(
    model: LlamaFamily, clean: CleanRun, layer: int, vector: torch.Tensor,
    direction: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The split of the effect of ``vector`` added after ``layer`` along the readout direction
    ``direction`` u [hidden] (e.g. ``g * W_U[target]``), from two hooked full forwards.

    Returns ``attn``, ``mlp`` [n_layers] (ΔA_l · u / r, ΔM_l · u / r), ``heads`` [n_layers,
    heads] (u · o_proj(Δz restricted to head h) / r), ``neurons`` [n_layers, intermediate]
    (Δact_m (w_m · u) / r), ``norm_term`` (u · h' (1/r' − 1/r)) and ``total`` (u · h'/r' −
    u · h/r); r, h: the clean scale and final hidden, r', h': the treated ones."""
    treated = _captured_components(model, clean.input_ids, layer, vector)
    untreated = _captured_components(model, clean.input_ids, None, None)
    _, _, eps = model.readout()
    u = direction.float()
    clean_inverse = torch.rsqrt(untreated["final"].pow(2).mean() + eps)
    treated_inverse = torch.rsqrt(treated["final"].pow(2).mean() + eps)
    delta = {key: treated[key] - untreated[key] for key in ("z", "attn", "act", "mlp")}
    heads = torch.zeros(model.n_layers, model.n_heads)
    neurons = torch.zeros(model.n_layers, model.intermediate_size)
    for downstream, block in enumerate(model.layers):
        weight = block.self_attn.o_proj.weight.float()
        for head in range(model.n_heads):
            alone = torch.zeros_like(delta["z"][downstream])
            part = slice(head * model.head_dim, (head + 1) * model.head_dim)
            alone[part] = delta["z"][downstream][part]
            heads[downstream, head] = (weight @ alone) @ u * clean_inverse
        columns = block.mlp.down_proj.weight.float()  # [hidden, intermediate]: w_m = column m
        neurons[downstream] = (u @ columns) * delta["act"][downstream] * clean_inverse
    return {
        "attn": delta["attn"] @ u * clean_inverse, "mlp": delta["mlp"] @ u * clean_inverse,
        "heads": heads, "neurons": neurons,
        "norm_term": treated["final"] @ u * (treated_inverse - clean_inverse),
        "total": treated["final"] @ u * treated_inverse - untreated["final"] @ u * clean_inverse,
    }


def reference_layer_gradients(
    model: LlamaFamily, input_ids: torch.Tensor, target_id: int
) -> torch.Tensor:
    """``d logit_target / d x_L`` [n_layers, T, hidden] (float32) for every decoder layer ``L``,
    by plain autograd: a forward hook adds a zero leaf ``delta_L`` [T, hidden] to each layer's
    output and the gradient of the target logit (read out as in :func:`_logits`) is taken with
    respect to the deltas."""
    length = int(torch.as_tensor(input_ids).numel())
    deltas = [torch.zeros(length, model.hidden_size, dtype=model.dtype, device=model.device,
                          requires_grad=True) for _ in range(model.n_layers)]

    def perturb(layer: int):
        def hook(module, args, output):
            return _replace_output(output, (output[0] if isinstance(output, tuple) else output)
                                   + deltas[layer][None])

        return hook

    handles = [block.register_forward_hook(perturb(layer))
               for layer, block in enumerate(model.layers)]
    try:
        with torch.enable_grad():
            logit = _logits(model, torch.as_tensor(input_ids))[target_id]
            gradients = torch.autograd.grad(logit, deltas)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([gradient.float() for gradient in gradients])


def _softmax(logits: np.ndarray) -> np.ndarray:
    """``exp(x - max x) / sum exp(x - max x)`` in float64."""
    exponentials = np.exp(logits - logits.max())
    return exponentials / exponentials.sum()


def plain_metrics(
    direct: np.ndarray, direct_frozen_norm: np.ndarray, total: np.ndarray,
    clean_logits: np.ndarray, target: int, distractor: int | None, full_vocab: bool, top_k: int,
    noise_floor: float,
) -> dict[str, object]:
    """Every metric of one (prompt, neuron) row from its effect vectors [vocab] (float64), by
    plain code of its own (not the fast path's :func:`neuron_effects.metrics.effect_metrics`):

    * ``E[target]``, ``E[target] - E[distractor]`` for E = direct, indirect = total - direct,
      total, direct_frozen_norm, norm_mediated = direct - direct_frozen_norm;
    * ``prob_change_E = softmax(c + E)[target] - softmax(c)[target]``;
    * ``top_k_E_tokens``: the k ids of largest ``|E|`` (a full stable sort), their mean and max;
    * ``direct_ratio = |d| / (|d| + |i|)``, ``cancellation = 1 - |t| / (|d| + |i|)`` (NaN below
      ``noise_floor``), ``sign_aligned = d * i > 0``, ``ratio_defined``, and
      ``direct_ratio_frozen_norm`` with d the frozen-norm direct effect and i = t - d."""
    effects = {"direct": direct, "indirect": total - direct, "total": total,
               "direct_frozen_norm": direct_frozen_norm,
               "norm_mediated": direct - direct_frozen_norm}
    values: dict[str, object] = {}
    for name, effect in effects.items():
        values[name] = float(effect[target])
        values[f"{name}_logit_diff"] = (np.nan if distractor is None
                                        else float(effect[target] - effect[distractor]))
    clean_probability = _softmax(clean_logits)[target]
    for name in ("direct", "indirect", "total"):
        effect = effects[name]
        if not full_vocab:
            values.update({f"prob_change_{name}": np.nan, f"top_k_{name}_mean": np.nan,
                           f"top_k_{name}_max": np.nan,
                           f"top_k_{name}_tokens": np.empty(0, dtype=np.int64)})
            continue
        values[f"prob_change_{name}"] = float(_softmax(clean_logits + effect)[target]
                                              - clean_probability)
        largest = np.argsort(-np.abs(effect), kind="stable")[:top_k]
        values[f"top_k_{name}_tokens"] = largest
        values[f"top_k_{name}_mean"] = float(np.abs(effect[largest]).mean())
        values[f"top_k_{name}_max"] = float(np.abs(effect[largest[0]]))
    for suffix, direct_part in (("", values["direct"]),
                                ("_frozen_norm", values["direct_frozen_norm"])):
        indirect_part = values["total"] - direct_part
        magnitude = abs(direct_part) + abs(indirect_part)
        defined = magnitude >= noise_floor
        values[f"direct_ratio{suffix}"] = abs(direct_part) / magnitude if defined else np.nan
        if not suffix:
            values["cancellation"] = 1.0 - abs(values["total"]) / magnitude if defined else np.nan
            values["sign_aligned"] = bool(direct_part * indirect_part > 0)
            values["ratio_defined"] = bool(defined)
    return values


@torch.inference_mode()
def reference_activation_changes(
    model: LlamaFamily, input_ids: torch.Tensor, layer: int, vector: torch.Tensor,
    targets: list[tuple[int, int]],
) -> list[float]:
    """``a_t(treated) - a_t(untreated)`` at the last position for each target ``(layer l,
    neuron m)`` (entry m of the input of ``layers[l].mlp.down_proj``), from two full forwards:
    with and without a hook adding ``vector`` to the output of decoder layer ``layer``
    ([hidden] at the last position, or [T, hidden] at every position)."""
    seen: dict[int, torch.Tensor] = {}

    def read(target_layer: int):
        def hook(module, args):
            seen[target_layer] = args[0][0, -1].double()

        return hook

    readers = [model.layers[target].mlp.down_proj.register_forward_pre_hook(read(target))
               for target in {target for target, _ in targets}]
    ids = torch.as_tensor(input_ids).reshape(1, -1).to(model.device)
    try:
        model.causal_lm(input_ids=ids, logits_to_keep=1)
        untreated = dict(seen)
        handle = model.layers[layer].register_forward_hook(_adding_hook(vector))
        try:
            model.causal_lm(input_ids=ids, logits_to_keep=1)
        finally:
            handle.remove()
    finally:
        for reader in readers:
            reader.remove()
    return [float(seen[target][neuron] - untreated[target][neuron])
            for target, neuron in targets]
