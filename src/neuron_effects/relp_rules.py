"""RelP's rule names and the config's estimate methods (``atp.methods``, ``atp.relp_rules``) by
name: read when the workflow is parsed, so no torch here. The rules themselves, as a modified
backward pass, are :mod:`neuron_effects.relp`'s; its docstring defines each one.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

RULES = ("ln", "identity", "half", "frozen_attention")
DEFAULT_RULES = ("ln", "identity", "half")
# Not a rule: the marker, in relp_unmasked's entry of :func:`method_rules`, of a forward pass
# without the causal mask (every position attends to every position).
UNMASKED = "unmasked"


def rule_set(rules: Iterable[str]) -> tuple[str, ...]:
    """A rule set in the canonical order of :data:`RULES`; unknown names raise ValueError."""
    rules = set(rules)
    unknown = sorted(rules - set(RULES))
    if unknown:
        raise ValueError(f"unknown RelP rules {unknown} (use {', '.join(RULES)})")
    return tuple(rule for rule in RULES if rule in rules)


def rule_sets(value: Sequence[Any]) -> list[tuple[str, ...]]:
    """The config's ``atp.relp_rules``: one rule set (a list of rule names) or a list of rule
    sets; duplicates dropped, order kept."""
    sets = [value] if all(isinstance(item, str) for item in value) else list(value)
    result: list[tuple[str, ...]] = []
    for item in sets:
        rules = rule_set([item] if isinstance(item, str) else item)
        if not rules:
            raise ValueError("an empty RelP rule set is the plain gradient: use method atp")
        if rules not in result:
            result.append(rules)
    return result


def method_name(rules: Sequence[str]) -> str:
    """``relp`` for :data:`DEFAULT_RULES`, else ``relp_<rule>_<rule>...`` (canonical order)."""
    rules = rule_set(rules)
    return "relp" if rules == DEFAULT_RULES else "relp_" + "_".join(rules)


def method_rules(methods: Sequence[str], relp_rules: Sequence[Any]) -> dict[str, tuple[str, ...]]:
    """The config's ``atp.methods`` and ``atp.relp_rules`` as estimate name -> RelP rules:
    ``atp`` -> () (the plain gradient), with ``relp`` one entry per rule set
    (:func:`method_name`), with ``relp_unmasked`` :data:`DEFAULT_RULES` and :data:`UNMASKED`
    (split by :func:`forward_rules`). The rules are a part of the cache keys."""
    result: dict[str, tuple[str, ...]] = {"atp": ()} if "atp" in methods else {}
    if "relp" in methods:
        result.update((method_name(rules), rules) for rules in rule_sets(relp_rules))
    if "relp_unmasked" in methods:
        result["relp_unmasked"] = (*DEFAULT_RULES, UNMASKED)
    return result


def forward_rules(rules: Sequence[str]) -> tuple[bool, tuple[str, ...]]:
    """A :func:`method_rules` entry as (causal: the forward keeps the causal mask, the rules)."""
    return UNMASKED not in rules, rule_set(rule for rule in rules if rule != UNMASKED)
