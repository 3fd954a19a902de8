"""Contrastive losses as pure functions on similarity tensors (docs/methods.md, "Losses").

Every loss takes

* ``pos``: ``[N]`` cosine similarity of each query with its positive key (s+ = q . k+),
* ``neg``: ``[N, K]`` cosine similarities of each query with its K negatives (s_i = q . k_i),
* ``tau``: the temperature,

and returns the scalar mean over the N queries. Inputs may be float32, bfloat16 or float16; the
arithmetic is done in float32 (float64 if an input is float64) and the result is returned in that
compute dtype, because a contrastive loss evaluated in half precision loses the small differences
between logits that carry the signal. All log-sum-exps are the stable ``torch.logsumexp``.

The helpers at the bottom build ``(pos, neg)`` from embeddings for the three layouts the methods
use: negatives shared by all queries (``[K, d]``, e.g. a queue), per-query negatives (``[N, K, d]``)
and "other keys of the same batch" (SiMo, EqCo paper section 3), where K negatives are sampled
without replacement and never include the query's own key.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
from detectron2.utils import comm
from fvcore.nn.distributed import differentiable_all_gather

from pretrain.io import UserError

__all__ = [
    "infonce",
    "eqco",
    "dcl",
    "dclw",
    "dual_temperature",
    "LOSSES",
    "get_loss",
    "pairwise_logits",
    "sample_batch_negatives",
    "shared_negative_positions",
    "batch_logits",
]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # float64 stays float64 (gradcheck, exact equivalence tests); everything else runs in float32.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _prepare(pos: torch.Tensor, neg: torch.Tensor, tau: float):
    if pos.dim() != 1 or neg.dim() != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(
            f"expected pos of shape [N] and neg of shape [N, K], got {tuple(pos.shape)} and "
            f"{tuple(neg.shape)}"
        )
    if neg.shape[1] < 1:
        raise ValueError("neg must hold at least one negative per query (K >= 1)")
    if not tau > 0:
        raise ValueError(f"the temperature tau must be > 0, got {tau}")
    dtype = _compute_dtype(pos, neg)
    return pos.to(dtype), neg.to(dtype)


def _cross_entropy_first(logits: torch.Tensor) -> torch.Tensor:
    """Per-row ``-log softmax(logits)[:, 0]`` = logsumexp(row) - row[0] (stable)."""
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def infonce(pos: torch.Tensor, neg: torch.Tensor, tau: float, margin: float = 0.0) -> torch.Tensor:
    """InfoNCE with an additive margin on the positive (EqCo eq. 1)::

        L = -log( e^{(s+ - m)/tau} / ( e^{(s+ - m)/tau} + sum_{i=1..K} e^{s_i/tau} ) )

    ``margin=0`` is the plain InfoNCE / CPC loss, for which I(q; k) >= log(K + 1) - L. On the 2n
    anchors of SimCLR's layout it is NT-Xent, equal to lightly's ``NTXentLoss`` (in-batch
    negatives, no memory bank; test_lightly_oracle.py), except that the caller normalises.
    """
    pos, neg = _prepare(pos, neg, tau)
    logits = torch.cat([((pos - margin) / tau).unsqueeze(1), neg / tau], dim=1)
    return _cross_entropy_first(logits).mean()


def eqco(pos: torch.Tensor, neg: torch.Tensor, tau: float, alpha: float) -> torch.Tensor:
    """EqCo rule 1 (EqCo eq. 1 with m = tau * log(alpha / K), K = ``neg.shape[1]``)::

        L = -log( e^{s+/tau} / ( e^{s+/tau} + (alpha / K) * sum_{i=1..K} e^{s_i/tau} ) )

    Implemented as a ``log(alpha / K)`` shift of every negative logit rather than a margin on the
    positive: the two are algebraically identical (divide numerator and denominator by
    e^{-m/tau}), but the shift never pushes the positive logit towards under/overflow.
    ``alpha = K`` gives plain InfoNCE. The bound becomes I(q; k) >= log(alpha) - L, and the
    gradient norm no longer depends on K (EqCo Theorem 2).
    """
    pos, neg = _prepare(pos, neg, tau)
    if not alpha > 0:
        raise ValueError(f"EqCo's alpha must be > 0, got {alpha}")
    shift = math.log(alpha) - math.log(neg.shape[1])
    logits = torch.cat([(pos / tau).unsqueeze(1), neg / tau + shift], dim=1)
    return _cross_entropy_first(logits).mean()


def dcl(pos: torch.Tensor, neg: torch.Tensor, tau: float) -> torch.Tensor:
    """Decoupled contrastive loss (Yeh et al., "Decoupled Contrastive Learning"; docs/methods.md,
    "Losses"): the positive leaves the denominator::

        L = -s+/tau + log( sum_{i=1..K} e^{s_i/tau} )

    The SimCLR form is symmetric over the two views: call it once per view and average, or once
    on the 2n anchors of SimCLR's layout (:class:`pretrain.methods.SimCLR`), which equals
    lightly's ``DCLLoss`` (test_lightly_oracle.py). Unlike lightly, the inputs are cosine
    similarities: the caller normalises the embeddings.
    """
    pos, neg = _prepare(pos, neg, tau)
    return (torch.logsumexp(neg / tau, dim=1) - pos / tau).mean()


def dclw(
    pos: torch.Tensor,
    neg: torch.Tensor,
    tau: float,
    sigma: float = 0.5,
    detach_weight: bool = False,
) -> torch.Tensor:
    """Weighted DCL, DCLW (Yeh et al.; docs/methods.md, "Losses")::

        w = 2 - M * softmax_over_batch(s+ / sigma)     (sums to M over the batch)
        L = -w * s+/tau + log( sum_{i=1..K} e^{s_i/tau} )

    Harder positives (lower s+) get a larger weight. The softmax runs over the s+ of the whole
    global batch, M of them: with several processes they are all-gathered (differentiably, in rank
    order), so the weights do not depend on how the batch is split over processes.

    The weight stays in the autograd graph by default, as in the reference code that lightly
    cites (raminnakhli/Decoupled-Contrastive-Learning); ``detach_weight=True``
    (``LOSS.DCLW_DETACH_WEIGHT``) treats it as a constant, as lightly's ``DCLWLoss`` does. The
    values are the same; only the gradients differ. Those implementations normalise w over the n
    images of one view; in SimCLR's 2N layout every s+ appears twice among the 2n anchors, so the
    softmax over them gives the same w and the same gradients
    (tests/pretrain/test_lightly_oracle.py).
    """
    pos, neg = _prepare(pos, neg, tau)
    if not sigma > 0:
        raise ValueError(f"DCLW's sigma must be > 0, got {sigma}")
    batch_pos = pos.detach() if detach_weight else pos
    offset = 0
    if comm.get_world_size() > 1:
        offset = comm.get_rank() * pos.shape[0]
        batch_pos = torch.cat(differentiable_all_gather(batch_pos.contiguous()))
    weight = 2.0 - batch_pos.shape[0] * torch.softmax(batch_pos / sigma, dim=0)
    weight = weight[offset : offset + pos.shape[0]]
    return (torch.logsumexp(neg / tau, dim=1) - weight * pos / tau).mean()


def dual_temperature(pos: torch.Tensor, neg: torch.Tensor, tau: float, beta: float) -> torch.Tensor:
    """Dual-temperature InfoNCE (Zhang et al., SimMoCo / SimCo; docs/methods.md, "Losses")::

        l = -log softmax(logits / tau)[pos]
        w = (1 - softmax(logits / (tau * beta))[pos]) / (1 - softmax(logits / tau)[pos])  (detached)
        L = mean(w * l)

    ``tau`` is the intra-anchor temperature, ``tau * beta`` the inter-anchor one (beta = 10 in the
    paper); ``beta = 1`` gives w = 1, i.e. plain InfoNCE. ``1 - softmax(.)[pos]`` is the softmax
    mass of the negatives, computed in log space as logsumexp(neg) - logsumexp(all), so w stays
    finite even when the positive takes all the mass.
    """
    pos, neg = _prepare(pos, neg, tau)
    if not beta > 0:
        raise ValueError(f"the dual-temperature ratio beta must be > 0, got {beta}")
    logits = torch.cat([pos.unsqueeze(1), neg], dim=1) / tau
    lse = torch.logsumexp(logits, dim=1)
    nll = lse - logits[:, 0]
    log_neg_mass_intra = torch.logsumexp(logits[:, 1:], dim=1) - lse
    inter = logits / beta
    log_neg_mass_inter = torch.logsumexp(inter[:, 1:], dim=1) - torch.logsumexp(inter, dim=1)
    weight = torch.exp(log_neg_mass_inter - log_neg_mass_intra).detach()
    return (weight * nll).mean()


LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "infonce": infonce,
    "eqco": eqco,
    "dcl": dcl,
    "dclw": dclw,
    "dual_temperature": dual_temperature,
}
"""Name -> loss function, for configs (``LOSS.NAME: eqco``). All share ``(pos, neg, tau, ...)``;
the extra keyword is ``margin`` (infonce), ``alpha`` (eqco), ``sigma`` (dclw), ``beta``
(dual_temperature)."""


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """Look a loss up in :data:`LOSSES`; an unknown name is a :class:`UserError` naming the valid
    ones."""
    try:
        return LOSSES[name]
    except KeyError:
        valid = ", ".join(sorted(LOSSES))
        raise UserError(f"unknown loss {name!r}; choose one of {valid}.") from None


def pairwise_logits(
    q: torch.Tensor, k_pos: torch.Tensor, negatives: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities ``(pos [N], neg [N, K])`` of queries with their positives and negatives.

    ``q`` and ``k_pos`` are ``[N, d]``, L2-normalised by the caller (the losses expect cosine
    similarities). ``negatives`` is ``[K, d]`` (one set shared by all queries, e.g. a queue) or
    ``[N, K, d]`` (a set per query). The products run in float32 (float64 for float64 inputs) with
    autocast disabled, so a bf16/fp16 model still gets full-precision logits.
    """
    if q.dim() != 2 or k_pos.shape != q.shape:
        raise ValueError(
            f"expected q and k_pos of the same shape [N, d], got {tuple(q.shape)} and "
            f"{tuple(k_pos.shape)}"
        )
    dtype = _compute_dtype(q, k_pos, negatives)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = q.to(dtype)
        pos = (q * k_pos.to(dtype)).sum(dim=1)
        negatives = negatives.to(dtype)
        if negatives.dim() == 2 and negatives.shape[1] == q.shape[1]:
            neg = q @ negatives.t()
        elif negatives.dim() == 3 and negatives.shape[0] == q.shape[0] and (
            negatives.shape[2] == q.shape[1]
        ):
            neg = torch.bmm(negatives, q.unsqueeze(2)).squeeze(2)
        else:
            raise ValueError(
                f"negatives must be [K, d] or [N, K, d] with N={q.shape[0]}, d={q.shape[1]}; "
                f"got {tuple(negatives.shape)}"
            )
    return pos, neg


