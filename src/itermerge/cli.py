"""The ``itermerge`` command line: one subcommand per stage of the paper."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from itermerge import __version__
from itermerge.errors import ItermergeError


def _number(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: not a number; write e.g. {flag} 0.3") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: must be finite")
        return value

    return parse


def _weights(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights {text!r}: not a comma-separated list of numbers; write e.g. --weights 0.1,0.1,0.9") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"--weights {text!r}: give one finite k_t per checkpoint, e.g. --weights 0.1,0.1,0.9")
    return values


def cmd_merge(args: argparse.Namespace) -> None:
    from itermerge.checkpoint import parse_dtype
    from itermerge.merge import merge_checkpoints, mergekit_config, resolve_weights

    if args.weights is None and args.lam is None and args.alpha is None:
        raise ItermergeError("itermerge merge: give --lam and --alpha (eq. 10) or --weights k1,...,kT (eq. 9)")
    dtype = parse_dtype(args.dtype)
    if args.emit_mergekit_config:
        k = resolve_weights(len(args.checkpoints), args.lam, args.alpha, args.weights)
        Path(args.emit_mergekit_config).write_text(mergekit_config(args.reference, args.checkpoints, k, dtype))
        print(f"mergekit config: {args.emit_mergekit_config}")
    out = merge_checkpoints(
        args.reference, args.checkpoints, args.out, lam=args.lam, alpha=args.alpha, weights=args.weights,
        dtype=dtype, force=args.force, max_shard_size=args.max_shard_size, mean_cache=args.mean_cache,
        progress=not args.quiet,
    )
    print(f"merged checkpoint: {out}")


def cmd_mean(args: argparse.Namespace) -> None:
    from itermerge.merge import mean_checkpoint

    out = mean_checkpoint(args.checkpoints, args.out, force=args.force, progress=not args.quiet)
    print(f"θ̄ checkpoint: {out}")


def _run_dir(args: argparse.Namespace, cfg) -> Path:
    return Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name


def cmd_iterate(args: argparse.Namespace) -> None:
    from itermerge.config import load_config
    from itermerge.pipeline import iterate

    cfg = load_config(args.config, args.set)
    run_dir = _run_dir(args, cfg)
    thetas = iterate(cfg, run_dir, force=args.force)
    print(f"θ0..θ{len(thetas) - 1}: " + " ".join(str(p) for p in thetas))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="itermerge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"itermerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("merge", help="Algorithm 2: merge θ0..θT with (λ, α) of eq. 10 or explicit k_t of eq. 9")
    p.add_argument("--reference", required=True, metavar="THETA0", help="θ0, the reference / starting checkpoint directory")
    p.add_argument("--checkpoints", required=True, nargs="+", metavar="THETA_T", help="θ1..θT in iteration order")
    p.add_argument("--lam", type=_number("--lam"), help="λ: relative weight of the intermediate checkpoints (direction)")
    p.add_argument("--alpha", type=_number("--alpha"), help="α: extrapolation of the alignment signal (magnitude); 0 = none")
    p.add_argument("--weights", type=_weights, help="explicit k_1,...,k_T of eq. 9 instead of --lam/--alpha")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default="auto", help="output dtype: auto (as θT), float32, bfloat16, float16")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--mean-cache", help="θ̄ directory to reuse (or create) so that only θ0, θ̄, θT are read")
    p.add_argument("--emit-mergekit-config", metavar="FILE", help="also write the equivalent mergekit YAML")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("mean", help="write θ̄ = mean(θ1..θ_(T−1)) once (float32), for later merges")
    p.add_argument("--checkpoints", required=True, nargs="+", help="θ1..θ_(T−1)")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_mean)

    p = sub.add_parser("iterate", help="Algorithm 1: T iterations of DPO with the reference fixed at θ0 (resumable)")
    _run_args(p)
    p.set_defaults(func=cmd_iterate)
    return parser


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (YAML); see examples/ and configs/")
    p.add_argument("--run-dir", help="run directory (default runs/NAME); rerun the same command to resume")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set dpo.learning_rate=1e-5")
    p.add_argument("--force", action="store_true", help="start the run directory over if its config differs")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ItermergeError as e:
        print(f"itermerge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"itermerge {args.command}: interrupted; completed stages are kept, rerun the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
