"""What the linear eval trains: :class:`LinearClassifier`, the frozen backbone (always in eval
mode) + the fc, with the cross-entropy of a loader batch; detectron2's ``SimpleTrainer`` (or
``DeviceAMPTrainer`` with SOLVER.AMP) trains it as it is (:class:`pretrain.engine.TrainingRun`).

Only the fc (``net.fc``) is trained and, with more than one process, wrapped in DDP; the backbone
runs under ``torch.no_grad`` and in eval mode, so BatchNorm uses and keeps its running statistics
(docs/methods.md, "Linear evaluation"). With SOLVER.AMP the backbone runs under the trainer's
autocast (:func:`pretrain.engine.amp_dtype`; :func:`pretrain.engine.autocast_to` for the
evaluation passes) and its features are cast to float32: the fc, its gradients and the loss are
always float32.

With MODEL.HEAD_BN the fc is a :class:`BatchNormLinear`: a parameter-free BatchNorm of the
features (MAE's linear probe), batch statistics over all processes in training and running ones
in evaluation, which :meth:`BatchNormLinear.folded` folds into a plain ``nn.Linear`` for export.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn

from pretrain.models import backbone_features

__all__ = ["HEAD_BN_EPS", "BatchNormLinear", "FeatureBatchNorm", "LinearClassifier", "fold_head_bn"]

# MAE's linear probe: BatchNorm1d(affine=False, eps=1e-6) before the head
HEAD_BN_EPS = 1e-6


class FeatureBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d(affine=False, eps=HEAD_BN_EPS)`` whose training statistics are those of the
    global batch: with several processes, the mean and variance over all of them (sums
    all-gathered and added in rank order: the same bits on every process), so a DDP run
    normalises as one process holding the whole batch does. Buffers (and checkpoint keys) are
    ``BatchNorm1d``'s; no parameters, and no gradient flows into the frozen features."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, eps=HEAD_BN_EPS, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world == 1 or not self.training:
            return super().forward(x)
        with torch.no_grad():
            local = torch.cat([x.sum(0), (x * x).sum(0), x.new_tensor([len(x)])]).double()
            parts = [torch.empty_like(local) for _ in range(world)]
            dist.all_gather(parts, local)
            total = torch.stack(parts).sum(0)
            c = x.shape[1]
            n = total[-1]
            mean = total[:c] / n
            var = (total[c : 2 * c] / n - mean * mean).clamp_(min=0)
            # running statistics as BatchNorm1d keeps them: unbiased variance, momentum 0.1
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
            unbiased = var * n / (n - 1).clamp(min=1)
            self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        return (x - mean.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + self.eps)


def fold_head_bn(
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float = HEAD_BN_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` of the one linear layer equal to ``fc(bn(x))`` with ``bn`` in eval mode:
    ``W / s`` and ``b - (W / s) mean``, ``s = sqrt(running_var + eps)`` (computed in float64,
    returned in ``weight``'s dtype)."""
    scale = torch.rsqrt(running_var.double() + eps)
    w = weight.double() * scale[None, :]
    b = bias.double() - w @ running_mean.double()
    return w.to(weight.dtype), b.to(bias.dtype)


class BatchNormLinear(nn.Linear):
    """``nn.Linear`` applied to ``FeatureBatchNorm(x)``: MAE's linear probe (a BatchNorm without
    affine parameters before the head), so one lr suits features of any scale.

    Its trained parameters are ``weight`` and ``bias`` as in ``nn.Linear`` (state-dict keys
    ``fc.weight`` / ``fc.bias``, plus ``fc.bn.running_mean`` / ``running_var`` /
    ``num_batches_tracked``); :meth:`folded` is the equal plain ``nn.Linear`` in eval mode."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.bn = FeatureBatchNorm(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.bn(x))

    def folded(self) -> nn.Linear:
        """The plain ``nn.Linear`` that gives this module's eval-mode outputs (float rounding
        aside): the BatchNorm folded into the weights, for the exported checkpoint."""
        fc = nn.Linear(self.in_features, self.out_features, device=self.weight.device)
        w, b = fold_head_bn(
            self.weight.detach(), self.bias.detach(), self.bn.running_mean, self.bn.running_var
        )
        with torch.no_grad():
            fc.weight.copy_(w)
            fc.bias.copy_(b)
        fc.weight.requires_grad_(self.weight.requires_grad)
        fc.bias.requires_grad_(self.bias.requires_grad)
        return fc.train(self.training)


class LinearClassifier(nn.Module):
    """Frozen backbone + linear head; ``forward((inputs, labels)) -> {"loss_cls": CE}``.

    ``inputs`` are images, or features when ``from_features`` (cached mode). The backbone is in
    eval mode whatever ``train()`` is called with: BN statistics are never updated (the classic
    linear-eval bug); only the head (``net.fc``, a :class:`BatchNormLinear` with MODEL.HEAD_BN)
    follows ``train()``. ``head`` is ``net.fc``, wrapped in DDP with more than one process.
    ``channels_last``: the images enter the backbone in NHWC (convert ``net`` too). Under an
    autocast (the AMP trainer's) only the backbone is autocast: its features are cast to float32
    and the head and the loss run with autocast off, so the logits and the fc's gradients are
    float32.
    """

    def __init__(
        self,
        net: torchvision.models.ResNet,
        head: nn.Module,
        from_features: bool,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.head = head
        self.from_features = from_features
        self.channels_last = channels_last

    def train(self, mode: bool = True) -> LinearClassifier:
        super().train(mode)
        self.net.eval()
        self.net.fc.train(mode)  # the head's BatchNorm (MODEL.HEAD_BN) uses batch statistics
        return self

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """float32 features of ``inputs`` (the backbone under the caller's autocast, if any)."""
        if self.from_features:
            return inputs.float()
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return backbone_features(self.net, inputs).float()

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` = ``(inputs, labels)`` from the loader, moved to the fc's device here."""
        device = self.net.fc.weight.device
        inputs, labels = (t.to(device, non_blocking=True) for t in batch)
        features = self.features(inputs)
        with torch.autocast(device.type, enabled=False):
            logits = self.head(features)
            return {"loss_cls": F.cross_entropy(logits, labels)}
