"""The ``itermerge`` command line: one subcommand per stage of the paper."""

from __future__ import annotations

import argparse
import math
import sys

from itermerge import __version__
from itermerge.commands import (
    cmd_demo,
    cmd_ensemble,
    cmd_eval,
    cmd_iterate,
    cmd_mean,
    cmd_merge,
    cmd_plan,
    cmd_replicate,
    cmd_report,
    cmd_results,
    cmd_reward,
    cmd_run,
    cmd_search,
    cmd_verify,
)
from itermerge.config.search import parse_lam
from itermerge.errors import ItermergeError
from itermerge.operators import REGISTRY, parameters


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
        raise argparse.ArgumentTypeError(
            f"--weights {text!r}: not a comma-separated list of numbers; write e.g. --weights 0.1,0.1,0.9"
        ) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(
            f"--weights {text!r}: give one finite k_t per checkpoint, e.g. --weights 0.1,0.1,0.9"
        )
    return values


def _lams(text: str) -> list[float | str]:
    """``--lams 0,0.3,uniform,1``: numbers, and ``uniform`` for (T−1)/T (the uniform average of θ1..θT)."""
    try:
        values = [parse_lam(x.strip()) for x in text.split(",") if x.strip()]
    except ItermergeError as e:
        raise argparse.ArgumentTypeError(f"--lams {text!r}: {e}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"--lams {text!r}: give at least one λ, e.g. --lams 0,0.3,uniform,1")
    return values


_CLI_TYPES = {"number": _number, "integer": lambda flag: int, "numbers": lambda flag: _weights,
              "groups": lambda flag: str}


def _operator_args(p: argparse.ArgumentParser, specs) -> None:
    """``--method`` among ``specs`` and every parameter they take, from their declarations (``itermerge.operators``):
    each flag's help names the operators that take it."""
    specs = list(specs)
    p.add_argument("--method", default="paper", choices=[s.name for s in specs],
                   help="; ".join(f"{s.name}: {s.summary}" for s in specs) + " (docs/design.md: the operators)")
    added = []
    for name, param in parameters().items():
        users = [s.name for s in specs if any(q.name == name for q in s.params)]
        if users:
            p.add_argument(param.flag, dest=name, type=_CLI_TYPES[param.kind](param.flag),
                           metavar="FILE.yaml" if param.kind == "groups" else None,
                           help=f"{param.help} [{', '.join(users)}]")
            added.append(name)
    p.set_defaults(operator_params=added)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="itermerge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"itermerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _merge_command(sub)
    _mean_command(sub)
    _iterate_command(sub)
    _run_command(sub)
    _demo_command(sub)
    _replicate_command(sub)
    _results_command(sub)
    _search_command(sub)
    _verify_command(sub)
    _plan_command(sub)
    _report_command(sub)
    _eval_command(sub)
    _reward_command(sub)
    _ensemble_command(sub)
    return parser


def _merge_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="Algorithm 2: merge θ0..θT with (λ, α) of eq. 10 or explicit k_t of eq. 9")
    p.add_argument(
        "--reference", required=True, metavar="THETA0", help="θ0, the reference / starting checkpoint directory"
    )
    p.add_argument("--checkpoints", required=True, nargs="+", metavar="THETA_T", help="θ1..θT in iteration order")
    _operator_args(p, REGISTRY.values())
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--dtype", default="auto", help="output dtype: auto (as θT), float32, bfloat16, float16")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument("--mean-cache", help="θ̄ directory to reuse (or create) so that only θ0, θ̄, θT are read")
    p.add_argument("--emit-mergekit-config", metavar="FILE", help="also write the equivalent mergekit YAML")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--full", action="store_true",
        help="with LoRA adapters as --checkpoints (a dpo.peft run's iter_XX/adapter): write full weights, θ0 plus the "
        "merged adapter, instead of the merge as one adapter",
    )
    p.set_defaults(func=cmd_merge)


def _mean_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mean", help="write θ̄ = mean(θ1..θ_(T−1)) once (float32), for later merges")
    p.add_argument("--checkpoints", required=True, nargs="+", help="θ1..θ_(T−1)")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_mean)


