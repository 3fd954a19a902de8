"""Weighted kNN monitor (Wu et al. 2018, as in the MoCo/InstDisc demos): classify held-out images
by a temperature-weighted vote of their k nearest training images in backbone feature space.

It needs no training, so it tracks representation quality every few epochs at the cost of one
feature extraction pass. At ImageNet scale no process holds all train features (1.28M x 2048
floats are 10.5 GB): each process keeps the shard it extracted on its device
(:func:`feature_dtype`: float16 on CUDA), scores chunks of val rows against it and only the k best
candidates per val row travel (:func:`sharded_knn_predict`; docs/gpus.md, "kNN at ImageNet
scale"). :func:`knn_predict` is the single-process reference. All functions that gather are
collective (call them on every process).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from detectron2.utils import comm
from torch import nn
from torch.utils.data import Dataset

from pretrain.engine import autocast_to
from pretrain.features import extract_features

__all__ = [
    "contiguous_shard",
    "feature_dtype",
    "hit_counts",
    "knn_hits",
    "knn_predict",
    "knn_top1",
    "sharded_knn_predict",
]

# per process, at most this many similarities per val chunk (chunk x train shard): 128 MiB in
# float16, 256 MiB in float32, whatever the train size
_SIMILARITY_ELEMENTS = 2**26
# at most this many gathered candidates per val chunk (chunk x k x world, 12 bytes each: 48 MiB)
_CANDIDATE_ELEMENTS = 2**22
_MAX_CHUNK = 1024


def knn_predict(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted class of every row of ``test_f``: argmax_c sum_{j in kNN} exp(s_j / t) [y_j = c],
    with s_j the cosine similarity to the j-th neighbour (rows must be L2-normalised).

    Single process, all train features at hand: the reference that :func:`sharded_knn_predict`
    reproduces. Runs on the device of the inputs (``train_f``, ``train_y`` and ``test_f`` on the
    same one); ``chunk`` test rows at a time bound the similarity matrix to
    ``chunk x len(train_f)``."""
    k = min(k, train_f.shape[0])
    preds = []
    for start in range(0, test_f.shape[0], chunk):
        sims = test_f[start : start + chunk] @ train_f.t()
        top_s, top_i = sims.topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, train_y[top_i], (top_s / t).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=test_f.device)


