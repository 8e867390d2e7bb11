"""Tokenization: prompt ids through the chat template, completion ids with EOS, pad fallback.

The tiny tokenizer is character-level: "<pad>"=0, "<|im_start|>"=1, "<|im_end|>"=2, "\\n"=4 and a
printable character c has id ord(c) - 27, so every expected id list below is written out by hand.
"""

from __future__ import annotations

import pytest
from conftest import tiny_tokenizer
from tokenizers import processors

from itermerge.errors import ItermergeError
from itermerge.tokenization import encode_completion, encode_messages, encode_prompt, pad_id, render_plain

START, END, NL = 1, 2, 4
HI = [{"role": "user", "content": "hi"}]


def chars(text: str) -> list[int]:
    return [ord(c) - 27 for c in text]


# "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n": 21 tokens
HI_PROMPT = [START, *chars("user"), NL, *chars("hi"), END, NL, START, *chars("assistant"), NL]


def test_prompt_goes_through_the_chat_template_with_generation_prompt(tiny_tok):
    assert encode_prompt(tiny_tok, HI) == HI_PROMPT
    assert len(HI_PROMPT) == 21


def test_prompt_too_long_is_dropped_or_left_truncated(tiny_tok):
    assert encode_prompt(tiny_tok, HI, max_length=21) == HI_PROMPT
    assert encode_prompt(tiny_tok, HI, max_length=20) is None
    assert encode_prompt(tiny_tok, HI, max_length=5, truncate="left") == [*chars("tant"), NL]


def test_bad_truncation_settings_are_named(tiny_tok):
    with pytest.raises(ItermergeError, match=r"truncate='right': use one of \['drop', 'left'\]"):
        encode_prompt(tiny_tok, HI, max_length=5, truncate="right")
    with pytest.raises(ItermergeError, match=r"max_length=0: must be a positive number"):
        encode_prompt(tiny_tok, HI, max_length=0)


def test_without_chat_template_the_plain_format_is_used():
    tok = tiny_tokenizer()
    tok.chat_template = None
    chat = [{"role": "system", "content": "Be"}, {"role": "user", "content": "hi"}]
    assert render_plain(chat) == "System: Be\nUser: hi\nAssistant:"
    assert encode_prompt(tok, chat) == [*chars("System: Be"), NL, *chars("User: hi"), NL, *chars("Assistant:")]
    full = [*chat, {"role": "assistant", "content": "yo"}]
    assert encode_messages(tok, full, add_generation_prompt=False) == [
        *chars("System: Be"), NL, *chars("User: hi"), NL, *chars("Assistant: yo"),
    ]


def test_completion_gets_eos_when_finished_and_never_bos():
    tok = tiny_tokenizer()
    # Make the tokenizer add BOS by default, as Llama's does, to show completions do not get one.
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", START)]
    )
    assert tok("42")["input_ids"] == [START, *chars("42")]
    assert encode_completion(tok, "42") == [*chars("42"), END]
    assert encode_completion(tok, "42", finished=False) == chars("42")
    assert encode_completion(tok, "", finished=True) == [END]


def test_completion_without_eos_token_is_an_error():
    tok = tiny_tokenizer()
    tok.eos_token = None
    assert encode_completion(tok, "4", finished=False) == chars("4")
    with pytest.raises(ItermergeError, match=r"has no eos_token"):
        encode_completion(tok, "4")


def test_pad_id_falls_back_to_eos():
    tok = tiny_tokenizer()
    assert pad_id(tok) == 0
    tok.pad_token = None
    assert pad_id(tok) == END
    tok.eos_token = None
    with pytest.raises(ItermergeError, match=r"neither a pad nor an eos token"):
        pad_id(tok)
