"""A TRL DPOTrainer loop whose epochs become itermerge checkpoints, merged when training ends (issue 27).

    python examples/trl/dpo_then_merge.py --model smollm2-135m-instruct --out runs/trl_demo

`IterMergeCallback` saves θ0 as OUT/theta0 and each epoch's model as OUT/iter_XX/model (itermerge's layout, with the
trainer's log beside each), and when training ends writes the paper's merge (λ = 0.3, α = 0.4 here) to OUT/merged.
Then `itermerge merge` merges the same checkpoints by another operator (an EMA), as one would from the shell; and
`itermerge search OUT --reference OUT/theta0 --config YOUR_RUN.yaml` searches (λ, α) on dev for them as it does for
a run of `itermerge iterate`. For an iterative loop (fresh pairs each round), build one DPOTrainer per round, give
each the same callback with save_every="train", and each round's model becomes the next θ_t.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def arithmetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """n conversational preference pairs "a+b=?": the right sum chosen, an off-by-one sum rejected."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        pairs.append({
            "prompt": [{"role": "user", "content": f"{a}+{b}=?"}],
            "chosen": [{"role": "assistant", "content": str(a + b)}],
            "rejected": [{"role": "assistant", "content": str(a + b + rng.choice((-1, 1)))}],
        })
    return pairs


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="θ0: a checkpoint directory or the demo's")
    parser.add_argument("--out", default="runs/trl_demo", help="the run directory the callback writes")
    parser.add_argument("--epochs", type=int, default=3, help="epochs = iterations θ1..θT")
    parser.add_argument("--pairs", type=int, default=16, help="preference pairs in the training set")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from itermerge.checkpoint import resolve_model
    from itermerge.cli import main as itermerge
    from itermerge.integrations.trl import IterMergeCallback

    out, path = Path(args.out), resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    callback = IterMergeCallback(out, lam=0.3, alpha=0.4)  # the paper's merge, written when training ends
    config = DPOConfig(output_dir=str(out / "trl"), num_train_epochs=args.epochs, per_device_train_batch_size=4,
                       learning_rate=args.learning_rate, beta=0.1, use_cpu=True, bf16=False, report_to=[],
                       save_strategy="no", logging_steps=1, seed=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(arithmetic_pairs(args.pairs)),
                         processing_class=tokenizer, callbacks=[callback])
    trainer.train()
    print(f"θ0: {callback.reference}; θ1..θT: {[str(p) for p in callback.checkpoints()]}; merge: {out / 'merged'}")
    itermerge(["merge", "--reference", str(callback.reference), "--checkpoints", *map(str, callback.checkpoints()),
               "--method", "ema", "--gamma", "0.5", "--out", str(out / "merged_ema"), "--force", "--quiet"])
    return out


if __name__ == "__main__":
    main()
