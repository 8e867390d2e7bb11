"""Write the task's JSONL files: ``python -m itermerge.tasks.instruction_following OUT_DIR [--train N ...]``."""

from __future__ import annotations

import argparse

from itermerge.tasks.instruction_following.constraints import write_splits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m itermerge.tasks.instruction_following", description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=192, help="training prompts (T × per_iteration)")
    parser.add_argument("--dev", type=int, default=40)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for split, path in write_splits(args.out_dir, {"train": args.train, "dev": args.dev, "test": args.test},
                                    args.seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
