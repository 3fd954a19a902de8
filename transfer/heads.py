"""The R-CNN heads the transfer benchmarks name that detectron2 does not ship:
``Res5ROIHeadsExtraNorm``, MoCo's C4 box head with a norm layer after res5.

Registered in detectron2's ``ROI_HEADS_REGISTRY`` on import; ``transfer/config.py`` imports this
module, so every process that loads a detection config (tools/train_det.py and the workers it
launches, tools/convert.py --verify, the report) can build ``MODEL.ROI_HEADS.NAME
Res5ROIHeadsExtraNorm`` (docs/methods.md, "Transfer protocols").
"""

from __future__ import annotations

from detectron2.layers import get_norm
from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
from torch import nn

__all__ = ["Res5ROIHeadsExtraNorm"]


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """detectron2's C4 ``Res5ROIHeads`` with one more norm layer (``MODEL.RESNETS.NORM``, on
    res5's 2048 output channels) at the end of the per-RoI res5 stage, shared by the box predictor
    and the mask head.

    MoCo's C4 detectors have it ("as described in the MOCO paper, there is an extra BN layer
    following the res5 stage": facebookresearch/moco detection/train_net.py). The layer is
    appended to ``self.res5`` under the name ``norm``, so its parameters are
    ``roi_heads.res5.norm.*`` exactly as in MoCo's models: detectors trained with MoCo's code load
    here and ours there. Converted backbones have no such tensor; it starts as detectron2
    initialises a norm layer (weight 1, bias 0).

    With ``MODEL.RESNETS.DEPTH`` 18 or 34, res5 is built from basic blocks, as in those ResNets
    (detectron2's ``Res5ROIHeads`` always builds bottleneck blocks, which R18/R34 weights cannot
    fill): the benchmarks then run on small backbones too, e.g. the CPU-sized suite on the demo's
    ResNet-18 (``tools/benchmark.py --size shapes``).
    """

    @classmethod
    def _build_res5_block(cls, cfg) -> tuple[nn.Sequential, int]:
        depth = cfg.MODEL.RESNETS.DEPTH
        if depth in (18, 34):
            out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 2**3  # res5 is 8x res2
            num_blocks = {18: 2, 34: 3}[depth]
            blocks = ResNet.make_stage(
                BasicBlock,
                num_blocks,
                stride_per_block=[2] + [1] * (num_blocks - 1),
                in_channels=out_channels // 2,
                out_channels=out_channels,
                norm=cfg.MODEL.RESNETS.NORM,
            )
            res5 = nn.Sequential(*blocks)
        else:
            res5, out_channels = super()._build_res5_block(cfg)
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return res5, out_channels
