"""The paper end to end: Algorithm 1 for T iterations, then Algorithm 2's search, the merge, the evidence, the report."""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path

from itermerge import iteration as it
from itermerge.checkpoint import load_tokenizer, resolve_model
from itermerge.config import RunConfig, to_dict, to_yaml
from itermerge.errors import ItermergeError
from itermerge.rundir import Manifest, atomic_write_text

# Sections whose change alters what the finished iterations computed; the others (T, search,
# studies) may change between invocations of the same run.
_TRAINING_SECTIONS = ("seed", "model", "prompts", "sampling", "scorer", "dpo")


def _training_part(config: dict) -> dict:
    """The settings that decide what the iterations computed (the dev-set size does not)."""
    part = {k: config.get(k) for k in _TRAINING_SECTIONS}
    if isinstance(part.get("prompts"), dict):
        part["prompts"] = {k: v for k, v in part["prompts"].items() if k != "dev"}
    return part


def open_run(cfg: RunConfig, run_dir: str | Path, force: bool = False) -> Manifest:
    """Create or resume ``run_dir``; a different training config is refused unless ``force`` (which starts over)."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if manifest_path.exists():
        recorded = _training_part(Manifest(run_dir).data.get("config", {}))
        now = _training_part(json.loads(json.dumps(to_dict(cfg))))  # as recorded: tuples become lists
        changed = [k for k in _TRAINING_SECTIONS if recorded.get(k) != now.get(k)]
        if changed and not force:
            raise ItermergeError(
                f"{run_dir}: this run was made with a different {', '.join(changed)} section; rerun with the same "
                "config to resume, choose another run directory, or pass --force to start this one over"
            )
        if changed:
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    manifest = Manifest(run_dir)
    manifest.set_meta("config", to_dict(cfg))
    return manifest


def stage(manifest: Manifest, name: str, fn, accelerator=None, everyone: bool = False):
    """Run ``fn`` unless the manifest says ``name`` finished; record it only once its files are complete.

    Under a distributed launch the main process runs the stage while the others wait, except a stage
    that ``everyone`` runs (DPO training); only the main process writes the manifest.
    """
    if manifest.done(name):
        return manifest.get(name)
    main = accelerator is None or accelerator.is_main_process
    if main:
        print(f"── {name}", flush=True)
    info = (fn() or {}) if main or everyone else None
    if main:
        manifest.record(name, info)
    if accelerator is not None:
        accelerator.wait_for_everyone()
        manifest.reload()  # what the main process recorded
    return manifest.get(name)


def _accelerator():
    """One Accelerator when launched with several processes (``accelerate launch``), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator()


def iterate(cfg: RunConfig, run_dir: str | Path, force: bool = False, accelerator=None) -> list[Path]:
    """Algorithm 1: θ_t from θ_{t−1} on fresh pairs D_t, the reference fixed at θ0. Returns [θ0, θ1, …, θT]."""
    run_dir = Path(run_dir)
    accelerator = accelerator or _accelerator()
    if accelerator is None or accelerator.is_main_process:
        manifest = open_run(cfg, run_dir, force)
        theta0 = Path(resolve_model(cfg.model.path))
        manifest.set_meta("reference", str(theta0))
    if accelerator is not None:
        accelerator.wait_for_everyone()
        manifest, theta0 = Manifest(run_dir), Path(resolve_model(cfg.model.path))
    tokenizer = load_tokenizer(theta0)
    thetas = [theta0]
    for t in range(1, cfg.iterations + 1):
        out, prev, key = run_dir / f"iter_{t:02d}", thetas[-1], f"iter_{t:02d}"
        out.mkdir(exist_ok=True)
        # Alg. 1, lines 2-5: sample from π_θ{t−1}, label best vs worst, (θ0's log-probs), train θ_t.
        run_stage = partial(stage, manifest, accelerator=accelerator)
        stages = {
            "samples": run_stage(f"{key}/samples", partial(it.sample_and_score, cfg, t, prev, it.training_prompts(cfg, t), out)),
            "pairs": run_stage(f"{key}/pairs", partial(it.make_pairs, out / "prompts.jsonl", out / "samples.jsonl", tokenizer, cfg, out, t)),
            "reference": run_stage(f"{key}/reference_logprobs", partial(it.reference_logprobs, cfg, theta0, prev, out, t)),
            "train": run_stage(f"{key}/train", partial(it.train, cfg, t, prev, out, accelerator), everyone=True),
        }
        run_stage(f"{key}/metrics", partial(it.write_metrics, out, t, stages))
        thetas.append(out / "model")
    return thetas


def run(cfg: RunConfig, run_dir: str | Path, force: bool = False) -> Path:
    """The whole paper: Alg. 1, the (λ, α) search on dev (Alg. 2 in memory), the chosen merge tested once,
    the evidence (α study, accuracy matrix, merge vs ensemble, λ study), and the report. Resumable."""
    from itermerge import studies
    from itermerge.report import write_report
    from itermerge.search import finalize_run, search_run

    run_dir = Path(run_dir)
    accelerator = _accelerator()
    thetas = iterate(cfg, run_dir, force, accelerator)
    if accelerator is not None and not accelerator.is_main_process:
        return run_dir / "report.md"  # the rest (search, merge, studies) runs on the main process
    manifest = Manifest(run_dir)
    choice = stage(manifest, "search", partial(_search_record, search_run, run_dir, cfg))
    stage(manifest, "test_eval", partial(_test_record, finalize_run, run_dir, cfg))
    lam, alpha = choice["lam"], choice["alpha"]
    if cfg.studies.alpha_study:
        stage(manifest, "studies/alpha", partial(studies.alpha_study, cfg, run_dir, thetas))
    if cfg.studies.accuracy_matrix:
        stage(manifest, "studies/accuracy", partial(studies.accuracy_matrix, cfg, run_dir, thetas, run_dir / "merged"))
    if cfg.studies.ensemble:
        stage(manifest, "studies/ensemble", partial(studies.ensemble_study, cfg, run_dir, thetas, lam, alpha))
    if cfg.studies.lambda_study:
        stage(manifest, "studies/lambda", partial(studies.lambda_study, cfg, run_dir, thetas))
    report = write_report(run_dir)
    print(f"report: {report}")
    return report


def _search_record(search_run, run_dir: Path, cfg: RunConfig) -> dict:
    choice = search_run(run_dir, cfg.evaluation, cfg.search)
    return {"lam": choice["lam"], "alpha": choice["alpha"]}


def _test_record(finalize_run, run_dir: Path, cfg: RunConfig) -> dict:
    record = finalize_run(run_dir, cfg.evaluation)
    return {"lam": record["lam"], "alpha": record["alpha"]}
