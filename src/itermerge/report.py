"""report.md and its plots, from the files a run wrote (nothing is re-evaluated)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any

from itermerge.errors import ItermergeError
from itermerge.plots import annotate_apart, pyplot, save_figure
from itermerge.records import read_records
from itermerge.rundir import IterationLayout, RunLayout, atomic_write_text
from itermerge.search.selection import LOWER_IS_BETTER, pareto_frontier
from itermerge.tables import check_section, fmt_ci, fmt_metric, metrics_table, operators_table, paired_table


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``report.md`` (and ``search/pareto.png``) for a run directory; sections without their files are skipped."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ItermergeError(f"{run_dir}: no such run directory")
    layout = RunLayout(run_dir)
    search = layout.search()
    choice = _json(search.choice)
    parts = [f"# itermerge report: {run_dir.name}\n"]
    if choice is None:
        parts.append("No search results (search/choice.json is absent): run `itermerge search RUN_DIR`.\n")
    else:
        stamp = {"split": choice["split"], "eval_fingerprint": choice["eval_fingerprint"]}
        checkpoints = sorted(
            (r for r in read_records(search.checkpoints) if _same(r, stamp)), key=lambda r: r["t"]
        )
        considered = {(lam, alpha) for lam, alpha in choice["eligible"]} | {
            (e["lam"], e["alpha"]) for e in choice["excluded"]
        }
        points = [
            p for p in read_records(search.points) if _same(p, stamp) and (p["lam"], p["alpha"]) in considered
        ]
        parts += [_choice_section(choice), _dev_table(checkpoints, choice)]
        test = _json(search.test)
        if test is not None:
            parts.append(_test_table(test))
        parts.append(_operators_section(_json(search.operators), choice))
        pareto = search.pareto
        plot_pareto(points, checkpoints, choice, pareto)
        parts.append(f"## Reward against capability (Fig. 5)\n\n![pareto]({pareto.relative_to(run_dir)})\n\n"
                     "Each point is one (λ, α) merge evaluated on the dev split; colour is λ, the label α; lines join "
                     "points of equal λ in order of α. The dashed line is the Pareto frontier, the star the choice.\n")
        parts.append(_timing_section(points, checkpoints))
    for sub in (s for s in layout.searches() if s.at is not None):
        test, choice_at = _json(sub.test), _json(sub.choice)
        if test is not None and choice_at is not None:
            T = sub.at
            parts.append(f"## At T = {T}: the first {T} iterations alone ({sub.dir.name}/)\n\n"
                         f"Rule on dev: {choice_at['reason']}.\n\n"
                         + _test_table(test).split("\n\n", 1)[1])
    parts += [_studies_section(run_dir), _iterations_section(run_dir), _config_section(run_dir)]
    out = layout.report
    atomic_write_text(out, "\n".join(p for p in parts if p))
    return out


# --- tables ------------------------------------------------------------------------------------------


def _choice_section(choice: dict[str, Any]) -> str:
    gain = choice["reward_gain"]
    if gain.get("paired"):
        z = f" (95% CI {fmt_ci(gain)}, paired over {gain['n']} prompts, {gain['method']}, p = {gain['p_value']:.3g})"
    else:
        z = "" if gain.get("z") is None else f", {gain['z']:.1f} unpaired standard errors"
    expo = choice.get("expo")
    expo = "" if expo is None else f"ExPO by the same rule (λ = 0): α = {expo['alpha']:g}.\n\n"
    best = choice.get("best_checkpoint")
    if best is not None:
        expo += (f"Best θt on dev by the same rule (early stopping, the test table's \"best θt on dev\"): "
                 f"θ{best['t']}, {best['reason']}.\n\n")
    kept = ("No merge met the rule with more reward than θT, so the chosen model is θT itself.\n\n"
            if (choice["lam"], choice["alpha"]) == (0.0, 0.0) else "")
    return (
        f"## Chosen merge: λ = {choice['lam']:g}, α = {choice['alpha']:g}\n\n"
        f"Weights k_1..k_T (eq. 10): {', '.join(f'{k:.4g}' for k in choice.get('weights') or [])}.\n\n"
        f"Rule: {choice['reason']}.\n\n"
        f"{kept}Gain in {choice['rule']['reward']} over θT: {gain['value']:+.4g}{z}.\n\n{expo}"
    )


def _dev_table(checkpoints: list[dict[str, Any]], choice: dict[str, Any]) -> str:
    rows = [(c["name"], c) for c in checkpoints]
    base = next((c for c in checkpoints if c.get("same_as")), None)
    rows.append((f"Merged (λ={choice['lam']:g}, α={choice['alpha']:g})", choice["chosen"]))
    return f"## Table 2 style, {choice['split']} split (the search's)\n\n" + metrics_table(rows, base)


def _test_table(test: dict[str, Any]) -> str:
    """Every row of test.json; ExPO reads "= θT" where its dev choice is α = 0 (it is θT then), in both tables."""
    last = [m for m in test["models"] if isinstance(m["t"], int)]
    base = max(last, key=lambda m: m["t"]) if last else None
    expo_is_T = any(m["t"] == "expo" and base is not None and m.get("same_as") == base["t"] for m in test["models"])
    rows = [(m["name"], {**m, "equals": "θT"} if m["t"] == "expo" and expo_is_T else m) for m in test["models"]]
    paired = paired_table([{**p, "equals": "θT"} if p["b"] == "expo" and expo_is_T else p
                           for p in test.get("paired") or []])
    paired = "" if not paired else (
        "\nThe chosen merge against each row on the same prompts (difference of means; 95% interval and p: exact "
        "McNemar / Newcombe for 0/1 scores, paired bootstrap otherwise):\n\n" + paired)
    return (f"## Table 2 style, {test['split']} split (measured once, after the choice)\n\n"
            + metrics_table(rows, base) + paired)


def _operators_section(record: dict[str, Any] | None, choice: dict[str, Any]) -> str:
    """search/operators.json: each other operator's value chosen on dev by the rule, tested once beside the merge
    (when it was compared with this choice, by these evaluators)."""
    if record is None or [record[k] for k in ("lam", "alpha", "eval_fingerprint")] != [
            choice[k] for k in ("lam", "alpha", "eval_fingerprint")]:
        return ""
    why = "\n".join(f"- {o['title']}: {o['dev']['reason']}." for o in record["operators"])
    return ("## Other merge operators (dev-chosen, tested once)\n\n"
            "Each operator's value chosen on dev by the same rule against θT, then measured once on "
            f"{record['split']}; the last columns are the operator minus the chosen paper merge, paired prompt by "
            "prompt (95% interval, p). TIES and DARE sparsify each θ_t − θ0, then weight it with the search's "
            f"λ = {record['lam']:g}, α = {record['alpha']:g}.\n\n" + operators_table(record) + "\nOn dev:\n\n"
            + why + "\n" + "".join(check_section(o) for o in record["operators"] if o["dev"].get("check")))



def _timing_section(points: list[dict[str, Any]], checkpoints: list[dict[str, Any]]) -> str:
    """Mean seconds per search point, by phase, as recorded."""
    if not points:
        return ""
    phases = sorted({k for p in points for k in p.get("seconds", {})}, key=lambda k: (k != "merge", k != "eval", k))
    rows = []
    for k in phases:
        values = [p["seconds"].get(k, 0.0) for p in points]
        rows.append(f"| {k} | {statistics.mean(values):.3f} | {statistics.median(values):.3f} |")
    total = sum(p["seconds"].get("merge", 0) + p["seconds"].get("eval", 0) for p in points)
    return ("## Timings\n\nSeconds per search point over "
            f"{len(points)} points ({total:.1f} s in all; `eval` includes the phases below it; the first point "
            "also pays warm-up, hence the median):\n\n"
            "| phase | mean s | median s |\n|---|---|---|\n" + "\n".join(rows) + "\n")


# --- the Fig. 5 plot -------------------------------------------------------------------------------


ALPHA_AXIS = "α"  # the x axis when the rule has no capability metric and no KL was measured


def plot_pareto(
    points: list[dict[str, Any]], checkpoints: list[dict[str, Any]], choice: dict[str, Any], out: Path
) -> None:
    """Reward (y) against each capability metric (x, one panel each, plus KL when measured); with neither, reward
    against α, one line per λ."""
    plt = pyplot()
    reward = choice["rule"]["reward"]
    axes_names = list(choice["rule"]["capability"])
    if points and "kl" in points[0]["metrics"] and "kl" not in axes_names:
        axes_names.append("kl")
    axes_names = axes_names or [ALPHA_AXIS]
    lams = sorted({p["lam"] for p in points})
    # Categorical colours (tab10) stay distinguishable on white, unlike the light end of viridis.
    cmap = plt.get_cmap("tab10" if len(lams) <= 10 else "viridis")
    colour = {lam: cmap(i if len(lams) <= 10 else i / (len(lams) - 1)) for i, lam in enumerate(lams)}
    alphas = sorted({p["alpha"] for p in points})
    size = {a: 4 + 5 * i / max(1, len(alphas) - 1) for i, a in enumerate(alphas)}  # α read off a line without text
    fig, axes = plt.subplots(1, len(axes_names), figsize=(5.2 * len(axes_names), 4.4), squeeze=False)
    placed: list[tuple[Any, list[tuple[float, float, str, Any]]]] = []
    for ax, cap in zip(axes[0], axes_names):
        def xy(p: dict[str, Any], cap: str = cap) -> tuple[float, float]:
            x = p["alpha"] if cap == ALPHA_AXIS else p["metrics"][cap]["value"]
            return x, p["metrics"][reward]["value"]

        def err(p: dict[str, Any], cap: str = cap) -> tuple[float, float]:
            ex = 0.0 if cap == ALPHA_AXIS else p["metrics"][cap]["stderr"] or 0.0
            return ex, p["metrics"][reward]["stderr"] or 0.0

        labels: list[tuple[float, float, str, Any]] = []  # placed apart at the end: frontier first, then the rest
        for lam in lams:
            line = sorted((p for p in points if p["lam"] == lam), key=lambda p: p["alpha"])
            ax.plot([xy(p)[0] for p in line], [xy(p)[1] for p in line], "-", color=colour[lam], alpha=0.5, lw=1)
            for p in line:
                (x, y), (ex, ey) = xy(p), err(p)
                ax.errorbar(x, y, xerr=ex, yerr=ey, fmt="o", color=colour[lam], ecolor="0.85", elinewidth=0.8,
                            ms=size[p["alpha"]], zorder=3)
        on_frontier: list[int] = []
        if cap != ALPHA_AXIS:
            on_frontier = pareto_frontier(points, reward, cap)
            frontier = [points[i] for i in on_frontier]
            ax.plot([xy(p)[0] for p in frontier], [xy(p)[1] for p in frontier], "k--", lw=1.5,
                    label="Pareto frontier", zorder=2)
            for c in checkpoints:
                if c.get("same_as"):
                    continue  # θT is the λ = 0, α = 0 point
                if cap in c["metrics"] and reward in c["metrics"]:
                    ax.plot(*xy(c), "s", color="0.55", ms=6, zorder=3)
                    labels.append((*xy(c), c["name"], "0.4"))
            ax.plot([], [], "s", color="0.55", label="θ0..θT−1")
        rest = [i for i in range(len(points)) if i not in on_frontier]
        labels[:0] = [(*xy(points[i]), f"λ={points[i]['lam']:g} α={points[i]['alpha']:g}", colour[points[i]["lam"]])
                      for i in on_frontier]
        labels += [(*xy(points[i]), f"α={points[i]['alpha']:g}", colour[points[i]["lam"]]) for i in rest]
        chosen = {"alpha": choice["alpha"], "metrics": choice["chosen"]["metrics"]}
        ax.plot(*xy(chosen), "*", color="crimson", ms=18, mec="k", zorder=4,
                label=f"chosen λ={choice['lam']:g}, α={choice['alpha']:g}")
        for lam in lams:
            ax.plot([], [], "o", color=colour[lam], label=f"λ={lam:g}")
        ax.set_xlabel(f"{cap} ({choice['split']})" + (" — lower is better" if cap in LOWER_IS_BETTER else ""))
        ax.set_ylabel(f"{reward} ({choice['split']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", title="marker size grows with α", title_fontsize=7)
        placed.append((ax, labels))
    against = "α (no capability metric)" if axes_names == [ALPHA_AXIS] else "capability"
    fig.suptitle(f"Merges of θ0..θT: {reward} against {against} (θT = λ 0, α 0)", fontsize=10)
    fig.tight_layout()
    for ax, labels in placed:  # after the layout: label boxes are measured where they will be drawn
        annotate_apart(ax, labels)
    save_figure(fig, out)


# --- what other stages wrote ----------------------------------------------------------------------------


def _studies_section(run_dir: Path) -> str:
    """The induced-reward and ensemble studies, when their JSON exists: numbers tabulated, their PNG shown."""
    # studies/NAME/NAME.json: a study's result (the λ study's θb run lies deeper, under second_criterion/).
    studies = RunLayout(run_dir).studies
    files = sorted(studies.glob("*/*.json")) if studies.is_dir() else []
    if not files:
        return ""
    out = ["## Studies\n"]
    for path in files:
        data = _json(path)
        rel = path.relative_to(run_dir)
        out.append(f"### {path.stem} (`{rel}`)\n")
        if isinstance(data, dict) and data.get("what"):
            out.append(f"{data['what']}.\n")
        out.append(_study_numbers(data))
        png = path.with_suffix(".png")
        if png.exists():
            out.append(f"![{path.stem}]({png.relative_to(run_dir)})\n")
    return "\n".join(out)


def _study_numbers(data: Any) -> str:
    if not isinstance(data, dict):
        return ""
    grid_name = next((g for g in ("alpha", "lambda") if isinstance(data.get(g), list)), None)
    if grid_name and isinstance(data.get("series"), dict):  # α / λ study: mean ± s.e. per grid point
        series = data["series"]
        lines = [f"| {grid_name} | " + " | ".join(series) + " |", "|---" * (len(series) + 1) + "|"]
        for i, g in enumerate(data[grid_name]):
            cells = [fmt_metric({"value": s["mean"][i], "stderr": s["sem"][i]}) for s in series.values()]
            lines.append(f"| {g:g} | " + " | ".join(cells) + " |")
        corr = [f"{n}: r = {s['pearson_r']:.3f}, p = {s['p_value']:.2g}" for n, s in series.items()
                if s.get("pearson_r") is not None and s.get("p_value") is not None]
        rc = data.get("reward_correlation")
        if rc and rc.get("pearson_r") is not None:
            corr.append(f"{' vs '.join(rc['between'])} across {grid_name}: r = {rc['pearson_r']:.3f}")
        return "\n".join(lines) + "\n\nPearson correlation with " + grid_name + ": " + "; ".join(corr) + ".\n"
    if isinstance(data.get("accuracy"), list) and "rows" in data and "columns" in data:  # Fig. 6 matrix
        lines = [
            "| set \\ reward of | " + " | ".join(data["columns"]) + " |",
            "|---" * (len(data["columns"]) + 1) + "|",
        ]
        for row, values in zip(data["rows"], data["accuracy"]):
            lines.append(f"| {row} | " + " | ".join("" if v is None else f"{v:.3f}" for v in values) + " |")
        return "\n".join(lines) + "\n"
    if isinstance(data.get("error"), dict) and isinstance(data["error"].get("candidates"), dict):  # merge vs ensemble
        cands = data["error"]["candidates"]
        keys = sorted({k for c in cands.values() for k, v in c.items() if isinstance(v, (int, float))})
        lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(_num(c.get(k)) for k in keys) + " |" for n, c in cands.items()]
        if data.get("measured"):
            lines.append(f"\nMeasured: {data['measured']}.")
        cost = data.get("cost", {})
        ratio = ", ".join(
            f"{k} {cost[k]:.2f}×" for k in ("time_ratio", "memory_ratio") if isinstance(cost.get(k), (int, float))
        )
        return "\n".join(lines) + "\n" + (f"\nEnsemble / merged decoding cost: {ratio}.\n" if ratio else "")
    scalars = {k: v for k, v in data.items() if isinstance(v, (int, float, str)) and k != "what"}
    return "\n".join(f"- {k}: {_num(v)}" for k, v in scalars.items()) + "\n" if scalars else ""


def _iterations_section(run_dir: Path) -> str:
    """Each iteration's metrics.json (the numbers and seconds the loop recorded), one column per iteration."""
    files = [f.metrics for f in map(IterationLayout, RunLayout(run_dir).iterations()) if f.metrics.exists()]
    if not files:
        return ""
    cols = {f.parent.name: _flatten(_json(f) or {}) for f in files}
    keys = list(dict.fromkeys(k for c in cols.values() for k in c))
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(_num(c.get(k)) for c in cols.values()) + " |" for k in keys]
    return "## Iterations (Algorithm 1)\n\n" + "\n".join(lines) + "\n"


