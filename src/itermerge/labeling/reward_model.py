"""A reward-model scorer: an HF sequence classifier reading prompt + reply through its own chat template."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from itermerge.checkpoint.hf import whole_weights
from itermerge.errors import ItermergeError
from itermerge.labeling.armorm import ArmoRM, is_armorm_checkpoint, remote_code_failure
from itermerge.records import Prompt
from itermerge.tokenization import encode_reply, pad_id

_DTYPES = ("float32", "bfloat16", "float16")


class RewardModelScorer:
    """r(x, y) = logits[:, 0] of ``AutoModelForSequenceClassification`` on the conversation x + [assistant: y].

    Batches are sorted by length and right-padded with the model's pad id, which HF uses to find the last
    real token; the score of a sequence therefore does not depend on what it was batched with.
    """

    def __init__(
        self,
        path: str,
        trust_remote_code: bool = False,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ItermergeError(f"reward model batch_size={batch_size!r}: must be a positive integer")
        self.path, self.batch_size = str(path), batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)
            if is_armorm_checkpoint(self.path):  # natively: its remote code no longer imports under transformers 5
                self.model = ArmoRM.from_pretrained(self.path, dtype=_resolve_dtype(dtype), device=self.device)
            else:  # whole weights on this device even after a ZeRO-3 training registered its config (as ArmoRM)
                with whole_weights():
                    self.model = AutoModelForSequenceClassification.from_pretrained(
                        self.path, dtype=_resolve_dtype(dtype), trust_remote_code=trust_remote_code
                    )
        except (ImportError, AttributeError) as e:
            if not trust_remote_code:
                raise
            raise remote_code_failure(self.path, e) from e
        except (OSError, ValueError) as e:
            raise ItermergeError(
                f"reward model {self.path!r} could not be loaded ({e}); give a local HF checkpoint directory, "
                "or a Hub id on a machine with internet (set trust_remote_code: true if it ships its own code)"
            ) from e
        self.model.to(self.device).eval()
        if self.model.config.pad_token_id is None:
            # HF sequence classifiers pool at the last non-pad token and refuse batches without a pad id.
            self.model.config.pad_token_id = pad_id(self.tokenizer)
        self.pad_id = self.model.config.pad_token_id

    def encode(self, prompt: Prompt, completion: str) -> list[int]:
        """Token ids of the prompt's conversation followed by the reply as the assistant's turn (with a gated judge's
        marker kept whole: ``encode_reply``)."""
        return encode_reply(self.tokenizer, prompt.messages, completion, getattr(self.model, "gating_pattern", None))

    @torch.no_grad()
    def score(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(
                f"{len(prompts)} prompts for {len(completions)} completions; pass one prompt per completion"
            )
        sequences = [self.encode(p, c) for p, c in zip(prompts, completions)]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths share a batch
        scores = [0.0] * len(sequences)
        for start in tqdm(range(0, len(order), self.batch_size), desc="reward model", leave=False):
            chunk = order[start : start + self.batch_size]
            width = max(len(sequences[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)  # (B, L)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, L)
            for row, i in enumerate(chunk):
                input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                attention_mask[row, : len(sequences[i])] = 1
            out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))
            # Custom heads (ArmoRM) return their preference score as ``score``; classifiers as logits[:, 0].
            values = out.score if getattr(out, "score", None) is not None else out.logits[:, 0]
            values = values.float().reshape(len(chunk), -1)[:, 0]  # (B,)
            for row, i in enumerate(chunk):
                scores[i] = float(values[row])
        return scores


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """None → float32 (the project default); names as in configs: "float32", "bfloat16", "float16"."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ItermergeError(f"reward model dtype {dtype!r}: use one of {list(_DTYPES)}")
    return getattr(torch, dtype)
