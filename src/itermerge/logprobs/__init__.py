"""log π(y|x) of completions under a causal LM: the one place it is computed (batches, the module, batched scoring)."""

from itermerge.logprobs.batches import GroupedBatch, TokenBatch, collate, collate_grouped
from itermerge.logprobs.forward import CompletionLogprobs
from itermerge.logprobs.score import score_grouped, score_sequences, sequence_logprobs, token_logprobs
from itermerge.logprobs.structure import plain_output_path

__all__ = ["CompletionLogprobs", "GroupedBatch", "TokenBatch", "collate", "collate_grouped", "plain_output_path",
           "score_grouped", "score_sequences", "sequence_logprobs", "token_logprobs"]
