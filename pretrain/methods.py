"""The contrastive methods, one short class each, registered in :data:`METHOD_REGISTRY` under
their lower-case class name (``MODEL.METHOD``): SiMo (default), MoCo v2, SimCLR, SimMoCo, SimCo.

Each is an ``nn.Module`` whose ``forward(batch)`` takes the loader's batch ``((im_q, im_k),
labels)`` and returns ``{"loss": scalar}`` for this process's share of the global batch, so
detectron2's ``SimpleTrainer`` / ``AMPTrainer`` train it as they are. With DDP averaging the
gradients over processes, the update equals that of one process holding the whole global batch
(tested in test_distributed.py). Each class declares the config keys it reads
(``from_config``) and its number of negatives per query. Losses come from
:mod:`pretrain.losses` by name (``LOSS.NAME``), so any method can be combined with any loss.

Every forward also leaves detached per-step health values in ``method.stats`` (contrastive top-1,
alignment, uniformity, embedding std; :mod:`pretrain.health`), computed without autograd from the
logits and embeddings the loss already uses. They are not in the returned dict, which the trainer
sums into the loss.
"""

from __future__ import annotations

import copy
import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.utils import comm
from detectron2.utils.registry import Registry
from fvcore.nn.distributed import differentiable_all_gather
from torch import nn

from pretrain.health import contrastive_top1, embedding_stats
from pretrain.losses import get_loss, pairwise_logits, sample_batch_negatives
from pretrain.models import build_encoder, convert_to_sync_bn, sync_bn_process_group

__all__ = [
    "METHOD_REGISTRY",
    "method_names",
    "method_class",
    "concat_all_gather",
    "concat_all_gather_with_grad",
    "in_batch_logits",
    "ContrastiveMethod",
    "SiMo",
    "MoCoV2",
    "SimCLR",
    "SimMoCo",
    "SimCo",
    "build_method",
    "build_loss_fn",
]


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
    """Concatenate ``x`` of every process in rank order (no gradient; keys of the global batch)."""
    if comm.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(comm.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


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
            so all processes draw the same global sample (its state is checkpointed).

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
        for bit on CPU, tested); float views are taken as already normalised."""
        from pretrain.data import normalize_uint8  # the loader side of the uint8 convention

        (im_q, im_k), _labels = batch
        device = next(self.encoder_q.parameters()).device
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        views = []
        for im in (im_q, im_k):
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


@METHOD_REGISTRY.register()
class SiMo(ContrastiveMethod):
    """SiMo (EqCo paper, section 3): MoCo v2 without the memory bank.

    The positive and K negatives of every query are keys of the current global batch (gathered
    from all processes); the negatives never include the query's own key. EqCo's alpha keeps the
    loss calibrated for small K. Loss on the query side only unless ``symmetric``.
    """

    def __init__(self, *args, num_negatives: int = 16, shared_negatives: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.k = num_negatives
        self.shared_negatives = shared_negatives

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        return {
            "momentum": cfg.MODEL.MOMENTUM,
            "num_negatives": cfg.LOSS.NUM_NEGATIVES,
            "shared_negatives": cfg.LOSS.SHARED_NEGATIVES,
        }

    @classmethod
    def num_negatives(cls, cfg) -> int:
        return cfg.LOSS.NUM_NEGATIVES

    def pair_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        k_all = concat_all_gather(k)
        first = comm.get_rank() * q.shape[0]
        # the draw of the whole global batch (same generator state everywhere) on the model's
        # device, selected for this rank's rows only: identical negatives to a single process
        # holding the global batch
        idx = sample_batch_negatives(
            k_all.shape[0],
            self.k,
            generator=self.generator,
            shared=self.shared_negatives,
            device=q.device,
            rows=slice(first, first + q.shape[0]),
        )
        pos, neg = pairwise_logits(q, k, k_all[idx])
        return self.contrast(pos, neg)


@METHOD_REGISTRY.register()
class MoCoV2(ContrastiveMethod):
    """MoCo v2 (Chen et al. 2020): negatives from a FIFO queue of past keys; shuffling BN."""

    def __init__(
        self, *args, dim: int = 128, queue_size: int = 65536, shuffle_bn: bool = True, **kw
    ):
        super().__init__(*args, **kw)
        self.shuffle_bn = shuffle_bn
        g = torch.Generator().manual_seed(int(self.generator.initial_seed()) + 1)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim, generator=g), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._ptr = 0  # host copy of queue_ptr, so that enqueueing never reads the device

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        return {
            "momentum": cfg.MODEL.MOMENTUM,
            "dim": cfg.MODEL.DIM,
            "queue_size": cfg.LOSS.QUEUE_SIZE,
            "shuffle_bn": cfg.MODEL.SHUFFLE_BN,
        }

    @classmethod
    def num_negatives(cls, cfg) -> int:
        return cfg.LOSS.QUEUE_SIZE

    @torch.no_grad()
    def embed_k(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.shuffle_bn and comm.get_world_size() > 1):
            return super().embed_k(x)
        # shuffling BN: keys are computed on a random permutation of the global batch, so the BN
        # statistics of a process do not come from the same images as its queries'
        n, rank = x.shape[0], comm.get_rank()
        x_all = concat_all_gather(x)
        g = self.generator
        perm = torch.randperm(x_all.shape[0], generator=g, device=g.device).to(x.device)
        k_perm = concat_all_gather(super().embed_k(x_all[perm[rank * n : (rank + 1) * n]]))
        k_all = torch.empty_like(k_perm)
        k_all[perm] = k_perm
        return k_all[rank * n : (rank + 1) * n]

    def pair_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # the queue as it was before this step: with LOSS.SYMMETRIC both halves see the same one,
        # and neither half's own keys are in it
        pos, neg = pairwise_logits(q, k, self.queue.clone().detach())
        return self.contrast(pos, neg)

    @torch.no_grad()
    def after_loss(self, k: torch.Tensor) -> None:
        """Enqueue the global batch's view-2 keys, once per step (N keys, also when symmetric)."""
        keys = concat_all_gather(k)
        ptr = self._ptr
        self.queue[ptr : ptr + keys.shape[0]] = keys  # QUEUE_SIZE % batch == 0 (validated)
        self._ptr = (ptr + keys.shape[0]) % self.queue.shape[0]
        self.queue_ptr.fill_(self._ptr)  # the checkpointed copy, written without a host read

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ptr = int(self.queue_ptr)  # restored from a checkpoint (at set-up, not in a step)


