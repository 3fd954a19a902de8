"""The base of every contrastive method (:class:`ContrastiveMethod`: batch to device, momentum key
encoder, health statistics), the method registry, and the gathers / in-batch logits they share."""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm
from detectron2.utils.registry import Registry
from fvcore.nn.distributed import differentiable_all_gather
from torch import nn

from pretrain.health import contrastive_top1, embedding_stats

METHOD_REGISTRY = Registry("METHOD")
METHOD_REGISTRY.__doc__ = """Contrastive methods; ``MODEL.METHOD`` is the lower-case class name."""


def method_names() -> tuple:
    """The valid ``MODEL.METHOD`` values, in registration order."""
    return tuple(name.lower() for name, _ in METHOD_REGISTRY)


def method_class(name: str) -> type:
    """The registered class whose lower-case name is ``name``."""
    for registered, cls in METHOD_REGISTRY:
        if registered.lower() == name:
            return cls
    raise KeyError(f"MODEL.METHOD {name!r} is not registered; choose one of {method_names()}.")


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every process in rank order (no gradient; keys of the global batch).

    What is sent and what receives it have the same (contiguous) layout: an NHWC
    (channels_last) ``x`` would otherwise be received into NHWC buffers from NCHW bytes, a
    layout mismatch that backends have silently reordered wrongly. The result has ``x``'s
    memory format again."""
    if comm.get_world_size() == 1:
        return x
    nhwc = x.dim() == 4 and not x.is_contiguous()
    nhwc = nhwc and x.is_contiguous(memory_format=torch.channels_last)
    send = x.contiguous()
    out = [torch.empty_like(send) for _ in range(comm.get_world_size())]
    dist.all_gather(out, send)
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    return torch.cat(out).contiguous(memory_format=fmt)


@torch.no_grad()
def broadcast_from_main(x: torch.Tensor) -> torch.Tensor:
    """``x`` as process 0 has it, on every process (in place; ``x`` on the process group's device).

    For random draws that every process must use identically (MoCo's shuffle permutation,
    SiMo's shared negatives): each process draws from the same seeded CPU generator, so the
    draws already agree; the broadcast makes a wrong key assignment impossible even if a
    process's generator state differs (a resume from another world size, a bug)."""
    if comm.get_world_size() > 1:
        dist.broadcast(x, src=0)
    return x


def concat_all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`concat_all_gather` but differentiable: the backward all-reduces the gradient, so
    every process receives the gradient of the whole global loss w.r.t. its own rows."""
    if comm.get_world_size() == 1:
        return x
    return torch.cat(differentiable_all_gather(x.contiguous()))


def in_batch_logits(
    q: torch.Tensor,
    keys: torch.Tensor,
    pos_index: torch.Tensor,
    exclude: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(pos [n], neg [n, M - 1 (- 1)])`` using every other key of the batch as a negative.

    Query ``i``'s positive is ``keys[pos_index[i]]``; every other key is a negative except
    ``keys[exclude[i]]`` (the query itself in SimCLR's 2N layout). Computed in float32 with
    autocast off (float64 inputs stay float64), like :func:`pretrain.losses.pairwise_logits`.
    """
    n, m = q.shape[0], keys.shape[0]
    dtype = torch.float64 if torch.float64 in (q.dtype, keys.dtype) else torch.float32
    with torch.autocast(device_type=q.device.type, enabled=False):
        sims = q.to(dtype) @ keys.to(dtype).t()
    pos = sims.gather(1, pos_index.view(n, 1)).squeeze(1)
    # the kept columns of each row, in order, by index arithmetic (a boolean mask would make the
    # host wait for the device to count the kept entries): j -> j + (j >= a) + (j' >= b)
    skip = pos_index.view(n, 1)
    if exclude is not None:
        skip = torch.sort(torch.cat([skip, exclude.view(n, 1)], dim=1), dim=1).values
    cols = torch.arange(m - skip.shape[1], device=q.device).expand(n, -1)
    for j in range(skip.shape[1]):
        cols = cols + (cols >= skip[:, j : j + 1]).long()
    return pos, sims.gather(1, cols)


class ContrastiveMethod(nn.Module):
    """Query encoder ``encoder_q`` (+ optional momentum key encoder ``encoder_k``) and a loss.

    Args:
        encoder_q: ResNet with the projection head as ``fc``
            (:func:`pretrain.models.build_encoder`).
        loss_fn: ``(pos [N], neg [N, K], tau) -> scalar`` (extra loss arguments already bound).
        tau: temperature.
        momentum: EMA momentum of the key encoder, or ``None`` for no key encoder.
        symmetric: also use (key view as query, query view as key) and average the two losses.
        seed: seed of the generator that draws negatives / shuffles; identical on every process,
            so all processes draw the same global sample (its state is checkpointed). It is a CPU
            generator on every device: its draws and its checkpointed state are the same on any
            hardware (a CUDA generator's draws depend on the GPU model, and its state cannot be
            restored into a CPU one), so a run resumes on CPU or GPU alike.

    Attributes:
        stats: ``{"health/contrastive_top1", "health/alignment", "health/uniformity",
            "health/emb_std"}`` of the last forward, detached 0-d float32 tensors on the device
            (:func:`pretrain.health.embedding_stats`); alignment etc. use view 1's queries and
            view 2's keys, the top-1 averages every :meth:`contrast` call of the step.
    """

    def __init__(
        self,
        encoder_q: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        tau: float,
        momentum: Optional[float] = None,
        symmetric: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.encoder_q = encoder_q
        self.loss_fn = loss_fn
        self.tau = tau
        self.momentum = momentum
        self.symmetric = symmetric
        if momentum is not None:
            self.encoder_k = copy.deepcopy(encoder_q)
            for p in self.encoder_k.parameters():
                p.requires_grad_(False)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.channels_last = False  # set by build_method from MODEL.CHANNELS_LAST
        self.stats: Dict[str, torch.Tensor] = {}
        self._top1: List[torch.Tensor] = []

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q (MoCo eq. 2); BN buffers stay the key's.

        Two fused ``torch._foreach_*`` kernels over all tensors instead of ~2 x 330 small ones;
        the same arithmetic per element as the loop ``p_k.mul_(m).add_(p_q, alpha=1 - m)``, so
        bit-identical to it (tested)."""
        params_k = list(self.encoder_k.parameters())
        params_q = [p.detach() for p in self.encoder_q.parameters()]
        if not params_k:  # a parameter-free encoder (tests)
            return
        torch._foreach_mul_(params_k, self.momentum)
        torch._foreach_add_(params_k, params_q, alpha=1.0 - self.momentum)

    def embed_q(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder_q(x), dim=1)

    @torch.no_grad()
    def embed_k(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder_k(x), dim=1)

    def pair_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Loss of queries ``q`` (local, with grad) against keys ``k`` (local) of the other view."""
        raise NotImplementedError

    def contrast(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """``loss_fn(pos, neg, tau)``; also records the contrastive top-1 of ``(pos, neg)``."""
        self._top1.append(contrastive_top1(pos, neg))
        return self.loss_fn(pos, neg, self.tau)

    def record_stats(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Set :attr:`stats` from view 1's queries ``q``, view 2's keys ``k`` and the top-1 of
        every :meth:`contrast` call since the last time (the two halves of a symmetric loss)."""
        top1 = torch.stack(self._top1).mean() if self._top1 else q.new_full((), float("nan"))
        self._top1 = []
        self.stats = embedding_stats(q, k, top1)

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        """The constructor arguments this method reads from the config, besides the encoder,
        loss, temperature, symmetry and seed that every method gets."""
        return {}

    @classmethod
    def num_negatives(cls, cfg) -> int:
        """How many negatives each query is contrasted with under ``cfg``."""
        raise NotImplementedError

    def forward(self, batch) -> Dict[str, torch.Tensor]:
        """``batch`` = ``((im_q, im_k), labels)`` from the loader (labels unused); the images go
        to this module's device (NHWC if :attr:`channels_last`) and into :meth:`losses`.

        uint8 views (the pretraining loader's, :class:`pretrain.data.TwoCropsTransform`) are
        copied as uint8 (4x fewer bytes) and normalised here, in float32, with ImageNet's mean /
        std (:func:`pretrain.data.normalize_uint8`: the float pipeline's ops, so its numbers; bit
        for bit on CPU, tested); float views are taken as already normalised. Views of the
        device path (``INPUT.DEVICE_AUGMENT``: :class:`pretrain.data.DeviceView`, uint8 pixels
        cropped and flipped + drawn parameters) get their colour jitter, grayscale, blur and
        normalisation here (:func:`pretrain.data.augment_on_device`)."""
        from pretrain.data import (  # the loader side of the uint8 / device-path conventions
            DeviceView,
            augment_on_device,
            normalize_uint8,
        )

        (im_q, im_k), _labels = batch
        device = next(self.encoder_q.parameters()).device
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        views = []
        for im in (im_q, im_k):
            if isinstance(im, DeviceView):
                pixels = im.image.to(device, non_blocking=True)
                im = augment_on_device(pixels, im.params).contiguous(memory_format=fmt)
            else:
                im = im.to(device, non_blocking=True).contiguous(memory_format=fmt)
                if im.dtype == torch.uint8:
                    im = normalize_uint8(im)  # keeps the memory format
            views.append(im)
        return self.losses(*views)

    def losses(self, im_q: torch.Tensor, im_k: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{"loss": ...}`` of the two views (already on the device)."""
        self._top1 = []
        if self.momentum is not None:
            with torch.no_grad():
                self.momentum_update()
        q1 = self.embed_q(im_q)
        k2 = self.embed_k(im_k)
        loss = self.pair_loss(q1, k2)
        if self.symmetric:
            loss = 0.5 * (loss + self.pair_loss(self.embed_q(im_k), self.embed_k(im_q)))
        self.after_loss(k2)
        self.record_stats(q1, k2)
        return {"loss": loss}

    def after_loss(self, keys: torch.Tensor) -> None:
        """Called once per step, after every :meth:`pair_loss`, with view 2's local keys (MoCo v2
        enqueues them here)."""
