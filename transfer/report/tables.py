"""Formats report rows as text: the markdown table and ``report.csv`` (columns, "-" for missing,
one decimal for accuracies and AP)."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from pretrain.io import atomic_open

__all__ = [
    "BBOX_KEYS",
    "COLUMNS",
    "CSV_EXTRA",
    "MISSING",
    "format_value",
    "markdown_table",
    "write_csv",
]

# (column title, row key)
COLUMNS: list[tuple[str, str]] = [
    ("name", "name"),
    ("method", "method"),
    ("loss", "loss"),
    ("K", "num_negatives"),
    ("alpha", "alpha"),
    ("epochs", "epochs"),
    ("top-1", "top1"),
    ("kNN", "knn_top1"),
    ("retrieval", "instance_retrieval_top1"),
    ("val", "val_images"),
    ("seed", "seed"),
    ("det seed", "det_seed"),
    ("AP", "AP"),
    ("AP sd", "AP_sd"),
    ("AP50", "AP50"),
    ("AP75", "AP75"),
    ("APs", "APs"),
    ("APm", "APm"),
    ("APl", "APl"),
]
BBOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# shown with one decimal, like AP
PERCENT_KEYS = ("top1", "knn_top1", "instance_retrieval_top1", "AP_sd") + BBOX_KEYS
# CSV only, after the table's columns: the kNN settings, the retrieval gallery size and the
# linear eval's own SEED
CSV_EXTRA = [
    "source", "knn_k", "knn_t", "retrieval_images", "lincls_seed", "pretrain_dir", "lincls_dir",
    "detection_dir",
]
MISSING = "-"


def format_value(key: str, value: Any) -> str:
    """Table text: "-" for missing, 1 decimal for accuracies/AP, integers where integral."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if key in PERCENT_KEYS:
        return f"{float(value):.1f}"
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |"]
    lines.append(
        "|"
        + "|".join("---" if key in ("name", "method", "loss") else "---:" for _, key in COLUMNS)
        + "|"
    )
    for row in rows:
        cells = [format_value(key, row.get(key)).replace("|", "\\|") for _, key in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    """``report.csv``: the table's columns at full precision, then :data:`CSV_EXTRA`."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow([title for title, _ in COLUMNS] + CSV_EXTRA)
    for row in rows:
        # full precision in the CSV; missing values are "-" as in the table
        cells = [
            MISSING if row.get(k) is None else row[k]
            for _, k in COLUMNS + [(e, e) for e in CSV_EXTRA]
        ]
        writer.writerow(cells)
    # binary: the csv module's \r\n line ends reach the file as they are on every platform
    with atomic_open(path, "wb") as f:
        f.write(text.getvalue().encode("utf-8"))