@METHOD_REGISTRY.register()
class SimCLR(ContrastiveMethod):
    """SimCLR-style symmetric in-batch method (one encoder, no momentum): each of the 2N views is
    an anchor whose positive is the other view of its image and whose 2N - 2 negatives are all
    other views of the global batch. With ``LOSS.NAME dcl`` / ``dclw`` this is DCL / DCLW."""

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        return {"momentum": None}

    @classmethod
    def num_negatives(cls, cfg) -> int:
        return 2 * cfg.SOLVER.IMS_PER_BATCH - 2

    def losses(self, im_q: torch.Tensor, im_k: torch.Tensor) -> Dict[str, torch.Tensor]:
        self._top1 = []
        z = torch.cat([self.embed_q(im_q), self.embed_q(im_k)])  # [2n, d]: view 1, then view 2
        n, rank = im_q.shape[0], comm.get_rank()
        z_all = concat_all_gather_with_grad(z)  # [W * 2n], rank blocks of (view 1, view 2)
        # global column of every local anchor and of its positive (the other view of its image)
        local = torch.arange(2 * n, device=z.device)
        self_col = rank * 2 * n + local
        pos_col = rank * 2 * n + (local + n) % (2 * n)
        pos, neg = in_batch_logits(z, z_all, pos_col, exclude=self_col)
        loss = self.contrast(pos, neg)  # the 2n anchors: the top-1 covers both halves
        self.record_stats(z[:n], z[n:])
        return {"loss": loss}


