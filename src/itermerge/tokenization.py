"""Prompt and completion token ids: the chat template, EOS and padding decided in one place."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from itermerge.errors import ItermergeError
from itermerge.records import Message

TRUNCATE_MODES = ("drop", "left")


def render_plain(messages: list[Message], add_generation_prompt: bool = True) -> str:
    """The fallback format for tokenizers without a chat template (base models).

    Each turn is a line ``Role: content``; the generation prompt is a final ``Assistant:``, e.g.
    ``"User: What is 2 + 3?\\nAssistant:"``. Base models continue this format well enough for a demo;
    an instruct model should ship its own template.
    """
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + "Assistant:" if add_generation_prompt else text.rstrip("\n")


def encode_messages(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template (or :func:`render_plain`).

    The template supplies its own special tokens (BOS, turn markers), so nothing else is added; the
    plain fallback lets the tokenizer add its usual BOS.
    """
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        # transformers v5 returns a BatchEncoding (a mapping); v4 returned the list itself.
        ids = out["input_ids"] if isinstance(out, Mapping) else out
    else:
        ids = tokenizer(render_plain(messages, add_generation_prompt), add_special_tokens=True)["input_ids"]
    return list(ids)


def encode_reply(tokenizer: Any, messages: list[Message], reply: str,
                 marker: Sequence[int] | None = None) -> list[int]:
    """Token ids of a conversation followed by ``reply`` as the assistant's turn: what a reward model reads.

    ``marker``: a gated reward model's token pattern at the assistant header (ArmoRM's gate reads the prompt
    there). A template that does not trim the reply (SmolLM2's; Llama-3's trims) lets a reply that opens with
    whitespace merge with the header's last newline ("\n" + "\n" → one "\n\n" token), and the gate would find
    no prompt. Then the conversation up to its generation prompt and the rest of the rendered turn are tokenized
    apart, as TRL tokenizes prompt and completion: the same text, the marker whole. Elsewhere the ids are the
    template's own.
    """
    turn = [*messages, {"role": "assistant", "content": reply}]
    ids = encode_messages(tokenizer, turn, add_generation_prompt=False)
    if marker is None or contains_run(ids, marker) or not getattr(tokenizer, "chat_template", None):
        return ids
    head = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = tokenizer.apply_chat_template(turn, tokenize=False)
    if not text.startswith(head):
        return ids
    return tokenizer.encode(head, add_special_tokens=False) + tokenizer.encode(text[len(head):],
                                                                               add_special_tokens=False)


def contains_run(ids: Sequence[int], pattern: Sequence[int]) -> bool:
    """Whether ``pattern`` occurs in ``ids`` as a contiguous run."""
    pattern, size = list(pattern), len(pattern)
    return any(list(ids[j : j + size]) == pattern for j in range(len(ids) - size + 1))


def encode_prompt(
    tokenizer: Any,
    messages: list[Message],
    max_length: int | None = None,
    truncate: Literal["drop", "left"] = "drop",
) -> list[int] | None:
    """Prompt ids x with the assistant generation prompt appended, ready to sample from.

    A prompt longer than ``max_length`` tokens is dropped (None; the caller counts the drops) or, with
    ``truncate="left"``, keeps its last ``max_length`` tokens so the question and the generation
    prompt survive while the start (system prompt, BOS) is cut.
    """
    if truncate not in TRUNCATE_MODES:
        raise ItermergeError(f"truncate={truncate!r}: use one of {list(TRUNCATE_MODES)}")
    if max_length is not None and max_length < 1:
        raise ItermergeError(f"max_length={max_length}: must be a positive number of tokens (or None for no limit)")
    ids = encode_messages(tokenizer, messages, add_generation_prompt=True)
    if max_length is None or len(ids) <= max_length:
        return ids
    return ids[-max_length:] if truncate == "left" else None


def encode_completion(tokenizer: Any, text: str, finished: bool = True) -> list[int]:
    """Completion ids y: the text without BOS, plus EOS when the reply ended (not cut at max_new_tokens).

    Tokenized on its own, so at the prompt/completion boundary the ids can differ from tokenizing the
    joined string; prefer the sampler's own token ids where they exist.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if finished:
        if tokenizer.eos_token_id is None:
            raise ItermergeError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token; set one "
                "(tokenizer.eos_token = ...) so finished completions can be terminated"
            )
        ids.append(tokenizer.eos_token_id)
    return ids


def pad_id(tokenizer: Any) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its EOS (padding is masked anyway)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ItermergeError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos token; set one"
    )


def stop_token_ids(source: Any, tokenizer: Any = None, *, required: bool = True) -> tuple[int, ...]:
    """Every id that ends a completion: what ``generation_config`` stops on (an int or a list), else
    ``config.eos_token_id``, else the tokenizer's EOS. The one answer to "which tokens end a reply", so that the
    samplers, DPO's EOS mask and the induced rewards agree (Llama-3 stops on ``<|eot_id|>``, which is not its
    ``config.eos_token_id``).

    ``source``: a loaded model, or a checkpoint directory (its generation_config.json / config.json are read).
    With ``required`` a model that names no EOS anywhere is an error; otherwise the answer is ``()``.
    """
    ids = _generation_eos(source)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        if not required:
            return ()
        raise ItermergeError(
            f"{getattr(source, 'name_or_path', source)!s:.80}: the model has no EOS token "
            "(generation_config.eos_token_id, "
            "config.eos_token_id and the tokenizer's eos_token_id are all unset); set generation_config.eos_token_id "
            "in the checkpoint"
        )
    return (int(ids),) if isinstance(ids, int) else tuple(int(i) for i in ids)


def _generation_eos(source: Any) -> int | list[int] | None:
    if isinstance(source, (str, os.PathLike)):
        ids = None
        for name in ("generation_config.json", "config.json"):
            path = Path(source) / name
            if ids is None and path.is_file():
                ids = json.loads(path.read_text()).get("eos_token_id")
        return ids
    ids = getattr(getattr(source, "generation_config", None), "eos_token_id", None)
    return ids if ids is not None else getattr(getattr(source, "config", None), "eos_token_id", None)
