#!/usr/bin/env python
"""Compare pre-trainings: one table (linear-probe top-1, kNN top-1, val-set size and pretraining
seed next to detection AP) and plots from run dirs, e.g.

    python tools/report.py output/pretrain output/lincls output/det --out output/report --paper

Each RUN_DIR is an OUTPUT_DIR of tools/pretrain.py, tools/lincls.py or tools/train_det.py (it holds
a results.json), or a folder searched for them. Writes report.md, report.csv, ap_vs_top1.png
(box AP against linear top-1, one labelled point per pre-training, seed sds as error bars, the
paper's points with --paper; first in report.md), ap_bars.png, pretrain_loss.png,
detection_curves.png, pretrain_health.png (loss, health metrics and kNN monitor vs iteration of
the pretraining runs, with the random-init linear eval's kNN top-1 dashed; only when a run logged
them), lincls_seeds.png (with several pretraining seeds) and, with runs of tools/benchmark.py,
the benchmark table (VOC AP50 / AP / AP75, COCO box and mask AP per protocol, mean +- sd over
detection seeds, next to top-1; MoCo's published numbers with --paper) and benchmarks.png to --out,
and prints the tables.

A run whose results.json cannot be read is left out with a warning naming the file and why (and
listed in report.md's notes); --strict makes it an error (exit status 2) instead.
"""

import argparse
import os
import sys

# `python tools/report.py` puts tools/ first on sys.path, where tools/pretrain.py would shadow the
# `pretrain` package: drop that entry (the packages are installed / on the path).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from pretrain.io import exit_on_user_error  # noqa: E402
from transfer.report import make_report  # noqa: E402


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="OUTPUT_DIRs or folders of them")
    p.add_argument("--out", default="output/report", help="output folder (default: %(default)s)")
    p.add_argument(
        "--paper", action="store_true", help="add the EqCo paper's reference rows (marked [paper])"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse to report (exit 2) when a run's results.json cannot be read, instead of "
        "leaving that run out with a warning",
    )
    args = p.parse_args(argv)
    report = make_report(args.run_dirs, args.out, paper=args.paper, strict=args.strict)
    for reason in report.skipped:
        print(f"warning: left out a run: {reason}", file=sys.stderr)
    print(report.markdown)
    if report.seeds_markdown:
        print("\nLinear evaluation over seeds:\n" + report.seeds_markdown)
    if report.benchmarks_markdown:
        print("\nTransfer benchmarks (mean ± sd over detection seeds):")
        print(report.benchmarks_markdown)
    for note in report.notes:
        print(f"note: {note}")
    print("wrote " + ", ".join(report.files))


if __name__ == "__main__":
    main()
