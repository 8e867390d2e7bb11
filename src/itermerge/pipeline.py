"""The paper end to end, top to bottom: Algorithm 1 for T iterations, Algorithm 2's search, the test, the evidence."""

from __future__ import annotations

import dataclasses
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

from itermerge import iteration as it
from itermerge.checkpoint import load_tokenizer, resolve_model
from itermerge.config import RunConfig, as_recorded, to_dict, to_yaml
from itermerge.devices import cpu_precision, placement, settle_precision
from itermerge.errors import ItermergeError
from itermerge.integrity import LOCK_NAME, RunLock
from itermerge.preflight import preflight
from itermerge.prompts import repeated_prompts_note, training_prompts
from itermerge.rundir import Manifest, RunLayout, atomic_write_text
from itermerge.runner import StageRunner

STUDIES = ("alpha", "accuracy", "ensemble", "lambda")
# Sections whose change alters what the finished iterations computed; the others (T, search,
# studies) may change between invocations of the same run.
_TRAINING_SECTIONS = ("seed", "model", "prompts", "sampling", "scorer", "dpo")


def run(cfg: RunConfig, run_dir: str | os.PathLike, force: bool = False, verify: bool = False) -> Path:
    """The whole paper: Alg. 1, the (λ, α) search on dev (Alg. 2 in memory), the chosen merge tested once,
    the evidence (α study, accuracy matrix, merge vs ensemble, λ study), and the report. Resumable."""
    run_dir = Path(run_dir)
    with open_run(cfg, run_dir, force, verify=verify) as runner:
        thetas = algorithm_1(runner, cfg, run_dir)
        theta_b = second_criterion_run(runner, cfg, run_dir) if cfg.studies.lambda_study else None
        choice = search_and_test(runner, cfg, run_dir)
        for at in cfg.search.at:  # the same question for the first T' iterations alone
            search_and_test(runner, cfg, run_dir, at=at)
        run_studies(runner, cfg, run_dir, thetas, choice, theta_b=theta_b)
        if runner.is_main:
            from itermerge.report import write_report

            print(f"report: {write_report(run_dir)}")
    return RunLayout(run_dir).report


def iterate(cfg: RunConfig, run_dir: str | os.PathLike, force: bool = False, accelerator: Any = None,
            verify: bool = False) -> list[Path]:
    """Algorithm 1 on its own: θ1..θT in ``run_dir``, resumable. Returns [θ0, θ1, …, θT]."""
    with open_run(cfg, run_dir, force, accelerator, verify=verify) as runner:
        return algorithm_1(runner, cfg, Path(run_dir))


def algorithm_1(runner: StageRunner, cfg: RunConfig, root: Path, prefix: str = "") -> list[Path]:
    """θ_t from θ_{t−1} on fresh pairs D_t, the reference fixed at θ0, for t = 1..T. Returns [θ0, θ1, …, θT]."""
    theta0 = Path(resolve_model(cfg.model.path))
    tokenizer = load_tokenizer(theta0)
    thetas = [theta0]
    for t in range(1, cfg.iterations + 1):
        files, prev = RunLayout(root).files(t), thetas[-1]
        out, name = files.dir, f"{prefix}{files.dir.name}"
        out.mkdir(parents=True, exist_ok=True)
        # Alg. 1, lines 2-5: sample from π_θ{t−1}, label best vs worst, (θ0's log-probs), train θ_t.
        sample = partial(it.sample_shard, cfg, t, prev, training_prompts(cfg, t))
        label = partial(it.make_pairs, files.prompts, files.samples, tokenizer, cfg, out, t)
        reference = partial(it.reference_shard, cfg, theta0, prev, out, t)
        records = {
            "samples": runner.sharded(f"{name}/samples", sample, partial(it.write_samples, out),
                                      outputs=[files.prompts, files.samples]),
            "pairs": runner(f"{name}/pairs", label, outputs=[files.pairs]),
            "reference": runner.sharded(f"{name}/reference_logprobs", reference,
                                        partial(it.write_reference, out, theta0),
                                        outputs=[files.reference_logprobs]),
            "train": runner(f"{name}/train", partial(it.train, cfg, t, prev, out, runner.accelerator),
                            outputs=[files.model, *([files.adapter] if cfg.dpo.peft is not None else [])],
                            everyone=True),
        }
        runner(f"{name}/metrics", partial(it.write_metrics, out, t, records), outputs=[files.metrics])
        thetas.append(files.model)
    return thetas