def shared_negative_positions(
    num_keys: int,
    num_negatives: int,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """The K positions ``randperm(num_keys - 1)[:K]`` of the released SiMo code's shared draw
    (:func:`sample_batch_negatives` with ``shared=True``), on the generator's device."""
    device = generator.device if generator is not None else device
    return torch.randperm(num_keys - 1, generator=generator, device=device)[:num_negatives]


def sample_batch_negatives(
    num_keys: int,
    num_negatives: int,
    own_index: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    shared: bool = True,
    device: Optional[torch.device] = None,
    rows: Optional[slice] = None,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Indices ``[N, K]`` of K negative keys per query, drawn from a batch of ``num_keys`` keys.

    ``own_index[n]`` is the position of query n's own (positive) key among the keys; by default
    ``arange(num_keys)`` (one query per key, in order). For every query the K indices are distinct,
    never equal to its own key, and form a uniformly random K-subset of the other keys:

    * ``shared=False``: an independent draw per query (top-K of uniform noise over the M - 1 other
      keys).
    * ``shared=True``: the selection of the released SiMo code (``NT_Xent.forward`` in Megvii's
      SelfSup repository): one draw of K *positions* per step, ``randperm(num_keys - 1)[:K]``,
      applied to every query's list of other keys (the similarity row without its own key), so
      query n gets keys ``p + (p >= own[n])``. Each query still gets a uniform K-subset of its
      other keys; with K = num_keys - 1 (the released K = 255 at N = 256) it is all of them.

    ``generator`` makes the draw reproducible; the draw happens on the generator's device (else
    ``device``) and the result is moved to ``device`` (default: that of ``own_index``, else CPU).

    ``rows`` (instead of ``own_index``): the draw is that of the whole batch (query i's own key
    is key i) but only the queries ``rows`` are selected, i.e. exactly the rows of the full draw,
    at the cost of the selection for this process's queries only (the noise of the other rows is
    generated but not sorted).

    ``positions`` (``shared=True`` only): the K positions already drawn by
    :func:`shared_negative_positions` (e.g. broadcast from process 0), instead of drawing them.
    """
    if device is None:
        device = own_index.device if own_index is not None else torch.device("cpu")
    device = torch.device(device)
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if num_negatives > num_keys - 1:
        raise UserError(
            f"{num_negatives} negatives per query need at least {num_negatives + 1} keys in the "
            f"(global) batch, got {num_keys}; lower the number of negatives or raise the batch "
            "size."
        )
    sample_device = generator.device if generator is not None else device
    if rows is not None:
        if own_index is not None:
            raise ValueError("pass own_index or rows, not both")
        own = torch.arange(num_keys, device=sample_device)[rows]
    elif own_index is None:
        own = torch.arange(num_keys, device=sample_device)
    else:
        if own_index.dim() != 1:
            raise ValueError(f"own_index must be a 1-D index tensor, got {tuple(own_index.shape)}")
        own = own_index.to(device=sample_device, dtype=torch.long)
    if shared:
        if positions is None:
            positions = shared_negative_positions(num_keys, num_negatives, generator, sample_device)
        positions = positions.to(sample_device)
        pick = positions.unsqueeze(0).expand(own.shape[0], -1)
    else:
        num_rows = num_keys if rows is not None else own.shape[0]
        noise = torch.rand(num_rows, num_keys - 1, generator=generator, device=sample_device)
        if rows is not None:
            noise = noise[rows]
        pick = noise.topk(num_negatives, dim=1).indices
    # positions in "all keys but mine" back to key indices: skip the own key
    idx = pick + (pick >= own.unsqueeze(1)).long()
    return idx.to(device)


def batch_logits(
    q: torch.Tensor,
    keys: torch.Tensor,
    num_negatives: int,
    own_index: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    shared: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos [N], neg [N, K])`` for the "other keys of the same batch" layout (SiMo).

    ``q`` is ``[N, d]``, ``keys`` the ``[M, d]`` (possibly all-gathered) keys; query n's positive
    is ``keys[own_index[n]]`` (default: ``keys[n]``). Negatives come from
    :func:`sample_batch_negatives`. All N x M similarities are computed with one matmul and the
    K per query gathered from them; this costs N*M*d, negligible next to the encoder, and gives
    the same values as gathering the key vectors first.
    """
    if q.dim() != 2 or keys.dim() != 2 or keys.shape[1] != q.shape[1]:
        raise ValueError(
            f"expected q [N, d] and keys [M, d], got {tuple(q.shape)} and {tuple(keys.shape)}"
        )
    if own_index is None:
        if q.shape[0] > keys.shape[0]:
            raise ValueError("without own_index, query n's positive is keys[n]: need N <= M")
        own_index = torch.arange(q.shape[0], device=q.device)
    own_index = own_index.to(device=q.device, dtype=torch.long)
    idx = sample_batch_negatives(
        keys.shape[0], num_negatives, own_index, generator=generator, shared=shared, device=q.device
    )
    dtype = _compute_dtype(q, keys)
    with torch.autocast(device_type=q.device.type, enabled=False):
        sims = q.to(dtype) @ keys.to(dtype).t()
    pos = sims.gather(1, own_index.unsqueeze(1)).squeeze(1)
    return pos, sims.gather(1, idx)

