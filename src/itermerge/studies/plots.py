"""The studies' figures: the accuracy heatmap (Fig. 6), the α / λ curves (Fig. 2-4), merge vs ensemble."""

from __future__ import annotations

from typing import Any


def plot_heatmap(result: dict[str, Any], plt):
    acc = [[float("nan") if v is None else v for v in row] for row in result["accuracy"]]
    fig, ax = plt.subplots(figsize=(1.2 * len(result["columns"]) + 3.5, 0.8 * len(result["rows"]) + 1.8))
    image = ax.imshow(acc, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(result["columns"])), [f"r_{c}" for c in result["columns"]])
    ax.set_yticks(range(len(result["rows"])), [f"from {r}" for r in result["rows"]])
    for i, row in enumerate(acc):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k", fontsize=9)
    ax.set_xlabel("induced reward model")
    ax.set_ylabel("preference set sampled from")
    fig.colorbar(image, ax=ax, label="accuracy (ties count half)")
    fig.tight_layout()
    return fig


def plot_curves(result: dict[str, Any], plt):
    """One panel per series (rewards have different scales), mean ± s.e. against the grid; Fig. 4's scatter for λ."""
    grid_name = "alpha" if "alpha" in result else "lambda"
    grid, series = result[grid_name], result["series"]
    pairs = result.get("reward_correlation")
    panels = len(series) + (1 if pairs else 0)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.2), squeeze=False)
    for ax, (name, s) in zip(axes[0], series.items()):
        ax.errorbar(grid, s["mean"], yerr=[e or 0.0 for e in s["sem"]], marker="o", capsize=3)
        ax.set_xlabel("α" if grid_name == "alpha" else "λ")
        r = s["pearson_r"]
        ax.set_title(f"{name}" + (f"  (r = {r:.3f})" if r is not None else ""), fontsize=9)
    if pairs:
        a, b = pairs["between"]
        ax = axes[0][-1]
        ax.plot(series[a]["mean"], series[b]["mean"], marker="o")
        for lam, x, y in zip(grid, series[a]["mean"], series[b]["mean"]):
            ax.annotate(f"λ={lam:g}", (x, y), fontsize=7)
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        r = pairs["pearson_r"]
        ax.set_title("rewards across λ" + (f"  (r = {r:.3f})" if r is not None else ""), fontsize=9)
    fig.tight_layout()
    return fig


def plot_approximation(result: dict[str, Any], plt):
    """Two panels: per-token KL of each candidate to the ensemble (both directions); time and memory ratio."""
    cands = result["error"]["candidates"]
    names = list(cands)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = range(len(names))
    ax1.bar(
        [x - 0.2 for x in xs],
        [cands[n]["kl_ensemble_to_model_per_token"] for n in names],
        0.4,
        label="KL(ensemble ‖ model)",
    )
    ax1.bar(
        [x + 0.2 for x in xs],
        [cands[n]["kl_model_to_ensemble_per_token"] for n in names],
        0.4,
        label="KL(model ‖ ensemble)",
    )
    ax1.set_xticks(list(xs), names)
    ax1.set_ylabel("mean KL per completion token (nats)")
    ax1.set_title("distance to the exact ensemble")
    ax1.legend(fontsize=8)
    cost = result["cost"]
    ax2.bar(["time", "memory"], [cost["time_ratio"], cost["memory_ratio"]], color=["tab:gray", "tab:olive"])
    ax2.axhline(
        cost["ensemble"]["models_run"], ls="--", c="k", lw=1, label=f"{cost['ensemble']['models_run']} models : 1"
    )
    ax2.set_ylabel("ensemble / merged")
    ax2.set_title("decoding cost, same tokens")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig
