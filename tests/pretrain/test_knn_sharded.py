"""The sharded kNN (pretrain.knn): every process keeps only its contiguous shard of the train
features, scores val chunks against it and the k candidates per val row are merged across
processes. One process reproduces the unsharded reference (knn_predict); two gloo processes give
the same predictions and top-1, with an odd number of train rows, k larger than one shard, an
empty shard, several val chunks, exact ties across shards (lower global index wins), the monitor
end to end (knn_top1 on a tiny encoder) and linear eval's knn_accuracy on cached features."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from detectron2.utils import comm
from torch.utils.data import Dataset

import pretrain.knn as knn
from pretrain.features import extract_features
from pretrain.knn import (
    contiguous_shard,
    feature_dtype,
    knn_predict,
    knn_top1,
    sharded_knn_predict,
)
from pretrain.lincls.data import CachedFeatures
from pretrain.lincls.metrics import knn_accuracy
from pretrain.models import build_encoder

CPU = torch.device("cpu")
CLASSES = 4
N_TRAIN, N_VAL = 101, 37  # odd: shards of 51 / 50 train and 19 / 18 val rows on two processes
# k: one neighbour, below a shard, above one shard (51) but below the total, above the total
KS = (1, 7, 60, 150)
CHUNKS = (None, 3)  # sized from the shard (one chunk here), or 1 row per process per chunk


def _clustered(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` L2-normalised 16-d features around 4 class centres, overlapping (kNN top-1 well
    above chance and below 100%), and their labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, 16, generator=torch.Generator().manual_seed(0))
    y = torch.randint(CLASSES, (n,), generator=g)
    return F.normalize(centres[y] + 1.2 * torch.randn(n, 16, generator=g), dim=1), y


def _ties() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 train rows, rows 1 (label 2, rank 0's second) and 2 (label 3, rank 1's first) equal;
    the val row is nearest to them: with k=1 the lower global index (row 1) must win."""
    train = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 0.2], [1.0, 0.2], [-1.0, 0.0]]), dim=1)
    return train, torch.tensor([0, 2, 3, 1]), F.normalize(torch.tensor([[1.0, 0.25]]), dim=1)


