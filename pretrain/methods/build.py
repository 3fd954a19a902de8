"""Building a method from the config: its loss with the extra argument bound, its encoder (SyncBN,
BN groups), the registered class."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from detectron2.utils import comm

from pretrain.losses import get_loss
from pretrain.methods.base import (
    ContrastiveMethod,
    method_class,
)
from pretrain.models import build_encoder, convert_to_sync_bn, sync_bn_process_group


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
        model = convert_to_sync_bn(model, group)
    model = model.to(device)  # its generator stays on the CPU (ContrastiveMethod)
    if m.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
        model.channels_last = True
    return model