def second_criterion_run(runner: StageRunner, cfg: RunConfig, run_dir: Path) -> Path:
    """The λ study's θb: one iteration of Alg. 1 from θ0 labelled by the second criterion (studies/lambda/…)."""
    from itermerge.studies.stages import second_criterion

    root = RunLayout(run_dir).study("lambda") / "second_criterion"
    return algorithm_1(runner, second_criterion(cfg), root, prefix="studies/lambda/second_criterion/")[1]


def search_and_test(runner: StageRunner, cfg: RunConfig, run_dir: Path, *, test: bool = True,
                    reference: str | os.PathLike | None = None, at: int | None = None) -> dict[str, Any]:
    """Algorithm 2 (``search.driver``): θ̄ cached, the (λ, α) grid on dev merged in memory, the paper's rule; then
    the chosen merge written and tested once beside the baselines, and the other operators (``search.operators``).
    ``at`` = T' < T: the same for θ1..θ_T' alone, in search_T{T'}/, the merge kept in memory, no other operators."""
    from itermerge.search import driver

    return driver.search_and_test(runner, driver.run_context(cfg, run_dir, reference, at), test=test)


def run_studies(runner: StageRunner, cfg: RunConfig, run_dir: Path, thetas: list[Path], choice: dict[str, Any] | None,
                *, theta_b: Path | None = None, only: tuple[str, ...] | None = None) -> None:
    """The evidence: the studies switched on in ``cfg.studies`` (or exactly ``only``), each a stage of its own."""
    from itermerge.studies import stages

    wanted = only if only is not None else tuple(
        name for name, on in zip(STUDIES, (cfg.studies.alpha_study, cfg.studies.accuracy_matrix, cfg.studies.ensemble,
                                           cfg.studies.lambda_study)) if on)
    if "ensemble" in wanted and choice is None:
        raise ItermergeError(f"{run_dir}: the ensemble study measures the search's choice; run the search first "
                             "(itermerge search RUN_DIR)")
    layout = RunLayout(run_dir)
    merged = layout.merged if (layout.merged / "config.json").exists() else thetas[-1]
    for name in wanted:
        out, result = layout.study(name), layout.study_result(name)  # its numbers; its plot in PNG beside
        if name == "alpha":
            runner.sharded("studies/alpha", partial(stages.alpha_work, cfg, run_dir, thetas),
                           partial(stages.alpha_finish, cfg, run_dir), outputs=[out])
        elif name == "accuracy":
            runner.sharded("studies/accuracy/sets", partial(stages.accuracy_sets_work, cfg, thetas),
                           partial(stages.accuracy_sets_finish, run_dir), outputs=[out / "sets"])
            runner.sharded("studies/accuracy", partial(stages.accuracy_work, cfg, run_dir, thetas, merged),
                           partial(stages.accuracy_finish, cfg, run_dir, thetas),
                           outputs=[result, result.with_suffix(".png")])
        elif name == "ensemble":
            lam, alpha = choice["lam"], choice["alpha"]
            runner.sharded("studies/ensemble", partial(stages.ensemble_work, cfg, thetas, lam, alpha),
                           partial(stages.ensemble_finish, cfg, run_dir, thetas, lam, alpha),
                           key={"lam": lam, "alpha": alpha}, outputs=[out])
        elif name == "lambda":
            theta_b = theta_b or second_criterion_run(runner, cfg, run_dir)
            runner.sharded("studies/lambda", partial(stages.lambda_work, cfg, thetas, theta_b),
                           partial(stages.lambda_finish, cfg, run_dir, thetas, theta_b),
                           outputs=[result, result.with_suffix(".png")])


# --- the run directory ------------------------------------------------------------------------------------


def open_run(cfg: RunConfig, run_dir: str | os.PathLike, force: bool = False, accelerator: Any = None,
             *, verify: bool = False) -> StageRunner:
    """Create or resume ``run_dir`` and return its stage runner, which holds the directory's lock (one process per
    run directory; ``runner.close()`` or the process's end releases it). A different training config is refused
    unless ``force`` (which starts the run directory over); ``verify`` checks finished stages' files by content."""
    run_dir = Path(run_dir)
    accelerator = accelerator if accelerator is not None else launcher_accelerator(cfg.timeout_minutes)
    lock = None
    if accelerator is None or accelerator.is_main_process:
        preflight(cfg)  # the whole config against itself, before anything is sampled or written
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir).acquire()
        try:
            if RunLayout(run_dir).manifest.exists():
                changed = _changed_training_sections(Manifest(run_dir).data.get("config", {}), cfg)
                if changed and not force:
                    raise ItermergeError(
                        f"{run_dir}: this run was made with a different {', '.join(changed)} section; rerun with the "
                        "same config to resume, choose another run directory, or pass --force to start this one over"
                    )
                if changed:
                    _clear(run_dir)
            atomic_write_text(RunLayout(run_dir).config, to_yaml(cfg))
            manifest = Manifest(run_dir)
            manifest.set_meta("config", to_dict(cfg))
            manifest.set_meta("reference", str(resolve_model(cfg.model.path)))
            _keep_precision(cfg, manifest)
            note = repeated_prompts_note(cfg)
            if note is not None:  # repeats are common in real prompt sets: say so once, and keep it with the run
                print(f"prompts: {note}", flush=True)
                manifest.set_meta("prompts_note", note)
        except BaseException:
            lock.release()
            raise
    runner = StageRunner(run_dir, accelerator, verify=verify, lock=lock)
    runner.barrier()
    if not runner.is_main and "precision" in runner.manifest.data:
        settle_precision(runner.manifest.data["precision"])  # every process computes as the main one measured
    return runner


