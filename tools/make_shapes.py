#!/usr/bin/env python
r"""Draw the built-in synthetic detection dataset (COCO json with boxes and masks, a Pascal VOC
copy of the same scenes, and the ImageFolder view), e.g.

    python tools/make_shapes.py --out datasets/shapes --num-train 400 --num-val 100 \
        --size 128 --seed 0
"""
import os
import sys

# `python tools/X.py` puts tools/ first on sys.path, where tools/pretrain.py would shadow the
# `pretrain` package: drop that entry (the package is installed / on the path).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402

from pretrain.io import UserError, exit_on_user_error  # noqa: E402
from transfer.shapes import make_shapes  # noqa: E402


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", default="datasets/shapes", help="output directory (default: %(default)s)"
    )
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument(
        "--num-train-objects",
        type=int,
        default=None,
        help="grey style: single-object classification images in imagefolder/train "
        "(default: --num-train)",
    )
    p.add_argument(
        "--num-val-objects",
        type=int,
        default=None,
        help="grey style: single-object images in imagefolder/val (default: --num-val)",
    )
    p.add_argument("--size", type=int, default=128, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--style",
        default="grey",
        choices=("grey", "colour"),
        help="grey: shapes on flat noisy grey (SSL learns the shapes; default); colour: textured "
        "colour backgrounds and colours (a shortcut for instance discrimination)",
    )
    p.add_argument(
        "--no-voc",
        dest="voc",
        action="store_false",
        help="skip the Pascal VOC copy (VOC2007/, VOC2012/) of the scenes",
    )
    p.add_argument("--force", action="store_true", help="delete and regenerate a non-empty --out")
    args = p.parse_args(argv)
    try:
        summary = make_shapes(
            args.out,
            args.num_train,
            args.num_val,
            args.size,
            args.seed,
            args.force,
            args.style,
            args.num_train_objects,
            args.num_val_objects,
            args.voc,
        )
    except (ValueError, FileExistsError) as e:
        raise UserError(str(e)) from e
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
