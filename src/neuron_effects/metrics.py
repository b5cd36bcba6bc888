"""Per-(prompt, neuron) metrics of the effect vectors on the last-position logits.

For each effect vector ``E`` (direct, indirect = total - direct, total; and, on the target rows
only, direct_frozen_norm and norm_mediated = direct - direct_frozen_norm):

* ``E[target]``: the effect on the target logit (column named after the effect);
* ``E[target] - E[distractor]`` when a distractor is given (``<effect>_logit_diff``);
* ``prob_change_<effect> = softmax(c + E)[target] - softmax(c)[target]``, ``c`` the clean logits
  (full-vocabulary metrics only);
* the ``k`` tokens with the largest ``|E|``, with the mean and max of their ``|E|``
  (``top_k_<effect>_{tokens,mean,max}``; full-vocabulary metrics only).

From the target-logit effects d (direct), i (indirect), t (total):

* ``direct_ratio = |d| / (|d| + |i|)``, NaN with ``ratio_defined = False`` when ``|d| + |i|`` is
  below the noise floor (NOT when t is near zero: that is cancellation, i.e. self-repair);
* ``cancellation = 1 - |t| / (|d| + |i|)`` (0: d and i add up, 1: they cancel exactly);
* ``sign_aligned = d * i > 0``;
* ``direct_ratio_frozen_norm``: the same ratio with d the frozen-norm direct effect and
  i = t - d_frozen (the norm-mediated part then counts as indirect).
"""

from __future__ import annotations

import numpy as np
import torch

FULL_VOCAB_EFFECTS = ("direct", "indirect", "total")


def ratio_columns(
    direct: np.ndarray, indirect: np.ndarray, total: np.ndarray, noise_floor: float, suffix: str = ""
) -> dict[str, np.ndarray]:
    """``direct_ratio``, ``cancellation``, ``sign_aligned``, ``ratio_defined`` (with ``suffix``)."""
    magnitude = np.abs(direct) + np.abs(indirect)
    defined = magnitude >= noise_floor
    safe = np.where(defined, magnitude, 1.0)
    return {
        f"direct_ratio{suffix}": np.where(defined, np.abs(direct) / safe, np.nan),
        f"cancellation{suffix}": np.where(defined, 1.0 - np.abs(total) / safe, np.nan),
        f"sign_aligned{suffix}": direct * indirect > 0,
        f"ratio_defined{suffix}": defined,
    }


TOP_K_BLOCK = 64  # columns per block in top_k_columns