def _config_section(run_dir: Path) -> str:
    out = []
    config = RunLayout(run_dir).config
    if config.exists():
        out.append("## Configuration\n\n```yaml\n" + config.read_text().rstrip() + "\n```\n")
    manifest = _json(RunLayout(run_dir).manifest)
    precision = manifest.get("precision") if isinstance(manifest, dict) else None
    if isinstance(precision, dict):  # model.dtype auto on a CPU: what was measured, and so chosen
        how = (f"bf16 {precision.get('bfloat16_gflops')} vs fp32 {precision.get('float32_gflops')} GFLOP/s matmul"
               if "float32_gflops" in precision else f"given by {precision.get('given_by')}")
        out.append(f"Precision: **{precision.get('dtype')}** on {precision.get('cpu')} ({how}; AMX "
                   f"{'yes' if precision.get('amx_bf16') else 'no'}), chosen by `model.dtype: auto`.\n")
    if isinstance(manifest, dict) and manifest.get("stages"):
        lines = ["| stage | finished | recorded |", "|---|---|---|"]
        for name, rec in manifest["stages"].items():
            rest = {k: v for k, v in _flatten(rec).items() if k != "finished_at"}
            lines.append(f"| {name} | {rec.get('finished_at', '')} | "
                         + ", ".join(f"{k}={_num(v)}" for k, v in list(rest.items())[:6]) + " |")
        out.append("## Stages (manifest.json)\n\n" + "\n".join(lines) + "\n")
    return "\n".join(out)


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Numbers and short strings of a nested dict as ``a.b`` keys (lists and long text left out)."""
    flat: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) or (isinstance(v, str) and len(v) < 40):
            flat[f"{prefix}{k}"] = v
    return flat


def _num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _json(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ItermergeError(
            f"{path}: not valid JSON ({e}); it is written atomically, so it was edited — restore or delete it"
        ) from e


def _same(record: dict[str, Any], stamp: dict[str, str]) -> bool:
    return all(record.get(k) == v for k, v in stamp.items())
