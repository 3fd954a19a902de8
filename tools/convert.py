#!/usr/bin/env python
"""Convert a pretraining / MoCo / linear-eval / torchvision ResNet checkpoint to detectron2 weights.

    python tools/convert.py output/simo_r50/model_final.pth weights/simo_r50.pkl --verify \\
        --lincls-dir output/lincls_simo_r50

INPUT may also be a pretraining OUTPUT_DIR (its last checkpoint is used). The output is the pickle
that MODEL.WEIGHTS takes (docs/formats.md), with the provenance the report shows; the same file
serves C4 detectors (res2..res4 in the backbone, res5 in the box head) and FPN ones. --verify loads
it into detectron2's own ResNet and checks res2..res5 against torchvision's layer1..layer4; with a
detection config, into the detector that config builds, wherever it keeps res5:

    python tools/convert.py CKPT.pth OUT.pkl --verify --config-file configs/shapes_fpn_cpu.yaml \\
        MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.RES2_OUT_CHANNELS 64
    python tools/convert.py CKPT.pth OUT.pkl --verify \\
        --config-file configs/voc_R_50_C4_24k_simo.yaml
"""

import argparse
import os
import sys

# `python tools/convert.py` puts tools/ first on sys.path, where tools/pretrain.py would shadow the
# `pretrain` package: drop that entry (the packages are installed / on the path).
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from pretrain.io import exit_on_user_error  # noqa: E402
from transfer.convert import convert, format_report  # noqa: E402


@exit_on_user_error
def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("input", help="checkpoint (.pth/.pth.tar) or pretraining OUTPUT_DIR")
    p.add_argument("output", help="detectron2 weights to write (.pkl)")
    p.add_argument(
        "--verify", action="store_true", help="check detectron2's outputs against torchvision's"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument(
        "--unsafe",
        action="store_true",
        help="allow checkpoints that need code execution to load (only files you trust)",
    )
    top1 = p.add_mutually_exclusive_group()
    top1.add_argument("--top1", type=float, help="linear-eval top-1 (%%) for the provenance")
    top1.add_argument("--lincls-dir", help="linear-eval OUTPUT_DIR whose results.json has top-1")
    p.add_argument(
        "--name", help="pre-training name (default: the checkpoint's, else the file name)"
    )
    p.add_argument(
        "--norm",
        choices=["BN", "FrozenBN", "SyncBN"],
        help="detectron2 norm for --verify, equivalent in eval mode (default: the config's, or BN)",
    )
    p.add_argument(
        "--config-file", help="verify with this detection config's settings, not the built-in ones"
    )
    p.add_argument("opts", nargs="*", help="KEY VALUE overrides of --config-file (for --verify)")
    p.add_argument("--list-keys", action="store_true", help="print every renamed key")
    args = p.parse_intermixed_args(argv)  # options may come before or after the KEY VALUE pairs
    report = convert(
        args.input,
        args.output,
        verify=args.verify,
        force=args.force,
        unsafe=args.unsafe,
        top1=args.top1,
        lincls_dir=args.lincls_dir,
        name=args.name,
        norm=args.norm,
        config_file=args.config_file,
        config_opts=args.opts,
    )
    print(format_report(report, list_keys=args.list_keys))


if __name__ == "__main__":
    main()
