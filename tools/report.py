#!/usr/bin/env python
"""Compare pre-trainings: one table (linear-probe top-1, kNN top-1, val-set size and pretraining
seed next to detection AP) and plots from run dirs, e.g.

    python tools/report.py output/pretrain output/lincls output/det --out output/report --paper

Each RUN_DIR is an OUTPUT_DIR of tools/pretrain.py, tools/lincls.py or tools/train_det.py (it holds
a results.json), or a folder searched for them. Writes report.md, report.csv, ap_bars.png,
pretrain_loss.png, detection_curves.png and pretrain_health.png (loss, health metrics and kNN
monitor vs iteration of the pretraining runs, with the random-init linear eval's kNN top-1
dashed; only when a run logged them) to --out and prints the table.
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
    args = p.parse_args(argv)
    report = make_report(args.run_dirs, args.out, paper=args.paper)
    print(report.markdown)
    if report.seeds_markdown:
        print("\nLinear evaluation over seeds:\n" + report.seeds_markdown)
    for note in report.notes:
        print(f"note: {note}")
    print("wrote " + ", ".join(report.files))


if __name__ == "__main__":
    main()