@METHOD_REGISTRY.register()
class SimMoCo(ContrastiveMethod):
    """SimMoCo (Zhang et al. 2022): momentum encoder (m = 0.99), no queue; each query's negatives
    are the N - 1 other keys of the global batch, or with ``local_negatives`` (the official
    script's behaviour, ``LOSS.LOCAL_NEGATIVES``) the n - 1 other keys of this process's batch;
    dual-temperature loss."""

    def __init__(self, *args, local_negatives: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.local_negatives = local_negatives

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        return {"momentum": cfg.MODEL.MOMENTUM, "local_negatives": cfg.LOSS.LOCAL_NEGATIVES}

    @classmethod
    def num_negatives(cls, cfg) -> int:
        return cfg.SOLVER.IMS_PER_BATCH - 1

    def gather_keys(self, k: torch.Tensor) -> torch.Tensor:
        return concat_all_gather(k)

    def pair_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.local_negatives or comm.get_world_size() == 1:
            keys, first = k, 0
        else:
            keys, first = self.gather_keys(k), comm.get_rank() * q.shape[0]
        own = first + torch.arange(q.shape[0], device=q.device)
        pos, neg = in_batch_logits(q, keys, own)
        return self.contrast(pos, neg)


@METHOD_REGISTRY.register()
class SimCo(SimMoCo):
    """SimCo (Zhang et al. 2022): SimMoCo without the momentum encoder; the keys come from the same
    encoder and carry gradients (gathered differentiably)."""

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        return {"momentum": None, "local_negatives": cfg.LOSS.LOCAL_NEGATIVES}

    def losses(self, im_q: torch.Tensor, im_k: torch.Tensor) -> Dict[str, torch.Tensor]:
        self._top1 = []
        z1, z2 = self.embed_q(im_q), self.embed_q(im_k)
        loss = self.pair_loss(z1, z2)
        if self.symmetric:
            loss = 0.5 * (loss + self.pair_loss(z2, z1))
        self.record_stats(z1, z2)
        return {"loss": loss}

    def gather_keys(self, k: torch.Tensor) -> torch.Tensor:
        return concat_all_gather_with_grad(k)


def build_loss_fn(cfg) -> Callable[..., torch.Tensor]:
    """``LOSS.NAME`` with its extra argument bound from the config (alpha, margin, sigma, beta)."""
    name = cfg.LOSS.NAME
    extra = {
        "eqco": {"alpha": cfg.LOSS.ALPHA},
        "infonce": {"margin": cfg.LOSS.MARGIN},
        "dclw": {"sigma": cfg.LOSS.SIGMA, "detach_weight": cfg.LOSS.DCLW_DETACH_WEIGHT},
        "dual_temperature": {"beta": cfg.LOSS.BETA},
    }.get(name, {})
    return functools.partial(get_loss(name), **extra)


def build_method(cfg, device: torch.device) -> ContrastiveMethod:
    """The method of ``cfg.MODEL.METHOD`` on ``device``, with SyncBN when ``MODEL.NORM SyncBN`` and
    more than one process, synchronised within groups of ``MODEL.SYNC_BN_GROUP_SIZE`` processes
    (0: all). Initialisation depends only on the current torch seed."""
    m = cfg.MODEL
    encoder = build_encoder(
        m.ARCH, m.DIM, m.MLP_HIDDEN, m.MLP_BN, m.ZERO_INIT_RESIDUAL, m.HEAD_INIT_STD
    )
    # the negatives generator must be seeded identically on every process
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    common = dict(
        loss_fn=build_loss_fn(cfg), tau=cfg.LOSS.TAU, symmetric=cfg.LOSS.SYMMETRIC, seed=seed
    )
    cls = method_class(m.METHOD)
    model = cls(encoder, **common, **cls.from_config(cfg))
    if m.NORM == "SyncBN" and comm.get_world_size() > 1 and m.SYNC_BN_GROUP_SIZE != 1:
        # after the method's deepcopy of the encoder (key encoder): a process group cannot be
        # copied; every process creates every group (sync_bn_process_group)
        group = sync_bn_process_group(m.SYNC_BN_GROUP_SIZE)
        model = convert_to_sync_bn(model, device.type, group)
    model = model.to(device)
    if device.type != "cpu":
        # draw negatives / shuffles where the keys are (no host round trip); same seed
        model.generator = torch.Generator(device=device).manual_seed(int(seed))
    if m.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model
