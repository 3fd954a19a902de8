"""The K-sweep's plot, ``OUT/sweep.png``: linear-eval top-1 and the gradient norm w.r.t. q vs K
(log-x), one line per loss, error bars over seeds; the random-init top-1 as a dashed grey line
with a +-std band."""
from __future__ import annotations

from typing import Any, Dict, List

from pretrain.io import save_figure

from .ksweep_plan import unique
from .ksweep_results import baseline_top1, loss_label, split_rows, summarize

__all__ = ["write_plot"]


def write_plot(rows: List[Dict[str, Any]], path: str) -> str:
    """Top-1 and gradient norm vs K (log-x), one line per loss, error bars = std over seeds; on
    the top-1 axis the random-init baseline's mean top-1 (dashed grey) with a ± std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell_rows, _ = split_rows(rows)
    stats = summarize(rows)
    losses = unique(r["loss"] for r in cell_rows)
    ks = sorted(unique(r["k"] for r in cell_rows))
    alphas = {r["loss"]: r["alpha"] for r in cell_rows}
    base_mean, base_std, base_n = baseline_top1(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in (
        (axes[0], "top1", "linear-eval top-1 (%)"),
        (axes[1], "grad_norm", "mean ||dl/dq|| during pretraining"),
    ):
        for x in losses:
            pts = [(k, stats[(x, k)][metric]) for k in ks if (x, k) in stats]
            pts = [(k, s) for k, s in pts if s[2] > 0]
            if pts:
                ax.errorbar(
                    [k for k, _ in pts],
                    [s[0] for _, s in pts],
                    yerr=[s[1] for _, s in pts],
                    marker="o",
                    capsize=3,
                    label=loss_label(x, alphas),
                )
        if metric == "top1" and base_n > 0:
            ax.axhspan(base_mean - base_std, base_mean + base_std, color="grey", alpha=0.2, lw=0)
            ax.axhline(base_mean, color="grey", linestyle="--", label="random init")
        if ks:  # a log axis needs positive data; with only baselines finished there is no K
            ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("K (negatives per query)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend()
    axes[0].set_title("top-1 vs K")
    axes[1].set_title("gradient norm w.r.t. q vs K")
    save_figure(fig, path, dpi=100)
    return path
