"""The report of the toy mutual-information experiment (:mod:`mi_toy`): the markdown table, the
plot of the estimates vs K, and the files ``mi_toy.json`` / ``mi_toy.md`` / ``mi_toy.png`` that
tools/mi_toy.py writes."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, List, Sequence

import torch

from pretrain.io import UserError, atomic_open, atomic_write_text, save_figure

from .mi_toy import LOSS_NAMES, MIToyConfig, run_grid

__all__ = ["format_table", "plot_estimates", "run_and_write"]

_LABELS = {"infonce": "InfoNCE", "eqco": "EqCo"}


def format_table(records: Sequence[dict], cfg: MIToyConfig) -> str:
    """Markdown: one row per true MI, one column per (loss, K)."""
    mis = sorted({r["mi"] for r in records})
    ks = sorted({r["k"] for r in records})
    value = {(r["mi"], r["k"], r["loss"]): r["estimate"] for r in records}
    cols = [(loss, k) for loss in LOSS_NAMES for k in ks]
    lines = [
        "| true MI (nats) | " + " | ".join(f"{_LABELS[loss]} K={k}" for loss, k in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for mi in mis:
        cells = " | ".join(f"{value[(mi, k, loss)]:.2f}" for loss, k in cols)
        lines.append(f"| {mi:g} | {cells} |")
    # both losses are >= 0, so neither estimate can exceed its constant
    ceilings = " | ".join(
        f"*{math.log(k + 1 if loss == 'infonce' else cfg.alpha):.2f}*" for loss, k in cols
    )
    lines.append(f"| *ceiling* | {ceilings} |")
    return (
        "\n".join(lines)
        + "\n\nInfoNCE estimate = log(K+1) - L_InfoNCE (ceiling log(K+1)); EqCo estimate = "
        f"log(alpha) - L_EqCo with alpha = {cfg.alpha:g} (ceiling log(alpha)). Critics trained "
        f"{cfg.steps} steps (Adam lr {cfg.lr:g}), bound averaged over {cfg.eval_batches} fresh "
        f"batches, seed {cfg.seed}.\n"
    )


def plot_estimates(records: Sequence[dict], cfg: MIToyConfig, path: str) -> None:
    """Estimate vs K, one line per true MI; InfoNCE and EqCo side by side."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    mis = sorted({r["mi"] for r in records})
    ks = sorted({r["k"] for r in records})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, loss in zip(axes, LOSS_NAMES):
        for i, mi in enumerate(mis):
            est = [next(r["estimate"] for r in records if (r["mi"], r["k"], r["loss"]) ==
                        (mi, k, loss)) for k in ks]
            color = colors[i % len(colors)]
            ax.plot(ks, est, "o-", color=color, label=f"true MI {mi:g}")
            ax.axhline(mi, color=color, linestyle="--", linewidth=0.8)
        if loss == "infonce":
            ax.plot(ks, [math.log(k + 1) for k in ks], "k:", label="log(K+1)")
        else:
            ax.axhline(math.log(cfg.alpha), color="k", linestyle=":", label="log(alpha)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (negatives per query)")
        ax.set_title(_LABELS[loss] if loss == "infonce" else f"EqCo (alpha={cfg.alpha:g})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MI estimate (nats)")
    for ax in axes:
        ax.legend(fontsize=8, loc="best")
    save_figure(fig, path, dpi=120)


def run_and_write(
    cfg: MIToyConfig, out_dir: str, log: Callable[[str], None] = print
) -> List[dict]:
    """Run the grid; write ``mi_toy.json``, ``mi_toy.md`` and ``mi_toy.png`` under ``out_dir``."""
    cfg.validate()
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot create the directory ({e.strerror}).") from e
    start = time.perf_counter()
    records = run_grid(cfg, log)
    with atomic_open(os.path.join(out_dir, "mi_toy.json")) as f:
        json.dump(records, f, indent=1)
    atomic_write_text(os.path.join(out_dir, "mi_toy.md"), format_table(records, cfg))
    plot_estimates(records, cfg, os.path.join(out_dir, "mi_toy.png"))
    log(f"[mi_toy] wrote {out_dir}/mi_toy.{{json,md,png}} in {time.perf_counter() - start:.1f}s "
        f"({torch.get_num_threads()} threads)")
    return records
