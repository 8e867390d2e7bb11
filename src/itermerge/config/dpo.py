"""DPOConfig: the settings of one iteration's DPO training (appendix C's Table 6 by default)."""

from __future__ import annotations

from dataclasses import dataclass, field

from itermerge.errors import ItermergeError

_SCHEDULES = ("cosine", "linear", "constant")
REFERENCES = ("fixed", "previous", "soft", "hard")
_LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """dpo.peft: iteration t trains a fresh LoRA adapter on θ_{t−1} (the `peft` library): θ_t = θ_{t−1} + (α/r) B_t A_t.

    The reference stays θ0; the run keeps each iteration's adapter (iter_XX/adapter) and θ_t as θ0 plus adapters
    1..t (iter_XX/model, checkpoint/chain.py), never full weights; the merge of θ0..θT is one adapter (merging/lora.py).
    """

    r: int = field(default=8, metadata={"help": "Rank of each iteration's adapter."})
    alpha: float = field(default=16.0, metadata={"help": "lora_alpha: the update is (alpha / r) · B A."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input while training."})
    target_modules: tuple[str, ...] = field(
        default=_LLAMA_LINEARS,
        metadata={"help": "Linear layers that get an adapter, by name or name suffix (peft's target_modules); "
                          "each must match a layer of θ0. The default is every linear layer of a Llama block."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ItermergeError(f"dpo.peft.r = {self.r!r}: the adapter rank must be a positive integer, e.g. 8")
        if not self.alpha > 0:
            raise ItermergeError(f"dpo.peft.alpha = {self.alpha!r}: must be > 0 (the update is alpha / r · B A)")
        if not 0 <= self.dropout < 1:
            raise ItermergeError(f"dpo.peft.dropout = {self.dropout!r}: must be in [0, 1)")
        if not self.target_modules or not all(isinstance(m, str) and m.strip() for m in self.target_modules):
            raise ItermergeError(f"dpo.peft.target_modules = {list(self.target_modules)}: name at least one linear "
                                 f"layer, e.g. {list(_LLAMA_LINEARS)}")


@dataclass(frozen=True)
class DPOConfig:
    """DPO settings; the defaults are appendix C's (Table 6), ZeRO-3 aside (that comes from the launcher)."""

    beta: float = field(default=0.1, metadata={"help": "KL coefficient β of eq. (2)/(4)."})
    learning_rate: float = field(default=5e-7, metadata={"help": "Peak AdamW learning rate."})
    global_batch_size: int = field(
        default=128, metadata={"help": "Pairs per optimizer step = micro_batch_size × grad. accumulation × processes."}
    )
    micro_batch_size: int = field(
        default=1,
        metadata={
            "help": "Pairs per forward on one process (chosen + rejected = 2× sequences). 1 holds the least "
            "activation memory; 2 is faster on CPUs (docs/benchmarks.md) and better for GPU throughput."
        },
    )
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of the optimizer steps spent warming up."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "Decay after warm-up: cosine, linear or constant."})
    weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay on matrices (norms and biases are not decayed)."}
    )
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW (β1, β2)."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW ε."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this value."})
    epochs: int = field(default=1, metadata={"help": "Passes over D_t."})
    mask_eos: bool = field(
        default=True, metadata={"help": "Do not score a completion's final EOS token (appendix C)."}
    )
    max_length: int = field(default=2048, metadata={"help": "Longest prompt + completion, in tokens."})
    max_prompt_length: int = field(default=1024, metadata={"help": "Prompt tokens kept when a pair is too long."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward: less memory, ~30% more compute."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the pair shuffle (the same on every process)."})
    reference: str = field(
        default="fixed",
        metadata={"help": "π_ref of eq. (4): fixed = θ0 (the paper's Alg. 1); previous = θ_{t−1}, the iteration's "
                          "start (RLHFlow's iterative DPO); soft = TR-DPO's θ_ref ← α θ + (1 − α) θ_ref after every "
                          "optimizer step, from θ_{t−1}; hard = TR-DPO's θ_ref ← θ every reference_sync_steps "
                          "steps, from θ_{t−1}."},
    )
    reference_alpha: float = field(
        default=0.5, metadata={"help": "α of dpo.reference = soft, in (0, 1] (TR-DPO's best: 0.5-0.6)."}
    )
    reference_sync_steps: int = field(
        default=64, metadata={"help": "τ of dpo.reference = hard: optimizer steps between copies of θ into θ_ref."}
    )
    # Speed and memory settings: each is on by default and gives the plain path's result up to float rounding;
    # turn one off (or all, with `--plain`) to compare against the plain path. Measured in docs/benchmarks.md.
    lean_activations: bool = field(
        default=True,
        metadata={"help": "SwiGLU and RMSNorm keep only their inputs for backward and recompute the rest "
                          "(a third less activation memory; one process only)."},
    )
    grads_into_weights: bool = field(
        default=True,
        metadata={"help": "The input embedding and the output layer add their gradients straight into .grad "
                          "(no dense vocabulary-sized temporaries; one process only)."},
    )
    flat_buffers: bool = field(
        default=True,
        metadata={"help": "Gradients and AdamW moments as views of three flat buffers (less heap "
                          "fragmentation; plain AdamW only, not under DeepSpeed or FSDP)."},
    )
    fused_adamw: bool = field(
        default=True, metadata={"help": "torch's fused AdamW kernel where it exists (one pass over the parameters)."}
    )
    peft: LoraConfig | None = field(
        default=None,
        metadata={"help": "LoRA iterations, e.g. {r: 8, alpha: 16}: each θ_t is θ_{t−1} plus a trained adapter, and "
                          "the run keeps adapters, not full weights (extra itermerge[peft]; dpo.learning_rate then "
                          "applies to the adapter, which usually wants ~1e-4). Unset: every weight trains."},
    )

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ItermergeError:
            return ItermergeError(f"dpo.{name} = {getattr(self, name)!r}: {rule}")

        for name in ("beta", "learning_rate", "adam_eps", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        for name in ("global_batch_size", "micro_batch_size", "epochs", "max_length", "max_prompt_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "must be a positive integer")
        if self.global_batch_size % self.micro_batch_size:
            raise bad("global_batch_size", f"must be a multiple of dpo.micro_batch_size = {self.micro_batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise bad("warmup_ratio", "must be in [0, 1), e.g. 0.03")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.lr_scheduler not in _SCHEDULES:
            raise bad("lr_scheduler", f"must be one of {_SCHEDULES}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise bad("adam_betas", "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        if self.reference not in REFERENCES:
            raise bad("reference", f"must be one of {REFERENCES} (fixed is the paper's θ0)")
        if not 0 < self.reference_alpha <= 1:
            raise bad("reference_alpha", "must be in (0, 1], e.g. 0.5 (1 copies θ into θ_ref every step)")
        if (isinstance(self.reference_sync_steps, bool) or not isinstance(self.reference_sync_steps, int)
                or self.reference_sync_steps < 1):
            raise bad("reference_sync_steps", "must be a positive integer, e.g. 64")
        if self.max_prompt_length >= self.max_length:
            raise bad(
                "max_prompt_length", f"must be < dpo.max_length = {self.max_length} to leave room for completions"
            )

    def accumulation_steps(self, num_processes: int) -> int:
        """Micro-batches per process per optimizer step, so that global = micro × accumulation × processes."""
        per_step = self.micro_batch_size * num_processes
        if self.global_batch_size % per_step:
            raise ItermergeError(
                f"dpo.global_batch_size = {self.global_batch_size} is not a multiple of dpo.micro_batch_size × "
                f"processes = {self.micro_batch_size} × {num_processes}; change one of them"
            )
        return self.global_batch_size // per_step
