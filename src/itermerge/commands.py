"""What each ``itermerge`` subcommand does, given its parsed arguments (heavy modules imported only here, lazily)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from itermerge.errors import ItermergeError
from itermerge.rundir import RunLayout


def cmd_merge(args: argparse.Namespace) -> None:
    from itermerge.checkpoint.dtypes import parse_dtype
    from itermerge.merging import merge_adapters, merge_checkpoints, mergekit_config_for
    from itermerge.merging.lora import is_adapter
    from itermerge.operators import operator

    if args.method == "paper" and args.weights is None and args.lam is None and args.alpha is None:
        raise ItermergeError("itermerge merge: give --lam and --alpha (eq. 10) or --weights k1,...,kT (eq. 9)")
    dtype = parse_dtype(args.dtype)
    op = operator(args.method, **_operator_params(args))
    if any(map(is_adapter, args.checkpoints)):  # a LoRA run's adapters: the merge is one adapter (merging/lora.py)
        for flag, value in (("--emit-mergekit-config", args.emit_mergekit_config), ("--mean-cache", args.mean_cache)):
            if value:
                raise ItermergeError(f"{flag} applies to full checkpoints, not LoRA adapters")
        out = merge_adapters(args.reference, args.checkpoints, args.out, op, full=args.full, dtype=dtype,
                             force=args.force, max_shard_size=args.max_shard_size, progress=not args.quiet)
        print(f"merged {'checkpoint' if args.full else 'adapter'}: {out}")
        return
    if args.full:
        raise ItermergeError("--full applies to LoRA adapters (--checkpoints DIR/iter_XX/adapter ...); a merge of full "
                             "checkpoints is full weights already")
    if args.emit_mergekit_config:
        text = mergekit_config_for(op, args.reference, args.checkpoints, dtype, mean_cache=args.mean_cache)
        Path(args.emit_mergekit_config).write_text(text)
        print(f"mergekit config: {args.emit_mergekit_config}")
    out = merge_checkpoints(
        args.reference, args.checkpoints, args.out, op, dtype=dtype, force=args.force,
        max_shard_size=args.max_shard_size, mean_cache=args.mean_cache, progress=not args.quiet,
    )
    print(f"merged checkpoint: {out}")


def _operator_params(args: argparse.Namespace) -> dict:
    """The operator parameters the command line gave (None: not given), a groups file read."""
    from itermerge.config.groups import read_groups
    from itermerge.operators import parameters

    given = {name: getattr(args, name) for name in args.operator_params}  # the flags cli._operator_args added
    return {name: read_groups(v) if v is not None and parameters()[name].kind == "groups" else v
            for name, v in given.items()}


def cmd_mean(args: argparse.Namespace) -> None:
    from itermerge.merging import mean_checkpoint

    out = mean_checkpoint(args.checkpoints, args.out, force=args.force, progress=not args.quiet)
    print(f"θ̄ checkpoint: {out}")


def _run_dir(args: argparse.Namespace, cfg) -> Path:
    return Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name


def _load(path, args: argparse.Namespace):
    from itermerge.config import PLAIN, load_config

    return load_config(path, [*(PLAIN if getattr(args, "plain", False) else ()), *args.set])


def cmd_iterate(args: argparse.Namespace) -> None:
    from itermerge.pipeline import iterate

    cfg = _load(args.config, args)
    run_dir = _run_dir(args, cfg)
    thetas = iterate(cfg, run_dir, force=args.force, verify=args.verify)
    print(f"θ0..θ{len(thetas) - 1}: " + " ".join(str(p) for p in thetas))


def cmd_run(args: argparse.Namespace) -> None:
    from itermerge.pipeline import run

    cfg = _load(args.config, args)
    run(cfg, _run_dir(args, cfg), force=args.force, verify=args.verify)


def cmd_demo(args: argparse.Namespace) -> None:
    from importlib.resources import files

    from itermerge.pipeline import run

    name = "demo_quick.yaml" if args.quick else "demo.yaml"
    path = Path(str(files("itermerge") / "configs" / name))
    cfg = _load(path, args)
    print(f"itermerge demo: {path.name} — the whole paper on SmolLM2-135M-Instruct with the built-in arithmetic task")
    run(cfg, _run_dir(args, cfg), force=args.force, verify=args.verify)


def _config_of(run_dir: Path, override: str | None, sets: list[str]):
    from itermerge.config import load_config

    path = Path(override) if override else RunLayout(run_dir).config
    if not path.exists():
        raise ItermergeError(
            f"{path}: no config; pass --config CONFIG.yaml (the run's own config.yaml is used by default)"
        )
    return load_config(path, sets)


def cmd_search(args: argparse.Namespace) -> None:
    import dataclasses

    from itermerge.pipeline import open_run, search_and_test

    run_dir = Path(args.run_dir)
    cfg = _config_of(run_dir, args.config, args.set)
    search = cfg.search
    if args.lams or args.alphas or args.tolerance is not None:
        rule = search.rule if args.tolerance is None else dataclasses.replace(search.rule, tolerance=args.tolerance)
        search = dataclasses.replace(
            search, lams=tuple(args.lams or search.lams), alphas=tuple(args.alphas or search.alphas), rule=rule
        )
    cfg = dataclasses.replace(cfg, search=search)
    with open_run(cfg, run_dir) as runner:
        choice = search_and_test(runner, cfg, run_dir, test=not args.no_test, reference=args.reference)
    print(
        f"chosen on {search.split}: λ = {choice['lam']}, α = {choice['alpha']} ({run_dir / 'search' / 'choice.json'})"
    )
    if not args.no_test:
        print(f"merged checkpoint: {run_dir / 'merged'}; test numbers: {run_dir / 'search' / 'test.json'}")


def cmd_report(args: argparse.Namespace) -> None:
    from itermerge.report import write_report

    print(f"report: {write_report(args.run_dir)}")


def cmd_eval(args: argparse.Namespace) -> None:
    """The run's evaluators on one checkpoint, built as the run's search and test build them (``run_evaluation``):
    with ``--run-dir`` (or a ``--config`` that is a run's config.yaml), in the precision the run measured."""
    import json

    from itermerge.config import from_dict, load_config
    from itermerge.evaluation import metrics_to_dict, run_evaluation
    from itermerge.rundir import Manifest

    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is None and args.config and RunLayout(Path(args.config).parent).manifest.exists():
        run_dir = Path(args.config).parent
    if args.config or run_dir is not None:
        cfg = _config_of(run_dir, args.config, args.set) if run_dir is not None else load_config(args.config, args.set)
    else:
        cfg = from_dict({})
    if args.split == "test" and not args.allow_test:
        print("note: evaluating on test; report test numbers once, after choosing on dev", file=sys.stderr)
    manifest = Manifest(run_dir).data if run_dir is not None else {}
    reference = args.reference or (manifest.get("reference") if cfg.evaluation.kl is not None else None)
    with run_evaluation(cfg, args.split, args.checkpoint, reference=reference,
                        precision=manifest.get("precision")) as (model, evaluator):
        metrics = evaluator(model)
    print(json.dumps(metrics_to_dict(metrics), indent=2))


def cmd_reward(args: argparse.Namespace) -> None:
    if args.run_dir:
        from itermerge.pipeline import STUDIES, algorithm_1, open_run, run_studies

        run_dir = Path(args.run_dir)
        cfg = _config_of(run_dir, args.config, args.set)
        with open_run(cfg, run_dir) as runner:
            thetas = algorithm_1(runner, cfg, run_dir)  # complete: nothing is redone
            choice = runner.manifest.get("search")
            only = STUDIES if args.study == "all" else (args.study,)
            if args.study == "all" and choice is None:
                only = tuple(s for s in only if s != "ensemble")  # the ensemble study needs the search's choice
            run_studies(runner, cfg, run_dir, thetas, choice, only=only)
        print(f"studies: {run_dir / 'studies'}")
        return
    from itermerge.studies.reward_file import reward_file

    if not (args.policy and args.reference and (args.pairs or args.samples)):
        raise ItermergeError(
            "itermerge reward: give --run-dir RUN (the studies) or --policy, --reference and --pairs/--samples FILE"
        )
    summary = reward_file(
        args.policy, args.reference, pairs=args.pairs, samples=args.samples, beta=args.beta, out=args.out
    )
    print(summary)


def cmd_ensemble(args: argparse.Namespace) -> None:
    from itermerge.operators import operator
    from itermerge.sampling import SamplingParams
    from itermerge.studies.approximation import approximation_study
    from itermerge.tasks import get_task

    lam, alpha, weights = args.lam, args.alpha, args.weights
    op = operator(args.method, **_operator_params(args))
    if args.method != "paper":  # eq. (9) with the operator's k_t: eq. (6) with ensemble_coefficients(k)
        lam, alpha, weights = None, None, list(op.resolve(len(args.checkpoints), []).weights)
    prompts = get_task(args.task).prompts("dev", args.prompts, seed=args.seed)
    result = approximation_study(
        args.reference, args.checkpoints, prompts, args.out, lam=lam, alpha=alpha, weights=weights,
        params=SamplingParams(n=1, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed),
        batch_size=args.batch_size,
    )
    error = result["error"]
    print(f"merge vs exact ensemble (eq. 6): {Path(args.out) / 'approximation.json'}")
    for name, row in error.get("candidates", {}).items():
        print(f"  {name:>10}: KL(ens‖model) {row.get('kl_ensemble_to_model_per_token', float('nan')):.3g} / token")


def cmd_plan(args: argparse.Namespace) -> None:
    from itermerge.config import load_config
    from itermerge.plan import parse_memory, plan

    cfg = load_config(args.config, args.set)
    result = plan(cfg, gpus=args.gpus, device_bytes=parse_memory(args.gpu_memory), zero_stage=args.zero_stage)
    print(f"{args.config} on {args.gpus} × {args.gpu_memory}, ZeRO stage {args.zero_stage}, {cfg.model.dtype}:\n")
    print(result.table())
    problems = result.problems()
    if problems:
        raise ItermergeError("does not fit: " + "; ".join(problems))


def cmd_verify(args: argparse.Namespace) -> None:
    """Every finished stage's files against their proofs; changes nothing. Exit status 1 if any stage fails."""
    from itermerge.runner import stage_states

    run_dir = Path(args.run_dir)
    if not RunLayout(run_dir).manifest.exists():
        raise ItermergeError(f"{run_dir}: no manifest.json; not a run directory (or no stage has finished yet)")
    states = stage_states(run_dir, deep=args.deep)
    width = max((len(name) for name, _ in states), default=5)
    for name, state in states:
        print(f"{name:<{width}}  {state}")
    bad = [name for name, state in states if state != "ok" and not state.startswith("no proof")]
    how = "by content" if args.deep else "by existence, size and mtime (content where an mtime changed; --deep: all)"
    print(f"{len(states) - len(bad)} of {len(states)} stages hold, checked {how}")
    if bad:
        print(f"rerun the run's command to redo {bad[0]} and every stage after it", file=sys.stderr)
        raise SystemExit(1)


def _builtin_or_path(name: str) -> Path:
    """A config path, or the name of a config shipped in itermerge/configs (``study`` → configs/study.yaml)."""
    from importlib.resources import files

    path = Path(name)
    if path.exists():
        return path
    shipped = Path(str(files("itermerge") / "configs" / f"{name}.yaml"))
    if shipped.exists():
        return shipped
    raise ItermergeError(f"{name}: no such file, and no built-in config of that name (built-in: demo, demo_quick, "
                         "study, study_reference)")


def cmd_replicate(args: argparse.Namespace) -> None:
    from itermerge.replicates import load_study, parse_seeds, replicate

    path = _builtin_or_path(args.study)
    study = load_study(path, parse_seeds(args.seeds) if args.seeds else None)
    out = Path(args.out) if args.out else Path("runs") / study.name
    print(f"itermerge replicate: {path} — {len(study.regimes)} regime(s) × seeds {list(study.seeds)} → {out}")
    replicate(study, out, prune_caches=args.prune_caches,
              prune_checkpoints=args.prune_checkpoints)
    print(f"aggregate: {out / 'aggregate.json'}")


def cmd_results(args: argparse.Namespace) -> None:
    from itermerge.results import write_results

    command = "itermerge " + " ".join(getattr(args, "argv", None) or ["results"])
    if args.aggregate:
        from itermerge.replicates import aggregate

        if not args.study and not args.task_study and not args.other_study:
            raise ItermergeError("itermerge results --aggregate: name the study directory (--study DIR, "
                                 "--other-study DIR or --task-study DIR)")
        for study in [args.study, *args.other_study, *args.task_study]:
            if study:
                aggregate(study)
    out = write_results(args.out, study=args.study, demo=args.demo, command=command, tasks=args.task_study,
                        others=args.other_study)
    print(f"results: {out}")