def _iterate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("iterate", help="Algorithm 1: T iterations of DPO with the reference fixed at θ0 (resumable)")
    _run_args(p)
    p.set_defaults(func=cmd_iterate)


def _run_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole paper: iterate, search (λ, α) on dev, merge, test once, studies, report")
    _run_args(p)
    p.set_defaults(func=cmd_run)


def _demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="`run` on the built-in SmolLM2-135M arithmetic config (CPU, ~20 min; --quick ~5 min)"
    )
    p.add_argument("--quick", action="store_true", help="a first look: smaller T, prompts and grid")
    p.add_argument("--run-dir", help="run directory (default runs/demo or runs/demo-quick)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--force", action="store_true", help="start the run directory over if its config differs")
    p.add_argument("--plain", action="store_true", help=PLAIN_HELP)
    p.add_argument("--verify", action="store_true", help=VERIFY_HELP)
    p.set_defaults(func=cmd_demo)


def _replicate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replicate", help="a run under several seeds (and regimes), dev and test shared; pooled paired differences"
    )
    p.add_argument("study", help="a study file (run:, seeds:, regimes:), a run config, or the built-in `study`")
    p.add_argument("--seeds", help="replace the file's seeds: 0,1,2 or 0-4")
    p.add_argument("--out", help="study directory (default runs/NAME); rerun the same command to resume")
    p.add_argument("--prune-caches", action="store_true",
                   help="delete each finished run's cache/ (θ̄; recomputed on demand) to save disk")
    p.add_argument("--prune-checkpoints", action="store_true",
                   help="also delete each finished run's weights (θ1..θT, the merge; listed in its pruned.json), "
                        "keeping the records the study reads; a rerun skips that run (about 3.6 GB a run saved on "
                        "the 135M model at T = 6)")
    p.set_defaults(func=cmd_replicate)


def _results_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("results", help="docs/results.md from a study directory and a demo run (nothing recomputed)")
    p.add_argument("--study", help="a directory made by `itermerge replicate`")
    p.add_argument("--demo", help="a run directory of `itermerge demo` (its studies: α, λ, ensemble)")
    p.add_argument("--other-study", action="append", default=[], metavar="DIR",
                   help="another study of the same task (e.g. `itermerge replicate study_reference`, the reference "
                        "policies): a section of its own with its claims; repeatable")
    p.add_argument("--task-study", action="append", default=[], metavar="DIR",
                   help="a study of another task (`itermerge replicate` of its config, e.g. the instruction-following "
                        "example): a section of its own, every test axis shown; repeatable")
    p.add_argument("--out", default="docs/results.md")
    p.add_argument("--aggregate", action="store_true", help="re-aggregate the studies' runs first")
    p.set_defaults(func=cmd_results)


def _search_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search", help="(λ, α) grid merged in memory and evaluated on dev; the choice merged and tested once"
    )
    p.add_argument("run_dir", help="a run directory made by `itermerge iterate`")
    p.add_argument("--config", help="config (default: the run's config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--lams", type=_lams, help="λ grid, e.g. 0,0.3,0.5,uniform,1 (uniform: (T−1)/T)")
    p.add_argument("--alphas", type=_weights, help="α grid, e.g. 0,0.4,1")
    p.add_argument("--tolerance", type=_number("--tolerance"), help="capability may fall this far below θT's")
    p.add_argument("--reference", help="θ0 (default: the run's)")
    p.add_argument(
        "--no-test", action="store_true", help="stop after the choice (no merge to disk, no test evaluation)"
    )
    p.set_defaults(func=cmd_search)


def _verify_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check every finished stage's files against the proofs in its manifest")
    p.add_argument("run_dir")
    p.add_argument("--deep", action="store_true", help="hash every file, not only those whose mtime changed")
    p.set_defaults(func=cmd_verify)


def _plan_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="each stage's peak memory per GPU from the model configs alone; does it fit?")
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--gpus", type=int, default=1, help="processes, one GPU each (default 1)")
    p.add_argument("--gpu-memory", default="80GiB", help="one GPU's memory, e.g. 80GiB or 141GB (default 80GiB)")
    p.add_argument("--zero-stage", type=int, choices=(0, 3), default=0,
                   help="3: training under DeepSpeed ZeRO-3 (examples/accelerate_zero3.yaml); 0: DDP or one GPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.set_defaults(func=cmd_plan)


def _report_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="report.md + plots from what the run wrote (nothing recomputed)")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)


