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


def _merging_bpe():
    """A byte-level BPE whose one merge is "\\n\\n" across any boundary (no pre-split), with a ChatML template that,
    like SmolLM2's, does not trim the reply: the shape of the tokenizer that broke ArmoRM's marker."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|im_start|>": 0, "<|im_end|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    vocab["ĊĊ"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


@pytest.mark.parametrize("reply", ["\nHi", "\n\nHi", "Hi"])
def test_a_gated_judge_sees_its_marker_whatever_the_reply_opens_with(reply):
    """ArmoRM's gate reads the prompt at "<|im_end|>\\n<|im_start|>assistant\\n"; a reply opening with a newline
    merged into the header's newline under SmolLM2's template, and the judge refused the row (gpu_check's real path).
    The reply is now tokenized apart from the prompt there: the marker whole, the text unchanged."""
    from itermerge.tokenization import encode_messages, encode_reply

    tok = _merging_bpe()
    messages = [{"role": "user", "content": "2+2?"}]
    marker = tok.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    joint = encode_messages(tok, [*messages, {"role": "assistant", "content": reply}], add_generation_prompt=False)
    ids = encode_reply(tok, messages, reply, marker)
    holds = [any(s[j : j + len(marker)] == marker for j in range(len(s))) for s in (joint, ids)]
    assert holds == ([False, True] if reply.startswith("\n") else [True, True])  # the merge happens, then is undone
    assert tok.decode(ids) == tok.decode(joint)
    if not reply.startswith("\n"):
        assert ids == joint  # where the marker is whole, the template's own ids
