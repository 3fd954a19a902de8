#!/usr/bin/env python
"""Toy mutual-information experiment of the EqCo paper (InfoNCE vs EqCo estimates vs K), e.g.

    python tools/mi_toy.py --mi 2 4 6 8 10 --k 64 128 256 512 --alpha 512 --steps 5000 \\
        --eval-batches 1000 --seed 0 --out output/mi_toy

writes OUT/mi_toy.json (records), OUT/mi_toy.md (table) and OUT/mi_toy.png (estimate vs K).
"""
import argparse
import os
import sys

_TOOLS = os.path.dirname(os.path.abspath(__file__))
# `python tools/mi_toy.py` puts tools/ first on sys.path, where tools/pretrain.py would shadow the
# `pretrain` package: drop that entry (the package is installed).
if sys.path and os.path.abspath(sys.path[0] or ".") == _TOOLS:
    sys.path.pop(0)

import pretrain  # noqa: E402, F401  (first: silences the dependencies' import-time warnings)
import torch  # noqa: E402

from pretrain.io import UserError, exit_on_user_error  # noqa: E402

# the experiment code beside this file (tools/experiments/, not installed): tools/ goes back on
# the path, last, now that the `pretrain` package is imported
if _TOOLS not in sys.path:
    sys.path.append(_TOOLS)
from experiments.mi_toy import MIToyConfig  # noqa: E402
from experiments.mi_toy_report import run_and_write  # noqa: E402


@exit_on_user_error
def main(argv=None) -> None:
    d = MIToyConfig()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mi", type=float, nargs="+", default=d.mi, help="true MI values in nats")
    p.add_argument("--k", type=int, nargs="+", default=d.k, help="negatives per query")
    p.add_argument("--alpha", type=float, default=d.alpha, help="EqCo's fixed alpha")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per critic pair")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help="fresh batches the frozen bound is averaged over")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--hidden", type=int, default=d.hidden, help="hidden units per critic")
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help="critic output size")
    p.add_argument("--device", default=d.device, help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between log lines")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be >= 1.")
        torch.set_num_threads(args.threads)
    cfg = MIToyConfig(
        mi=args.mi, k=args.k, alpha=args.alpha, steps=args.steps, eval_batches=args.eval_batches,
        seed=args.seed, lr=args.lr, hidden=args.hidden, embed_dim=args.embed_dim,
        device=args.device, log_every=args.log_every,
    )
    run_and_write(cfg, args.out)


if __name__ == "__main__":
    main()
