"""Turning prompt records into token ids, with targets and distractors resolved in context.

A target string is resolved IN CONTEXT: the text ``prompt + target`` is tokenized and the first
token after the prompt's own tokens is the target token (targets usually carry a leading space,
and " Fleming" is one token where "Fleming" alone is three). A target spanning several tokens
keeps its first one and records a warning. Without a target, the clean run's argmax is used
(resolved later, in the clean run). In chat mode the answer starts a new assistant turn, where
models begin without a space: a leading space there gets a warning, and ``response_prefix``
can put the start of an answer after the assistant header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .inputs import InputError, PromptRecord


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt ready for the model: ``input_ids`` (chat template applied if asked) and the
    target/distractor token ids (``None`` when not given)."""

    prompt_id: str
    text: str
    input_ids: list[int]
    target: str | None
    target_id: int | None
    distractor: str | None
    distractor_id: int | None
    warnings: list[str] = field(default_factory=list)


def model_text(
    tokenizer: Any, prompt: str, chat_template: bool, system_prompt: str | None,
    response_prefix: str = "",
) -> str:
    """The text the model reads: the prompt itself, or the chat-formatted user turn followed by
    the assistant generation prompt and ``response_prefix`` (e.g. ``"The answer is"``: the start
    of the answer, which the target then follows)."""
    if not chat_template:
        if response_prefix:
            raise InputError(f"response_prefix {response_prefix!r} is set but chat_template is "
                             "false: it follows the assistant header of a chat turn; in plain "
                             "mode end each prompt with that text instead")
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError("chat_template: true but the tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                         tokenize=False) + response_prefix


def _encode(tokenizer: Any, text: str, chat_template: bool) -> list[int]:
    # A chat template writes its own special tokens (BOS included); plain text gets the
    # tokenizer's usual ones (Llama 3 adds BOS, SmolLM2 adds none).
    return list(tokenizer(text, add_special_tokens=not chat_template)["input_ids"])


def _resolve(
    tokenizer: Any, text: str, prompt_ids: list[int], word: str, role: str,
    record: PromptRecord, chat_template: bool, warnings: list[str],
) -> int:
    where = f"prompt {record.prompt_id!r} (line {record.line})"
    full = _encode(tokenizer, text + word, chat_template)
    if full[: len(prompt_ids)] != prompt_ids:
        raise InputError(
            f"{where}: the {role} {word!r} merges with the prompt's last token when tokenized in "
            "context; end the prompt without a trailing space and start the "
            f"{role} with one (e.g. ' {word.strip()}')"
        )
    new = full[len(prompt_ids):]
    if not new:
        raise InputError(f"{where}: the {role} {word!r} tokenizes to nothing")
    if len(new) > 1:
        pieces = [tokenizer.decode([token]) for token in new]
        warnings.append(
            f"{role} {word!r} spans {len(new)} tokens {pieces}; the first, {pieces[0]!r}, is used"
        )
    return int(new[0])


def _leading_space_warning(
    tokenizer: Any, text: str, prompt_ids: list[int], word: str, role: str, chat_template: bool,
) -> str:
    """The chat-mode warning for a target or distractor written with a leading space, with the
    word without it as a suggestion when that is one token in context."""
    stripped = word.lstrip()
    after = _encode(tokenizer, text + stripped, chat_template)
    pieces = after[len(prompt_ids):] if after[:len(prompt_ids)] == prompt_ids else []
    suggestion = (f"write {stripped!r} (one token here) instead" if len(pieces) == 1 else
                  f"{stripped!r} spans {len(pieces)} tokens here, so rather set "
                  "response_prefix to the start of the answer and keep the space")
    return (f"chat mode: the {role} {word!r} starts with a space, but the answer starts a new "
            "assistant turn, where models begin without one (on the demo prompts SmolLM2 ranks "
            f"such targets ~4,600th, median): {suggestion}")


def prepare_prompt(
    tokenizer: Any, record: PromptRecord, chat_template: bool = False,
    system_prompt: str | None = None, response_prefix: str = "",
) -> PreparedPrompt:
    """Tokenize one prompt and resolve its target and distractor in context. In chat mode a
    target or distractor with a leading space right after the assistant header (no
    ``response_prefix``, or one ending in whitespace) gets a warning."""
    text = model_text(tokenizer, record.prompt, chat_template, system_prompt, response_prefix)
    input_ids = _encode(tokenizer, text, chat_template)
    if not input_ids:
        raise InputError(f"prompt {record.prompt_id!r} (line {record.line}): tokenizes to nothing")
    warnings: list[str] = []
    resolved: dict[str, int | None] = {"target": None, "distractor": None}
    after_header = chat_template and (not response_prefix or response_prefix[-1].isspace())
    for role, word in (("target", record.target), ("distractor", record.distractor)):
        if word is None:
            continue
        resolved[role] = _resolve(tokenizer, text, input_ids, word, role, record,
                                  chat_template, warnings)
        if after_header and word[:1].isspace() and word.strip():
            warnings.append(_leading_space_warning(tokenizer, text, input_ids, word, role,
                                                   chat_template))
    if resolved["distractor"] is not None and resolved["distractor"] == resolved["target"]:
        raise InputError(
            f"prompt {record.prompt_id!r} (line {record.line}): distractor "
            f"{record.distractor!r} and target {record.target!r} start with the same token"
        )
    return PreparedPrompt(
        prompt_id=record.prompt_id, text=text, input_ids=input_ids, target=record.target,
        target_id=resolved["target"], distractor=record.distractor,
        distractor_id=resolved["distractor"], warnings=warnings,
    )