def top_k_columns(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``values.topk(k, dim=-1)`` of rows [B, n] (values, column indices), ranking only k blocks
    of 64 columns per row: the k largest entries of a row lie in the k blocks of largest
    maximum (a block holding one of them has a maximum at least the k-th largest value, and at
    most k blocks do). The values are exactly topk's; on exact ties the columns may be other
    tied ones. A plain topk when n is not a multiple of 64 or has fewer than 4k blocks."""
    rows, width = values.shape
    if width % TOP_K_BLOCK or width // TOP_K_BLOCK < 4 * k:
        return values.topk(k, dim=-1)
    blocks = values.view(rows, -1, TOP_K_BLOCK)
    chosen = blocks.amax(dim=-1).topk(k, dim=-1).indices  # [B, k] block numbers
    candidates = blocks.gather(1, chosen[:, :, None].expand(-1, -1, TOP_K_BLOCK))
    top, position = candidates.reshape(rows, -1).topk(k, dim=-1)
    columns = chosen.gather(1, position // TOP_K_BLOCK) * TOP_K_BLOCK + position % TOP_K_BLOCK
    return top, columns


def _to_host(tensors: dict[str, torch.Tensor], rows: int) -> dict[str, np.ndarray]:
    """Copy [rows] and [rows, k] device tensors to the host as float64 arrays in one transfer
    (one stacked tensor, one ``.cpu()``): on CUDA each copy is a blocking synchronisation."""
    flat = [tensor.reshape(rows, -1).double() for tensor in tensors.values()]
    stacked = torch.cat(flat, dim=1).cpu().numpy()
    host, start = {}, 0
    for (name, tensor), part in zip(tensors.items(), flat):
        width = part.shape[1]
        host[name] = stacked[:, start:start + width].reshape(rows, *tensor.shape[1:])
        start += width
    return host


def effect_metrics(
    direct: torch.Tensor, direct_frozen_norm: torch.Tensor, total: torch.Tensor,
    clean_logits: torch.Tensor, target_column: int, distractor_column: int | None,
    full_vocab: bool, top_k: int, noise_floor: float,
) -> dict[str, np.ndarray]:
    """All metric columns for B rows of effect vectors [B, vocab rows] (float32).

    ``*_column`` index the vocabulary rows that ``direct`` and ``total`` cover (the token id
    itself when they cover the whole vocabulary). ``direct_frozen_norm`` covers only the target
    row and, if there is one, the distractor row ([B, 1 or 2]): its only metrics. ``full_vocab``
    enables probability changes and top-k.
    """
    vectors = {"direct": direct, "total": total, "indirect": total - direct,
               "direct_frozen_norm": direct_frozen_norm}
    rows = direct.shape[0]
    # Every per-row value is gathered on the device and copied to the host in ONE transfer.
    on_device: dict[str, torch.Tensor] = {}
    for measured in ("direct", "total", "direct_frozen_norm"):
        target, distractor = ((0, 1) if measured == "direct_frozen_norm"
                              else (target_column, distractor_column))
        on_device[measured] = vectors[measured][:, target]
        if distractor_column is not None:
            on_device[f"{measured}@distractor"] = vectors[measured][:, distractor]
    if full_vocab:
        clean_max = clean_logits.max()
        clean_shifted = clean_logits - clean_max
        clean_prob = (clean_shifted[target_column] - torch.logsumexp(clean_shifted, -1)).exp()
        work = torch.empty_like(total)  # one [B, vocab] buffer for every effect's passes
        for name in FULL_VOCAB_EFFECTS:
            vector = vectors[name]
            # c + E - max(c): log-sum-exp without a max pass
            shifted = torch.add(vector, clean_shifted, out=work)
            at_target = shifted[:, target_column].clone()
            log_norm = shifted.exp_().sum(dim=-1).log()
            unsafe = ~torch.isfinite(log_norm) | (log_norm < -80)
            if bool(unsafe.any()):  # |E| large enough to over/underflow: the careful way
                log_norm[unsafe] = torch.logsumexp(vector[unsafe] + clean_shifted, dim=-1)
            on_device[f"prob_change_{name}"] = (at_target - log_norm).exp() - clean_prob
            magnitude = torch.abs(vector, out=work)  # shifted is dead
            values, tokens = top_k_columns(magnitude, min(top_k, vector.shape[1]))
            on_device[f"top_k_{name}_mean"] = values.mean(dim=-1)
            on_device[f"top_k_{name}_max"] = values[:, 0]
            on_device[f"top_k_{name}_tokens"] = tokens  # ids < 2^53: exact in float64
    host = _to_host(on_device, rows)
    columns: dict[str, np.ndarray] = {}
    # Scalars: the measured ones from the float32 vectors, the derived ones as float64
    # differences of those, so total = direct_frozen_norm + norm_mediated + indirect exactly.
    for measured in ("direct", "total", "direct_frozen_norm"):
        columns[measured] = host[measured]
        columns[f"{measured}_logit_diff"] = (
            np.full(rows, np.nan) if distractor_column is None
            else host[measured] - host[f"{measured}@distractor"])
    for suffix in ("", "_logit_diff"):
        columns[f"indirect{suffix}"] = columns[f"total{suffix}"] - columns[f"direct{suffix}"]
        columns[f"norm_mediated{suffix}"] = (columns[f"direct{suffix}"]
                                             - columns[f"direct_frozen_norm{suffix}"])
    for name in FULL_VOCAB_EFFECTS:
        for column in (f"prob_change_{name}", f"top_k_{name}_mean", f"top_k_{name}_max"):
            columns[column] = host[column] if full_vocab else np.full(rows, np.nan)
        columns[f"top_k_{name}_tokens"] = (host[f"top_k_{name}_tokens"].astype(np.int64)
                                           if full_vocab else np.empty((rows, 0), dtype=np.int64))
    columns.update(ratio_columns(columns["direct"], columns["indirect"], columns["total"],
                                 noise_floor))
    frozen = columns["direct_frozen_norm"]
    frozen_ratio = ratio_columns(frozen, columns["total"] - frozen, columns["total"], noise_floor,
                                 suffix="_frozen_norm")
    columns["direct_ratio_frozen_norm"] = frozen_ratio["direct_ratio_frozen_norm"]
    return columns
