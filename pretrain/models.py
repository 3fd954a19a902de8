"""Encoders: a torchvision ResNet whose ``fc`` is the MLP projection head, and norm conversion.

Keeping the head in ``fc`` gives the checkpoint MoCo's layout (``encoder_q.conv1.weight``, ...,
``encoder_q.fc.0.weight``), so the backbone is every ``encoder_q.*`` key except ``encoder_q.fc.*``,
in torchvision names (docs/formats.md).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torchvision
from detectron2.layers import NaiveSyncBatchNorm
from torch import nn

from pretrain.io import UserError

__all__ = [
    "projection_head",
    "build_encoder",
    "backbone_features",
    "GroupNaiveSyncBatchNorm",
    "NaiveSyncBatchNorm1d",
    "sync_bn_process_group",
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


class _GroupAllReduce(torch.autograd.Function):
    """Differentiable sum over the processes of ``group`` (``None``: all). Forward is an all-gather
    and a sum, as fvcore's ``differentiable_all_reduce``: the same bits on every process."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts).sum(dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class GroupNaiveSyncBatchNorm(NaiveSyncBatchNorm):
    """detectron2's ``NaiveSyncBatchNorm`` (mean and mean of squares averaged over processes, equal
    weight per process) whose statistics are averaged over :attr:`process_group` only (``None``:
    all processes, detectron2's behaviour). float16 / bfloat16 inputs are normalised in float32.
    Same parameters and buffers as ``BatchNorm2d``; the running variance is the biased one, as in
    detectron2."""

    def __init__(self, *args, process_group: Optional[dist.ProcessGroup] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name)
        group = self.process_group
        size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        if size == 1 or not self.training:
            return nn.BatchNorm2d.forward(self, input)
        if input.shape[0] == 0:
            raise ValueError("GroupNaiveSyncBatchNorm does not support an empty batch.")
        c = input.shape[1]
        low = input.dtype in (torch.float16, torch.bfloat16)
        x = input.float() if low else input
        mean = x.mean(dim=[0, 2, 3])
        meansqr = (x * x).mean(dim=[0, 2, 3])
        vec = _GroupAllReduce.apply(torch.cat([mean, meansqr]), group) * (1.0 / size)
        mean, meansqr = torch.split(vec, c)
        var = meansqr - mean * mean
        scale = self.weight * torch.rsqrt(var + self.eps)
        bias = self.bias - mean * scale
        with torch.no_grad():
            self.running_mean += self.momentum * (mean.detach() - self.running_mean)
            self.running_var += self.momentum * (var.detach() - self.running_var)
        out = x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
        return out.to(input.dtype) if low else out


class NaiveSyncBatchNorm1d(GroupNaiveSyncBatchNorm):
    """:class:`GroupNaiveSyncBatchNorm` (written for ``[N, C, H, W]``) for ``[N, C]`` inputs, so
    the MLP head's BN is synchronised too on CPU / gloo. Same parameters and buffers as
    ``BatchNorm1d``, hence the same checkpoint keys."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name)
        if input.dim() == 2:
            return super().forward(input[:, :, None, None])[:, :, 0, 0]
        return super().forward(input)


def sync_bn_process_group(group_size: int) -> Optional[dist.ProcessGroup]:
    """The process group this process synchronises BN over, for ``MODEL.SYNC_BN_GROUP_SIZE``:
    ``None`` (all processes) for 0 or the world size, else the group of ``group_size``
    consecutive ranks holding this rank (ranks ``[0, G)``, ``[G, 2G)``, ...; 8 GPUs of a node
    for the paper's 8 x 32 images). Every process must call it (``dist.new_group`` for each
    group, in the same order on all ranks)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if group_size <= 0 or group_size == world:
        return None
    if world % group_size:
        raise UserError(
            f"MODEL.SYNC_BN_GROUP_SIZE={group_size}: the {world} processes do not split into "
            f"groups of {group_size}; use a divisor of {world} (0 = all processes)."
        )
    rank, mine = dist.get_rank(), None
    for start in range(0, world, group_size):
        ranks = list(range(start, start + group_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def convert_to_sync_bn(
    module: nn.Module, process_group: Optional[dist.ProcessGroup] = None
) -> nn.Module:
    """Make every BatchNorm synchronise its batch statistics over ``process_group`` (``None``:
    all processes; :func:`sync_bn_process_group` makes the groups).

    BN layers become :class:`GroupNaiveSyncBatchNorm` / :class:`NaiveSyncBatchNorm1d`
    (detectron2's all-reduce of mean and mean of squares, within the group; exact for equal
    per-process batches, which the loaders guarantee), on the CPU (gloo) and on CUDA (NCCL) alike:
    one all-reduce per layer and no host synchronisation, where ``nn.SyncBatchNorm`` reads the
    per-process counts back to the host in every layer (~110 waits per step for the two R50
    encoders) and does not run on CPU tensors at all. Call it only with more than one process;
    with one, plain BN already sees the whole batch. A process group cannot be deep-copied:
    convert a module after any ``copy.deepcopy`` of it (the key encoder).
    """
    return _replace_bn(module, process_group)


def _replace_bn(module: nn.Module, process_group: Optional[dist.ProcessGroup]) -> nn.Module:
    out = module
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(
        module, NaiveSyncBatchNorm
    ):
        is_1d = isinstance(module, nn.BatchNorm1d)
        cls = NaiveSyncBatchNorm1d if is_1d else GroupNaiveSyncBatchNorm
        out = cls(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            process_group=process_group,
        )
        like = module.running_mean if module.running_mean is not None else module.weight
        if like is not None:  # the dtype and device of the layer it replaces
            out = out.to(device=like.device, dtype=like.dtype)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        for p_new, p_old in zip(out.parameters(), module.parameters(), strict=True):
            p_new.requires_grad_(p_old.requires_grad)
    for name, child in module.named_children():
        out.add_module(name, _replace_bn(child, process_group))
    return out
