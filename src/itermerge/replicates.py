"""Replicates: the same run under several training seeds (and regimes), the dev and test sets shared, aggregated.

A study file names a run config, the seeds, and optionally regimes (named overrides of the run config, e.g. two
learning rates). ``replicate`` runs every (regime, seed) as an ordinary, resumable run directory
``OUT/REGIME/seed_S``; ``aggregate`` reads their test tables back and pools them: each row's mean across seeds with
a t interval, the merge − baseline difference pooled over seeds prompt by prompt (``maths.crossed``: the seeds share
their test prompts), and each seed's (λ, α). Nothing is re-evaluated by the aggregation.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from itermerge.across import across_regimes, pool_rows
from itermerge.config import RunConfig, from_dict
from itermerge.config.parse import read_yaml
from itermerge.config.study import Primary, parse_primary
from itermerge.errors import ItermergeError
from itermerge.provenance import provenance
from itermerge.pruning import prune_weights, pruned
from itermerge.rundir import ReplicateLayout, RunLayout, SearchLayout, atomic_write_json

# the merge is compared with the best θt on dev (early stopping), θT, ExPO, the uniform average and θ0
BASELINES = ("best", "T", "expo", "uniform", 0, "learned")  # "learned": search/operators.json's fitted k_t


@dataclasses.dataclass(frozen=True)
class Study:
    """A study file: ``run`` (a run config, inline or a path), ``seeds``, ``regimes`` {name: overrides}, and the
    pre-declared ``primary`` endpoint (``config.study.Primary``; None when the file declares none)."""

    name: str
    run: dict[str, Any]
    seeds: tuple[int, ...]
    regimes: dict[str, dict[str, Any]]
    primary: Primary | None = None
    across: str | None = None  # the regime every other is compared with, seed by seed (itermerge.across)

    def configs(self) -> dict[str, dict[int, RunConfig]]:
        """{regime: {seed: RunConfig}}: every replica of a regime shares the dev and test prompts of the run's own
        seed (its evaluation prompts are fixed before the seed changes); training and sampling follow the seed."""
        out = {}
        for regime, overrides in self.regimes.items():
            base = from_dict(_merged(self.run, overrides), where=f"{self.name}: regime {regime}")
            out[regime] = {seed: dataclasses.replace(base, seed=seed) for seed in self.seeds}
        return out


def load_study(path: str | os.PathLike, seeds: Sequence[int] | None = None) -> Study:
    """A study file, or a plain run config (one regime, "default"); ``seeds`` replaces the file's."""
    path = Path(path)
    data = read_yaml(path, None)
    if "run" in data:
        run = data["run"]
        if isinstance(run, str):
            run = read_yaml((path.parent / run) if not Path(run).is_absolute() else Path(run), None)
        unknown = sorted(set(data) - {"name", "run", "seeds", "regimes", "primary", "across"})
        if unknown:
            raise ItermergeError(f"{path}: unknown study keys {unknown}; a study has name, run, seeds, regimes, "
                                 "primary and across")
    else:
        run = data
    if not isinstance(run, dict):
        raise ItermergeError(f"{path}: run is {type(run).__name__}; give the run config as a mapping or a file path")
    regimes = (data.get("regimes") if "run" in data else None) or {"default": {}}
    if not isinstance(regimes, dict) or not all(isinstance(v, dict) for v in regimes.values()):
        raise ItermergeError(f"{path}: regimes must map a name to config overrides, e.g. "
                             "{lr-1e-5: {dpo: {learning_rate: 1.0e-5}}}")
    default = data.get("seeds", [run.get("seed", 0)]) if "run" in data else [run.get("seed", 0)]
    chosen = list(seeds) if seeds is not None else default
    if not chosen or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in chosen):
        raise ItermergeError(f"{path}: seeds = {chosen!r}; give whole numbers >= 0, e.g. --seeds 0,1,2,3,4")
    if len(set(chosen)) != len(chosen):
        raise ItermergeError(f"{path}: seeds = {chosen!r} repeats a seed; replicas must differ")
    study = Study(str(data.get("name") or run.get("name") or path.stem), run, tuple(chosen),
                  {str(k): v for k, v in regimes.items()})
    configs = study.configs()  # every replica's config is checked before anything runs
    first = {regime: next(iter(by_seed.values())) for regime, by_seed in configs.items()}
    searched = {regime: (c.iterations, *c.search.at) for regime, c in first.items()}
    metrics = sorted({m for c in first.values() for m in c.evaluation.metrics()})
    primary = parse_primary(data.get("primary") if "run" in data else None, str(path), searched, metrics)
    across = data.get("across") if "run" in data else None
    if across is not None and (str(across) not in study.regimes or len(study.regimes) < 2):
        raise ItermergeError(f"{path}: across = {across!r}: name the regime the others are compared with, one of "
                             f"{', '.join(study.regimes)} (a study of at least two regimes)")
    return dataclasses.replace(study, primary=primary, across=None if across is None else str(across))


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` (inclusive) or a mix: ``"0-2,7"`` → [0, 1, 2, 7]."""
    seeds = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
        except ValueError:
            raise ItermergeError(f"--seeds {text!r}: {part!r} is not a seed or a range; write e.g. 0,1,2 or 0-4") \
                from None
    return seeds


def replicate(study: Study, out: str | os.PathLike, *, prune_caches: bool = False,
              prune_checkpoints: bool = False) -> Path:
    """Run every (regime, seed) of ``study`` into ``out/REGIME/seed_S`` (each resumable; finished ones are skipped
    by their stages), then ``aggregate``. To keep a long study within the disk, ``prune_caches`` deletes each
    finished run's cache/ (θ̄, recomputed on demand), ``prune_checkpoints`` its weights too (``pruning``)."""
    from itermerge.pipeline import run

    out, main = Path(out), int(os.environ.get("RANK", "0")) == 0  # under `accelerate launch`, one process writes
    out.mkdir(parents=True, exist_ok=True)
    configs, here = study.configs(), provenance()
    if main:
        write_study_record(out, study, here)
    total, k = sum(len(v) for v in configs.values()), 0
    for regime, by_seed in configs.items():
        for seed, cfg in by_seed.items():
            k += 1
            run_dir = ReplicateLayout(out).run(regime, seed)
            print(f"[{k}/{total}] {regime}, seed {seed} → {run_dir}", flush=True)
            if pruned(run_dir, cfg):
                print("  finished earlier; its weights were pruned (pruned.json), its records kept", flush=True)
                continue
            start, before = time.time(), _manifest_text(run_dir)
            run(cfg, run_dir)
            if main:
                _note_time(run_dir, time.time() - start)
                _note_provenance(run_dir, here, changed=_manifest_text(run_dir) != before)
                write_study_record(out, study, here)
                if (prune_caches or prune_checkpoints) and (run_dir / "cache").is_dir():
                    shutil.rmtree(run_dir / "cache")
                if prune_checkpoints:
                    prune_weights(run_dir, cfg)
    if main:
        aggregate(out)
    return out


def machine() -> str:
    """This machine in words, for the results page: CPU or GPU, cores, library versions."""
    import platform

    import torch
    import transformers

    device = (f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
              else "no GPU")
    return (f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPU cores, {device}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


def write_study_record(out: Path, study: Study, here: dict[str, Any]) -> None:
    """study.json: the study as run (its primary endpoint included), this invocation's machine, code commit and
    package versions, and each run's own record of them (``runs``: {"REGIME/seed_S": [{commit, versions}, …]}, one
    entry per invocation that changed the run, so a study resumed under other code says which run ran on what)."""
    runs = {}
    for path in sorted(out.glob("*/seed_*/provenance.json")):
        runs[f"{path.parent.parent.name}/{path.parent.name}"] = json.loads(path.read_text())
    atomic_write_json(ReplicateLayout(out).record, {
        "name": study.name, "seeds": list(study.seeds), "run": study.run, "regimes": study.regimes,
        "primary": None if study.primary is None else study.primary.to_dict(), "across": study.across,
        "machine": machine(), **here,
        "runs": runs})


def _manifest_text(run_dir: Path) -> str | None:
    path = RunLayout(run_dir).manifest
    return path.read_text() if path.exists() else None


def _note_provenance(run_dir: Path, here: dict[str, Any], *, changed: bool) -> None:
    """Append this code's commit and versions to run_dir/provenance.json when this invocation changed the run (a
    finished run that a resumed study only skipped keeps the record of the code that made it)."""
    path = RunLayout(run_dir).provenance
    entries = json.loads(path.read_text()) if path.exists() else []
    if (changed or not entries) and (not entries or entries[-1] != here):
        atomic_write_json(path, [*entries, here])


def _note_time(run_dir: Path, seconds: float) -> None:
    """Wall seconds of this invocation, appended to run_dir/wall_time.json (a resumed run has several)."""
    path = RunLayout(run_dir).wall_time
    spans = json.loads(path.read_text()) if path.exists() else []
    atomic_write_json(path, [*spans, round(seconds, 1)])


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in section by section (nested mappings merge, anything else replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- aggregation ------------------------------------------------------------------------------------------


def aggregate(out: str | os.PathLike) -> dict[str, Any]:
    """out/aggregate.json from every out/REGIME/seed_S/search*/test.json: for each regime and each search (T, and
    every T' of search.at), each row's mean and 95% t interval across seeds per metric, the merge − baseline
    paired differences pooled over seeds (crossed bootstrap over seeds × the shared prompts), and each seed's choice."""
    out = Path(out)
    regimes = sorted(p for p in out.iterdir() if p.is_dir() and any(p.glob("seed_*/search/test.json")))
    if not regimes:
        raise ItermergeError(f"{out}: no REGIME/seed_S/search/test.json; run `itermerge replicate` first")
    result = {"study": out.name, "regimes": {}}
    for regime in regimes:
        runs = sorted(regime.glob("seed_*"), key=lambda p: int(p.name.split("_")[1]))
        searches = sorted({t.parent.name for r in runs for t in r.glob("search*/test.json")}, key=_search_order)
        result["regimes"][regime.name] = {
            "seeds": [int(r.name.split("_")[1]) for r in runs],
            "wall_seconds": {r.name: _wall(r) for r in runs},
            "searches": {name: aggregate_search([r / name for r in runs if SearchLayout(r / name).test.exists()])
                         for name in searches},
        }
    record = ReplicateLayout(out).record
    across = json.loads(record.read_text()).get("across") if record.exists() else None
    if across is not None:  # the study compares its regimes with this one, seed by seed (itermerge.across)
        result["across"] = across_regimes(out, across, [r.name for r in regimes])
    atomic_write_json(ReplicateLayout(out).aggregate, result)
    return result


def _search_order(name: str) -> tuple[int, int]:
    return (0, 0) if name == "search" else (1, int(name[len("search_T"):]))


def _wall(run_dir: Path) -> float | None:
    """Seconds the run's stages took, from its manifest (invocations' wall time where recorded)."""
    path = RunLayout(run_dir).wall_time
    return round(sum(json.loads(path.read_text())), 1) if path.exists() else None


def aggregate_search(search_dirs: Sequence[Path]) -> dict[str, Any]:
    """One search (``search`` or ``search_T3``) across seeds: rows, pooled paired differences, choices.

    A pooled difference is ``crossed_paired_difference`` when every seed holds the same number of test prompts (the
    study's seeds share them): its interval speaks about new seeds and new prompts, with the nested (hierarchical)
    bootstrap and the t interval over seeds beside it; else the hierarchical ``pooled_paired_difference``."""
    from itermerge.maths.paired import mean_and_ci, minimum_detectable_effect

    tests = [_with_operators(d, json.loads(SearchLayout(d).test.read_text())) for d in search_dirs]
    choices = [json.loads(SearchLayout(d).choice.read_text()) for d in search_dirs]
    T = max(m["t"] for m in tests[0]["models"] if isinstance(m["t"], int))
    rows = []
    for m in tests[0]["models"]:
        per_seed = [_row(test, m["t"]) for test in tests]
        metrics = {}
        for name in m["metrics"]:
            values = [r["metrics"][name]["value"] for r in per_seed if r is not None and name in r["metrics"]]
            metrics[name] = {**mean_and_ci(values), "per_seed": values}
        rows.append({"t": m["t"], "name": _generic_name(m, T), "metrics": metrics})
    def pooled(a_key: Any, b_key: Any) -> dict[str, Any] | None:
        if any(_row(test, a_key) is None or _row(test, b_key) is None for test in tests):
            return None
        metrics = pool_rows([_row(t, a_key) for t in tests], [_row(t, b_key) for t in tests])
        names = {r["t"]: r["name"] for r in rows}
        return {"a": a_key, "b": b_key, "a_name": names[a_key], "b_name": names[b_key], "metrics": metrics}

    paired = [p for b in BASELINES if (p := pooled("merged", T if b == "T" else b)) is not None]
    # Alg. 1's own record: θT against θ0 (did iterating help?) and against θ_{T−1} (did the last step hurt?)
    iterations = [p for b in (0, T - 1) if b != T and (p := pooled(T, b)) is not None]
    n_test = tests[0]["models"][0]["metrics"].get("accuracy", {}).get("n")
    design = None
    if n_test and n_test >= 2:
        discordant = _discordant(tests, T)
        design = {"test_prompts": n_test, "seeds": len(tests), "discordant_merge_vs_T": discordant,
                  "mde_one_seed": minimum_detectable_effect(n_test, discordant=discordant) if discordant else
                  minimum_detectable_effect(n_test, baseline=0.5),
                  "mde_rule": mde_under_rule(next((p for p in paired if p["b"] == T), {}).get("metrics", {})
                                             .get("accuracy"))}
    return {
        "T": T, "seeds": [int(d.parent.name.split("_")[1]) for d in search_dirs], "rows": rows, "paired": paired,
        "iterations": iterations,
        "choices": [{"lam": c["lam"], "alpha": c["alpha"], "expo_alpha": (c.get("expo") or {}).get("alpha"),
                     "best_t": (_row(test, "best") or {}).get("same_as"),
                     "expo_is_theta_T": (_row(test, "expo") or {}).get("same_as") == T}
                    for c, test in zip(choices, tests)],
        "design": design,
    }


def mde_under_rule(d: dict[str, Any] | None) -> dict[str, Any] | None:
    """The difference the verdict rule finds with power 0.8, from a pooled comparison's observed spread over seeds
    (``per_seed``) and its crossed standard error (``maths.crossed.pooled_minimum_detectable_effect``); None with one
    seed or no spread."""
    from itermerge.maths.crossed import pooled_minimum_detectable_effect

    d = d or {}
    per_seed = d.get("per_seed") or []
    sd = statistics.stdev(per_seed) if len(per_seed) >= 2 else 0.0
    if sd <= 0:
        return None
    mde = pooled_minimum_detectable_effect(sd, len(per_seed), crossed_stderr=d.get("stderr") or None)
    return {"seed_sd": sd, **mde}


def _with_operators(search_dir: Path, test: dict[str, Any]) -> dict[str, Any]:
    """test.json's rows and, where search/operators.json tested other operators beside this very merge on the same
    split, each operator's row keyed by its name (an operator that shares a row's key, ExPO, is that row already)."""
    path = SearchLayout(search_dir).operators
    record = json.loads(path.read_text()) if path.exists() else {}
    if [record.get(k) for k in ("split", "eval_fingerprint", "lam", "alpha")] != [
            test.get(k) for k in ("split", "eval_fingerprint", "lam", "alpha")]:
        return test
    keys = {m["t"] for m in test["models"]}
    extra = [{"t": o["operator"], "name": o["title"], "metrics": o["metrics"]} for o in record.get("operators", [])
             if o["metrics"] is not None and o["operator"] not in keys]
    return {**test, "models": [*test["models"], *extra]}


def _row(test: dict[str, Any], key: Any) -> dict[str, Any] | None:
    return next((m for m in test["models"] if m["t"] == key), None)


def _generic_name(m: dict[str, Any], T: int) -> str:
    """A row's name without its seed's numbers: "Merged (chosen λ, α)", "ExPO (chosen α)"."""
    if m["t"] == "merged":
        return "Merged (λ, α chosen per seed)"
    if m["t"] == "expo":
        return "ExPO (λ = 0, α chosen per seed)"
    if m["t"] == "best":
        return "Best θt on dev (t chosen per seed)"
    if m["t"] == "learned":
        return "Learned k_t (fitted per seed on half of dev)"
    return m["name"]


def _discordant(tests: Sequence[dict[str, Any]], T: int) -> float | None:
    """Share of test prompts on which the merge and θT disagree on accuracy, over all seeds (McNemar's ψ)."""
    total = differ = 0
    for test in tests:
        a = (_row(test, "merged") or {}).get("metrics", {}).get("accuracy", {}).get("items")
        b = (_row(test, T) or {}).get("metrics", {}).get("accuracy", {}).get("items")
        if a is None or b is None:
            return None
        total += len(a)
        differ += sum(x != y for x, y in zip(a, b))
    return differ / total if total and differ else None
