"""Targets the model does not predict: the clean run's rank of each given target, checked.

An effect on a token that the clean model ranks 4,600th says little about a neuron. After the
clean runs, a prompt whose GIVEN target has a clean rank (1 = the top prediction, the
``clean_target_rank`` of the clean records) above ``max_rank`` is listed in the job's log and
flagged (``target_low_rank``); with ``on_low_rank: stop`` the run stops there. Targets taken
from the clean argmax have rank 1 and are never flagged.
"""

from __future__ import annotations

from typing import Any, Sequence

from .inputs import InputError

ON_LOW_RANK = ("warn", "stop")


def is_low_rank(record: dict[str, Any], max_rank: int) -> bool:
    """Whether a clean record's given target ranks below the top ``max_rank`` tokens."""
    return record["target_source"] == "given" and int(record["clean_target_rank"]) > max_rank


def describe(record: dict[str, Any]) -> str:
    """One line naming the prompt, its target, the target's clean rank and probability, and the
    model's own top prediction."""
    return (f"prompt {record['prompt_id']!r}: target {record['target_token']!r} has clean rank "
            f"{int(record['clean_target_rank']):,} (probability {record['clean_target_prob']:.2g});"
            f" the model predicts {record['clean_top_token']!r} "
            f"(probability {record['clean_top_prob']:.2g})")


def check_target_ranks(
    records: Sequence[dict[str, Any]], max_rank: int, on_low_rank: str,
) -> list[str]:
    """The :func:`describe` lines of the records whose target is low-ranked (see the module
    docstring); raises :class:`InputError` listing them when ``on_low_rank`` is ``stop``."""
    if on_low_rank not in ON_LOW_RANK:
        raise InputError(f"targets.on_low_rank must be one of {', '.join(ON_LOW_RANK)}, "
                         f"got {on_low_rank!r}")
    lines = [describe(record) for record in records if is_low_rank(record, max_rank)]
    if lines and on_low_rank == "stop":
        raise InputError(
            f"{len(lines)} prompt(s) have a target ranked below the top {max_rank} by the clean "
            "model (targets.on_low_rank: stop):\n  " + "\n  ".join(lines) + "\nIn chat mode "
            "write targets without a leading space or set response_prefix (docs/running.md, Targets); "
            "or raise targets.max_rank, or set targets.on_low_rank: warn")
    return lines
