"""Encoders: a torchvision ResNet whose ``fc`` is the MLP projection head, and norm conversion.

Keeping the head in ``fc`` gives the checkpoint MoCo's layout (``encoder_q.conv1.weight``, ...,
``encoder_q.fc.0.weight``), so the backbone is every ``encoder_q.*`` key except ``encoder_q.fc.*``,
in torchvision names (docs/formats.md).
"""

from __future__ import annotations

import torch
import torchvision
from detectron2.layers import NaiveSyncBatchNorm
from torch import nn

__all__ = [
    "projection_head",
    "build_encoder",
    "backbone_features",
    "NaiveSyncBatchNorm1d",
    "convert_to_sync_bn",
]


def projection_head(in_dim: int, hidden: int, out_dim: int, with_bn: bool) -> nn.Sequential:
    """2-layer MLP head.

    ``with_bn=True``: fc-BN-ReLU-fc-BN (SiMo, docs/methods.md, "SiMo"; the fcs have no bias, BN's
    shift replaces it). ``with_bn=False``: fc-ReLU-fc (MoCo v2).
    """
    if with_bn:
        return nn.Sequential(
            nn.Linear(in_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim, bias=False),
            nn.BatchNorm1d(out_dim),
        )
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


def build_encoder(
    arch: str = "resnet50",
    dim: int = 128,
    mlp_hidden: int = 2048,
    mlp_bn: bool = True,
    zero_init_residual: bool = False,
    head_init_std: float = 0.0,
) -> torchvision.models.ResNet:
    """A randomly initialised torchvision ResNet (``arch``) with the projection head as ``fc``.

    torchvision's ResNet puts the stride of a bottleneck in the 3x3 conv (detectron2's
    ``STRIDE_IN_1X1 False``), which the transfer stage relies on. ``zero_init_residual`` zeroes
    the last BN gamma of every residual branch (``bn3`` / ``bn2``), the tensor the released SiMo
    code's ``ZERO_INIT_RESIDUAL`` zeroes (``conv3.norm`` in detectron2/cvpods names).
    ``head_init_std > 0`` draws the head's fc weights from N(0, std^2), as the released SiMo code
    does with 0.01; 0 keeps PyTorch's default initialisation.
    """
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    net.fc = projection_head(net.fc.in_features, mlp_hidden, dim, mlp_bn)
    if head_init_std > 0:
        for layer in net.fc:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, mean=0.0, std=head_init_std)
    return net


def backbone_features(net: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    """Global-average-pooled backbone features (2048-d for R50), i.e. the input of ``net.fc``."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
    return torch.flatten(net.avgpool(x), 1)


class NaiveSyncBatchNorm1d(NaiveSyncBatchNorm):
    """detectron2's ``NaiveSyncBatchNorm`` (written for ``[N, C, H, W]``) for ``[N, C]`` inputs, so
    the MLP head's BN is synchronised too on CPU / gloo. Same parameters and buffers as
    ``BatchNorm1d``, hence the same checkpoint keys."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name)
        if input.dim() == 2:
            return super().forward(input[:, :, None, None])[:, :, 0, 0]
        return super().forward(input)


def convert_to_sync_bn(module: nn.Module, device_type: str) -> nn.Module:
    """Make every BatchNorm synchronise its batch statistics over all processes.

    On CUDA this is ``nn.SyncBatchNorm`` (NCCL kernels). On CPU (gloo), where ``nn.SyncBatchNorm``
    does not run, BN layers become detectron2's ``NaiveSyncBatchNorm`` (all-reduce of mean and
    mean of squares; exact for equal per-process batches, which the loaders guarantee). Call it only
    with more than one process; with one, plain BN already sees the whole batch.
    """
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _replace_bn(module)


def _replace_bn(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(
        module, NaiveSyncBatchNorm
    ):
        cls = NaiveSyncBatchNorm1d if isinstance(module, nn.BatchNorm1d) else NaiveSyncBatchNorm
        out = cls(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        for p_new, p_old in zip(out.parameters(), module.parameters(), strict=True):
            p_new.requires_grad_(p_old.requires_grad)
    for name, child in module.named_children():
        out.add_module(name, _replace_bn(child))
    return out