def feature_dtype(device: torch.device) -> torch.dtype:
    """How kNN features are stored and multiplied on ``device``: float16 on CUDA (half the memory
    of a train shard; tensor-core matmul, float32 accumulation), float32 elsewhere (CPUs have no
    fast float16 matmul, and float32 keeps the CPU number equal to :func:`knn_predict`'s)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def contiguous_shard(n: int, rank: int | None = None, world: int | None = None) -> slice:
    """This process's contiguous part of ``n`` rows, as detectron2's ``InferenceSampler`` (and so
    :func:`pretrain.features.extract_features`) splits a dataset: the first ``n % world`` ranks
    get one row more; no padding, every row belongs to exactly one rank."""
    rank = comm.get_rank() if rank is None else rank
    world = comm.get_world_size() if world is None else world
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """``[world, *x.shape]``: ``x`` of every process in rank order, by a tensor collective on
    ``x``'s device (gloo on CPU, NCCL on CUDA); every process passes the same shape."""
    if comm.get_world_size() == 1:
        return x.unsqueeze(0)
    out = [torch.empty_like(x) for _ in range(comm.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.stack(out)


def _rows_per_rank(max_shard: int, k: int, world: int, chunk: int | None) -> int:
    """Val rows each process contributes to a chunk: the chunk (``world`` times it) keeps the
    similarity matrix under ``_SIMILARITY_ELEMENTS`` and the gathered candidates under
    ``_CANDIDATE_ELEMENTS``, at most ``_MAX_CHUNK`` rows; or ``chunk // world``."""
    if chunk is None:
        chunk = min(
            _MAX_CHUNK,
            _SIMILARITY_ELEMENTS // max(max_shard, 1),
            _CANDIDATE_ELEMENTS // max(k * world, 1),
        )
    return max(1, chunk // world)


@torch.no_grad()
def sharded_knn_predict(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    val_f: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int | None = None,
) -> torch.Tensor:
    """:func:`knn_predict` of this process's ``val_f`` rows against the train features of *all*
    processes, each holding only its own contiguous shard (collective; rank order = dataset
    order, as :func:`pretrain.features.extract_features` with ``gather=False`` returns them).

    Per chunk of val rows (each process contributes ``chunk // world`` of its rows; the chunk is
    all-gathered as a tensor), each process computes the cosine similarities to its shard and
    their top ``k``; the ``k`` candidates (similarity, global train index, label) of every process
    are all-gathered, and the owner of each val row keeps the global top ``k``, ordered by
    (similarity desc, global train index asc), and votes ``exp(s / t)`` per class. The similarity
    matrix is ``chunk x shard`` (``chunk`` None: sized from the shard, at most 1024 rows).

    Args:
        train_f: ``[shard, dim]`` L2-normalised train features of this process, on its device
            (any float dtype; the similarities are in it, the vote in float32).
        train_y: ``[shard]`` their labels, on the same device.
        val_f: ``[rows, dim]`` L2-normalised val features of this process, same device / dtype.

    Returns:
        ``[rows]`` predicted classes (long, on the device): :func:`knn_predict`'s on all the
        train features, exactly with one process. Exact ties between shards go to the lower
        global index; a tie at a shard's own ``k``-th place is broken by ``topk`` (an unspecified
        order, as in :func:`knn_predict`), so with such ties the neighbour set may differ.
    """
    device, world, rank = train_f.device, comm.get_world_size(), comm.get_rank()
    sizes = comm.all_gather((len(train_f), len(val_f)))  # a few ints
    train_sizes = [s[0] for s in sizes]
    k = min(k, sum(train_sizes))
    if k == 0 or not any(s[1] for s in sizes):  # no train (knn_predict's zero votes) or no val
        return torch.zeros(len(val_f), dtype=torch.long, device=device)
    offset = sum(train_sizes[:rank])
    local_k = min(k, len(train_f))
    per_rank = _rows_per_rank(max(train_sizes), k, world, chunk)
    rounds = -(-max(s[1] for s in sizes) // per_rank)
    preds = []
    for r in range(rounds):
        mine = val_f[r * per_rank : (r + 1) * per_rank]
        block = val_f.new_zeros(per_rank, val_f.shape[1])
        block[: len(mine)] = mine
        block = _all_gather(block).flatten(0, 1)  # [world * per_rank, dim]: the chunk
        # this shard's top k of every chunk row; a shard with fewer than k rows pads with
        # -inf similarities (never among the global top k: the shards hold >= k rows together)
        cand_s = torch.full((len(block), k), float("-inf"), device=device)
        # global train index and label in one int64 (index * C + label): sorting it sorts by
        # index; the padding's index sum(train_sizes) comes after every real one
        pad_code = sum(train_sizes) * num_classes
        cand_code = torch.full((len(block), k), pad_code, dtype=torch.long, device=device)
        if local_k:
            top_s, top_i = (block @ train_f.t()).topk(local_k, dim=1)
            cand_s[:, :local_k] = top_s.float()
            cand_code[:, :local_k] = (top_i + offset) * num_classes + train_y[top_i]
        # every process's k candidates for this process's rows: [rows, world * k]
        rows = slice(rank * per_rank, rank * per_rank + len(mine))
        all_s = _all_gather(cand_s)[:, rows].transpose(0, 1).flatten(1)
        all_code = _all_gather(cand_code)[:, rows].transpose(0, 1).flatten(1)
        # global top k by (similarity desc, index asc): two stable sorts, deterministic on ties
        by_index = all_code.argsort(dim=1, stable=True)
        all_s, all_code = all_s.gather(1, by_index), all_code.gather(1, by_index)
        top_s, by_sim = all_s.sort(dim=1, descending=True, stable=True)
        top_s, top_code = top_s[:, :k], all_code.gather(1, by_sim[:, :k])
        votes = torch.zeros(len(mine), num_classes, device=device)
        votes.scatter_add_(1, top_code % num_classes, (top_s / t).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=device)


@torch.no_grad()
def knn_hits(
    encoder: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    device: torch.device,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    k: int = 200,
    t: float = 0.1,
    amp_dtype: torch.dtype | None = None,
) -> tuple[int, int]:
    """``(correctly classified, total)`` val images of the weighted kNN of ``val_set`` against
    ``train_set`` (both with eval transforms), on the L2-normalised backbone features of
    :func:`pretrain.features.extract_features`; the same on every process.

    Collective: each process extracts its contiguous shard of each split and keeps it on
    ``device`` in :func:`feature_dtype`; :func:`sharded_knn_predict` classifies its val rows
    against all train shards; :func:`hit_counts` sums the counts. The encoder is put in eval mode
    (BN running statistics) and restored afterwards. ``amp_dtype``: the encoder runs under
    autocast to it (None: float32); the similarities stay in :func:`feature_dtype`.
    """
    kw = dict(normalize=True, gather=False, cpu=False, dtype=feature_dtype(device))
    with autocast_to(device, amp_dtype):
        train_f, train_y = extract_features(
            encoder, train_set, device, batch_size, num_workers, **kw
        )
        val_f, val_y = extract_features(encoder, val_set, device, batch_size, num_workers, **kw)
    num_classes = len(getattr(train_set, "classes", []))
    if not num_classes:  # no class list: the largest label of any shard + 1
        num_classes = max(comm.all_gather(int(train_y.max()) if len(train_y) else -1)) + 1
    pred = sharded_knn_predict(train_f, train_y.to(device), val_f, num_classes, k, t)
    return hit_counts(pred, val_y)


def hit_counts(pred: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """``(correct, total)`` of this process's predictions ``pred`` of ``labels``, summed over all
    processes (collective)."""
    counts = comm.all_gather((int((pred.cpu() == labels).sum()), len(labels)))
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def knn_top1(
    encoder: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    device: torch.device,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    k: int = 200,
    t: float = 0.1,
) -> float:
    """kNN top-1 accuracy (%) of ``val_set`` against ``train_set``: :func:`knn_hits` (collective;
    each process holds only its shard of the train features), NaN for an empty val set."""
    hits, total = knn_hits(
        encoder, train_set, val_set, device,
        batch_size=batch_size, num_workers=num_workers, k=k, t=t,
    )  # fmt: skip
    if not total:
        return float("nan")
    # a float32 mean, as the unsharded monitor computed it: the same number for the same hits
    return 100.0 * (torch.tensor(hits, dtype=torch.float32) / total).item()