def _keep_precision(cfg: RunConfig, manifest: Manifest) -> None:
    """``model.dtype: auto`` on a CPU: the precision measured when the run started (``cpu_precision``), kept in the
    manifest and reused on resume, so a run never mixes precisions between its stages."""
    if cfg.model.dtype != "auto" or placement(dataclasses.replace(cfg.model, dtype="float32")).is_cuda:
        return
    recorded = manifest.data.get("precision")
    if recorded is not None:
        settle_precision(recorded)
        return
    record = cpu_precision()
    measured = (f"bf16 {record['bfloat16_gflops']} vs fp32 {record['float32_gflops']} GFLOP/s"
                if "float32_gflops" in record else f"given by {record['given_by']}")
    print(f"precision: {record['dtype']} on {record['cpu']} ({measured})", flush=True)
    manifest.set_meta("precision", record)


def _clear(run_dir: Path) -> None:
    """Everything in ``run_dir`` but its lock file (deleting that would let a second process lock a new one)."""
    for path in run_dir.iterdir():
        if path.name == LOCK_NAME:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _changed_training_sections(recorded: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The training sections in which the recorded config differs from ``cfg`` (settings added since the run was
    made compare as their defaults). The dev and test set sizes do not count where they cannot change the training
    prompts: a built-in task's splits are disjoint by construction; a held-out file's are not (they are cut out of
    the training file, so their size changes what is trained on)."""
    recorded, now = as_recorded(recorded), as_recorded(cfg)

    def part(config: dict[str, Any]) -> dict[str, Any]:
        sections = {k: config.get(k) for k in _TRAINING_SECTIONS}
        prompts = sections.get("prompts")
        if isinstance(prompts, dict) and (prompts.get("source", "task") == "task"
                                          or (prompts.get("dev_path") and prompts.get("test_path"))):
            sections["prompts"] = {k: v for k, v in prompts.items() if k not in ("dev", "test")}
        return sections

    a, b = part(recorded), part(now)
    return [k for k in _TRAINING_SECTIONS if a.get(k) != b.get(k)]


def launcher_accelerator(timeout_minutes: int = 240) -> Any:
    """One Accelerator when launched with several processes (``accelerate launch``), else None; its process group
    (and DeepSpeed's) waits ``timeout_minutes`` before calling a missing process dead."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    os.environ.setdefault("DEEPSPEED_TIMEOUT", str(timeout_minutes))  # read by DeepSpeed's init_distributed
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes))])
    check_launch(accelerator.num_processes, str(accelerator.distributed_type))
    return accelerator


def check_launch(seen: int, distributed_type: str) -> None:
    """Refuse an Accelerator that sees fewer processes than were launched: each would think itself the only one,
    write alone and trip over the others (the second to open the run directory finds it "in use").

    accelerate's DeepSpeed path (ACCELERATE_USE_DEEPSPEED, set by a config with ``distributed_type: DEEPSPEED``)
    finds no accelerator backend on a machine without a GPU, so its state falls back to one process on every rank
    (issue 23 item 13)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if seen == launched:
        return
    where = (f"WORLD_SIZE = {launched} processes were launched, but accelerate's Accelerator sees {seen} "
             f"({distributed_type})")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not _has_cuda():
        raise ItermergeError(
            f"{where}: accelerate's DeepSpeed plugin starts no process group without a GPU, so every process runs "
            "alone. DeepSpeed ZeRO-3 (examples/accelerate_zero3.yaml) needs GPUs; on CPUs launch without the "
            "DeepSpeed config: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N "
            "-m itermerge.cli ..."
        )
    raise ItermergeError(f"{where}: check the launcher's config (num_processes, distributed_type, use_cpu) against "
                         "the machine's devices")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