def _eval_command(sub: argparse._SubParsersAction) -> None:
    from itermerge.evaluation.evaluators import REGISTRY

    listed = "\n".join(f"  evaluation.{s.name}: {s.summary}; reports {s.reports.replace('`', '')}"
                        for s in REGISTRY.values())
    p = sub.add_parser("eval", help="the evaluators on one checkpoint: " + ", ".join(REGISTRY),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="evaluators, each on when its section of the config is set "
                              f"(--set evaluation.NAME.KEY=VALUE, or NAME=null for off):\n{listed}")
    p.add_argument("checkpoint")
    p.add_argument("--config", help="config whose evaluation: section is used (default: built-in arithmetic task)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--split", default="dev", choices=["dev", "test"])
    p.add_argument("--reference", help="θ0, for the KL evaluator (default: the run's, with --run-dir)")
    p.add_argument("--run-dir", help="a run: its config.yaml, the precision it measured and its θ0 (as its test)")
    p.add_argument("--allow-test", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_eval)


def _reward_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reward", help="induced rewards (eq. 4) of a file, or the α / λ / accuracy-matrix studies of a run"
    )
    p.add_argument("--run-dir", help="run the studies on this run directory")
    p.add_argument("--study", default="all", choices=["all", "alpha", "accuracy", "ensemble", "lambda"])
    p.add_argument("--config", help="config (default: the run's config.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--policy", help="π: checkpoint whose induced reward is computed")
    p.add_argument("--reference", help="π_ref: θ0")
    p.add_argument(
        "--pairs", help="a pairs.jsonl (PreferencePair records): rewards of chosen and rejected, and accuracy"
    )
    p.add_argument("--samples", help="a samples.jsonl (with prompts.jsonl beside it): the reward of each completion")
    p.add_argument("--beta", type=_number("--beta"), default=0.1)
    p.add_argument("--out", help="write per-record rewards (JSONL) here")
    p.set_defaults(func=cmd_reward)


def _ensemble_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ensemble", help="the exact eq. (6) ensemble vs the merge: per-token KL, correlation, cost")
    p.add_argument("--reference", required=True, metavar="THETA0")
    p.add_argument("--checkpoints", required=True, nargs="+", metavar="THETA_T")
    _operator_args(p, [s for s in REGISTRY.values() if s.shared_k])  # eq. 9 with one k per checkpoint
    p.add_argument("--out", required=True, help="directory for approximation.json and .png")
    p.add_argument("--task", default="arithmetic", help="built-in task whose dev prompts are used")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=_number("--temperature"), default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_ensemble)


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config (YAML); see examples/ and configs/")
    p.add_argument("--run-dir", help="run directory (default runs/NAME); rerun the same command to resume")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set dpo.learning_rate=1e-5",
    )
    p.add_argument("--force", action="store_true", help="start the run directory over if its config differs")
    p.add_argument("--plain", action="store_true", help=PLAIN_HELP)
    p.add_argument("--verify", action="store_true", help=VERIFY_HELP)


VERIFY_HELP = "check finished stages' files by content before trusting them (default: when size or mtime changed)"
PLAIN_HELP = (
    "every speed and memory setting off (dpo.lean_activations, … sampling.growing_kv_cache): the plain reference path"
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for pages that say how they were made
    ours = not group_started()  # a group the command starts (under a launcher) is ended by it; a caller's is not
    try:
        args.func(args)
    except ItermergeError as e:
        print(f"itermerge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"itermerge {args.command}: interrupted; completed stages are kept, rerun the same command to continue",
            file=sys.stderr,
        )
        return 130
    finally:
        if ours and group_started():
            # Under a launcher, the group the command started ends here, before the interpreter exits (as PyTorch
            # asks of every program): left to the interpreter's teardown, gloo's threads can be destroyed still
            # joinable, and C++ aborts the process ("terminate called without an active exception", exit -6).
            sys.modules["torch"].distributed.destroy_process_group()
    return 0


def group_started() -> bool:
    """Whether this process has a torch.distributed process group (a command that never loaded torch has none)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