class _Images(Dataset):
    """``n`` seeded 16 px images: a class pattern (label ``i % 3``) plus noise."""

    classes = ["a", "b", "c"]

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        patterns = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        self.labels = torch.arange(n) % 3
        self.images = patterns[self.labels] + 1.5 * torch.randn(n, 3, 16, 16, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


def _encoder():
    torch.manual_seed(0)
    return build_encoder("resnet18", 16, 32)


def _old_knn_top1(encoder, train_set, val_set, k, t, batch_size):
    """The monitor before sharding: every process gathers all features, then knn_predict."""
    args = (CPU, batch_size)
    train_f, train_y = extract_features(encoder, train_set, *args, normalize=True)
    val_f, val_y = extract_features(encoder, val_set, *args, normalize=True)
    pred = knn_predict(train_f, train_y, val_f, 3, k, t)
    return 100.0 * (pred == val_y).float().mean().item(), pred


def test_feature_dtype_and_contiguous_shards():
    assert feature_dtype(CPU) == torch.float32
    assert feature_dtype(torch.device("cuda", 0)) == torch.float16
    # as detectron2's InferenceSampler: the first n % world ranks get one more row, no padding
    from detectron2.data.samplers import InferenceSampler

    for n, world in [(101, 2), (7, 3), (1, 2), (0, 2), (1281167, 8)]:
        parts = [contiguous_shard(n, r, world) for r in range(world)]
        assert [p.start for p in parts[1:]] == [p.stop for p in parts[:-1]]
        assert parts[0].start == 0 and parts[-1].stop == n
        for r, p in enumerate(parts):
            assert range(n)[p] == InferenceSampler._get_local_indices(n, world, r)
    assert contiguous_shard(5) == slice(0, 5)  # no process group: one process holds all


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("k", KS)
def test_one_process_equals_the_unsharded_reference(k, chunk):
    train, train_y = _clustered(N_TRAIN, 1)
    val, val_y = _clustered(N_VAL, 2)
    pred = sharded_knn_predict(train, train_y, val, CLASSES, k, 0.1, chunk=chunk)
    assert torch.equal(pred, knn_predict(train, train_y, val, CLASSES, k, 0.1))
    assert 40 < 100.0 * (pred == val_y).float().mean().item() < 100
    assert sharded_knn_predict(train, train_y, val[:0], CLASSES, k).shape == (0,)


def _features_worker(rank, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    train, train_y = _clustered(N_TRAIN, 1)
    val, val_y = _clustered(N_VAL, 2)
    tr, va = contiguous_shard(N_TRAIN), contiguous_shard(N_VAL)
    out = {"shard": (len(train[tr]), len(val[va]))}
    for k in KS:
        for chunk in CHUNKS:
            pred = sharded_knn_predict(train[tr], train_y[tr], val[va], CLASSES, k, 0.1, chunk)
            out[k, chunk] = torch.cat(comm.all_gather(pred))
    # one train row: rank 1's shard is empty
    one = contiguous_shard(1)
    out["one"] = torch.cat(comm.all_gather(sharded_knn_predict(
        train[:1][one], train_y[:1][one], val[va], CLASSES, 5, 0.1
    )))  # fmt: skip
    # an exact tie across the shards (rows 1 and 2 equal): the lower global index wins
    t_train, t_y, t_val = _ties()
    part = contiguous_shard(4)
    out["tie"] = torch.cat(comm.all_gather(
        sharded_knn_predict(t_train[part], t_y[part], t_val[: 1 - rank], 4, k=1)
    ))  # fmt: skip
    # linear eval's TEST.KNN on cached features that every rank holds: each uses its shard
    cached = CachedFeatures(train * 3.0, train_y, val * 0.5, val_y)  # not normalised
    out["knn_accuracy"] = knn_accuracy(cached, CLASSES, 60, 0.1)
    if rank == 0:
        torch.save(out, result_file)
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_merge_their_shards_into_the_reference_predictions(tmp_path):
    result_file = str(tmp_path / "out.pt")
    # fork: the test module is not importable by name under --import-mode=importlib
    mp.start_processes(
        _features_worker,
        args=(str(tmp_path / "init"), result_file),
        nprocs=2,
        start_method="fork",
    )
    out = torch.load(result_file, weights_only=False)
    assert out["shard"] == (51, 19)  # rank 0's: about half of each split, never all of it
    train, train_y = _clustered(N_TRAIN, 1)
    val, val_y = _clustered(N_VAL, 2)
    for k in KS:
        reference = knn_predict(train, train_y, val, CLASSES, k, 0.1)
        for chunk in CHUNKS:
            assert torch.equal(out[k, chunk], reference), (k, chunk)
    assert torch.equal(out["one"], knn_predict(train[:1], train_y[:1], val, CLASSES, 5, 0.1))
    assert out["tie"].tolist() == [2]  # row 1 (rank 0) beats its equal row 2 (rank 1)
    cached = CachedFeatures(train * 3.0, train_y, val * 0.5, val_y)
    one_process = knn_accuracy(cached, CLASSES, 60, 0.1)
    reference = knn_predict(train, train_y, val, CLASSES, 60, 0.1)
    assert out["knn_accuracy"] == one_process
    assert one_process == 100.0 * int((reference == val_y).sum()) / N_VAL


N_IMAGES_TRAIN, N_IMAGES_VAL, K_IMAGES = 13, 9, 9  # 7 / 6 train images per process: k > a shard


def _monitor_worker(rank, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    shards = []
    original = knn.sharded_knn_predict

    def recording(train_f, *args, **kwargs):
        shards.append(tuple(train_f.shape))
        return original(train_f, *args, **kwargs)

    knn.sharded_knn_predict = recording  # this forked process only
    enc, train_set, val_set = _encoder(), _Images(N_IMAGES_TRAIN, 3), _Images(N_IMAGES_VAL, 4)
    top1 = knn_top1(enc, train_set, val_set, CPU, batch_size=1, k=K_IMAGES, t=0.1)
    old = _old_knn_top1(enc, train_set, val_set, K_IMAGES, 0.1, batch_size=1)
    all_shards = comm.all_gather(shards)
    if rank == 0:
        torch.save({"top1": top1, "old": old, "shards": all_shards}, result_file)
    dist.barrier()
    dist.destroy_process_group()


def test_knn_top1_on_two_processes_equals_one_process_and_the_old_monitor(tmp_path):
    result_file = str(tmp_path / "out.pt")
    mp.start_processes(
        _monitor_worker, args=(str(tmp_path / "init"), result_file), nprocs=2, start_method="fork"
    )
    out = torch.load(result_file, weights_only=False)
    # each process scored against its own 7 / 6 train features only
    assert out["shards"] == [[(7, 512)], [(6, 512)]]
    enc, train_set, val_set = _encoder(), _Images(N_IMAGES_TRAIN, 3), _Images(N_IMAGES_VAL, 4)
    # batch size 1: every image's feature is the same number whichever process extracts it
    one = knn_top1(enc, train_set, val_set, CPU, batch_size=1, k=K_IMAGES, t=0.1)
    old_top1, old_pred = _old_knn_top1(enc, train_set, val_set, K_IMAGES, 0.1, batch_size=1)
    assert out["top1"] == one == old_top1 == out["old"][0]  # exactly, not approximately
    assert torch.equal(out["old"][1], old_pred)
    assert 100.0 / 3 < one < 100.0
    # batches of 4 and k above the total (clamped to 13) on one process: still the old number
    assert knn_top1(enc, train_set, val_set, CPU, batch_size=4, k=200, t=0.1) == (
        _old_knn_top1(enc, train_set, val_set, 200, 0.1, batch_size=4)[0]
    )
