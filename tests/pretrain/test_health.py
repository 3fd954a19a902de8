"""pretrain.health: the metric formulas against brute force, the stats every method leaves, the
hook's host reads (none outside log steps), instance retrieval, and a real run's metrics.json."""

import json
import logging
from collections import Counter
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from torch import nn

from pretrain.config import get_pretrain_cfg, load_pretrain_cfg
from pretrain.data import RobustImageFolder, moco_v2_transform
from pretrain.pretrainer import Pretrainer
from pretrain.health import (
    HEALTH_KEYS,
    HealthHook,
    alignment,
    contrastive_top1,
    emb_std,
    embedding_stats,
    instance_retrieval_top1,
    retrieval_subset,
    retrieval_top1,
    uniformity,
    view_retrieval_top1,
)
from pretrain.io import UserError
from pretrain.lincls.config import get_lincls_cfg
from pretrain.lincls.metrics import frozen_retrieval
from pretrain.lincls.weights import build_linear_model, load_pretrained
from pretrain.losses import dcl, infonce
from pretrain.methods import MoCoV2, SimCLR, SimCo, SimMoCo, SiMo
from pretrain.models import build_encoder


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


# ---------------------------------------------------------------- formulas vs brute force
def test_alignment_uniformity_std_match_brute_force():
    q, k = _unit(7, 5, 0), _unit(7, 5, 1)
    ql, kl = q.tolist(), k.tolist()
    n, d = 7, 5
    want_align = sum(sum((a - b) ** 2 for a, b in zip(qi, ki)) for qi, ki in zip(ql, kl)) / n
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    want_unif = math.log(
        sum(math.exp(-2 * sum((a - b) ** 2 for a, b in zip(ql[i], ql[j]))) for i, j in pairs)
        / len(pairs)
    )
    stds = []
    for c in range(d):
        col = [row[c] for row in ql]
        mean = sum(col) / n
        stds.append(math.sqrt(sum((x - mean) ** 2 for x in col) / n))
    want_std = sum(stds) / d
    assert alignment(q, k).item() == pytest.approx(want_align, rel=1e-12)
    assert uniformity(q).item() == pytest.approx(want_unif, rel=1e-12)
    assert emb_std(q).item() == pytest.approx(want_std, rel=1e-12)
    assert 0 < want_align < 4 and -4 < want_unif < 0


def test_degenerate_embeddings():
    row = _unit(1, 6, 3)
    same = row.expand(5, 6).clone()
    assert emb_std(same).item() == 0.0
    assert uniformity(same).item() == pytest.approx(0.0, abs=1e-15)  # fully collapsed: the max
    assert alignment(same, same).item() == 0.0
    assert alignment(same, -same).item() == pytest.approx(4.0)  # antipodal: the max
    assert math.isnan(uniformity(row).item())  # no pair to measure
    # well spread embeddings: the per-dimension std is about 1/sqrt(dim)
    assert emb_std(_unit(4096, 64, 4)).item() == pytest.approx(1 / 8, rel=0.02)


def test_contrastive_top1_counts_ties_as_failures():
    pos = torch.tensor([0.5, 0.5, 0.1, 0.9])
    neg = torch.tensor([[0.4, 0.5], [0.1, 0.2], [0.3, 0.0], [0.9 - 1e-6, -1.0]])
    assert contrastive_top1(pos, neg).item() == pytest.approx(2 / 4)
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 4, (50,), generator=g).double()
    neg = torch.randint(0, 4, (50, 3), generator=g).double()  # many exact ties
    want = sum(all(p > s for s in row) for p, row in zip(pos.tolist(), neg.tolist())) / 50
    assert contrastive_top1(pos, neg).item() == pytest.approx(want)
    assert 0 < want < 1


def test_embedding_stats_are_detached_float32():
    q = _unit(6, 4, 0).float().requires_grad_()
    k = _unit(6, 4, 1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = embedding_stats(q, k, torch.tensor(0.5))
    assert tuple(stats) == HEALTH_KEYS
    for v in stats.values():
        assert v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad
    want = alignment(q.detach().double(), k.double()).item()
    assert stats["health/alignment"].item() == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- stats of every method
def _identity_method(name, loss=infonce, symmetric=False):
    """The method on raw embeddings (identity encoder): forward(x1, x2) contrasts normalised x."""
    common = dict(loss_fn=loss, tau=0.2, symmetric=symmetric, seed=0)
    if name == "simo":
        return SiMo(nn.Identity(), momentum=0.0, num_negatives=3, **common)
    if name == "mocov2":
        return MoCoV2(nn.Identity(), momentum=0.0, dim=5, queue_size=16, **common)
    if name == "simclr":
        return SimCLR(nn.Identity(), momentum=None, **common)
    if name == "simmoco":
        return SimMoCo(nn.Identity(), momentum=0.0, **common)
    return SimCo(nn.Identity(), momentum=None, **common)


@pytest.mark.parametrize("name", ["simo", "mocov2", "simclr", "simmoco", "simco"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_every_method_records_health_stats(name, symmetric):
    x1 = _unit(8, 5, 0).float() * 3  # unnormalised: the method normalises
    x2 = _unit(8, 5, 1).float()
    model = _identity_method(name, symmetric=symmetric)
    out = model.losses(x1, x2)
    assert set(out) == {"loss"}  # SimpleTrainer sums every entry: stats must not be there
    stats = model.stats
    assert tuple(stats) == HEALTH_KEYS
    q, k = F.normalize(x1, dim=1), F.normalize(x2, dim=1)
    assert stats["health/alignment"].item() == pytest.approx(alignment(q, k).item(), rel=1e-6)
    assert stats["health/uniformity"].item() == pytest.approx(uniformity(q).item(), rel=1e-6)
    assert stats["health/emb_std"].item() == pytest.approx(emb_std(q).item(), rel=1e-6)
    assert 0.0 <= stats["health/contrastive_top1"].item() <= 1.0
    # identical views: every positive (cosine 1) beats every other image -> top-1 is exactly 1
    # (also for symmetric MoCo v2: neither half finds a key of its own image in the queue)
    model = _identity_method(name, symmetric=symmetric)
    model.losses(x1, x1.clone())
    assert model.stats["health/contrastive_top1"].item() == 1.0
    assert model.stats["health/alignment"].item() == pytest.approx(0.0, abs=1e-6)
    # opposite views: every positive (cosine -1) loses -> 0
    model = _identity_method(name, symmetric=symmetric)
    model.losses(x1, -x1)
    assert model.stats["health/contrastive_top1"].item() == 0.0
    assert model.stats["health/alignment"].item() == pytest.approx(4.0, rel=1e-6)


def test_symmetric_top1_averages_the_two_halves():
    x1, x2 = _unit(8, 5, 2).float(), _unit(8, 5, 3).float()
    z1, z2 = F.normalize(x1, dim=1), F.normalize(x2, dim=1)

    def half(q, k):
        sims = q @ k.t()
        return sum(
            all(sims[i, i] > sims[i, j] for j in range(8) if j != i) for i in range(8)
        ) / 8

    model = _identity_method("simco", symmetric=True)
    model.losses(x1, x2)
    want = 0.5 * (half(z1, z2) + half(z2, z1))
    assert model.stats["health/contrastive_top1"].item() == pytest.approx(want)
    # SimCLR's 2n anchors: one contrast over both views, same average by construction
    model = _identity_method("simclr", loss=dcl)
    model.losses(x1, x2)
    sims = torch.cat([z1, z2]) @ torch.cat([z1, z2]).t()
    wins = sum(
        all(sims[a, (a + 8) % 16] > sims[a, j] for j in range(16) if j not in (a, (a + 8) % 16))
        for a in range(16)
    )
    assert model.stats["health/contrastive_top1"].item() == pytest.approx(wins / 16)


# ---------------------------------------------------------------- the hook's host reads
class _FakeMethod:
    stats = {}


def _count_host_reads(monkeypatch):
    calls = []
    for name in ("item", "cpu", "tolist", "numpy", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return calls


def test_hook_reads_the_device_once_per_log_period(monkeypatch):
    model = _FakeMethod()
    hook = HealthHook(model, period=4)
    with EventStorage(0) as storage:
        hook.trainer = SimpleNamespace(iter=0, max_iter=6, storage=storage)
        hook.before_train()
        per_step = [
            {key: torch.tensor(float(10 * i + j)) for j, key in enumerate(HEALTH_KEYS)}
            for i in range(6)
        ]
        calls = _count_host_reads(monkeypatch)
        reads = []
        for it in range(6):
            model.stats = per_step[it]
            hook.trainer.iter = it
            storage.iter = it
            calls.clear()
            hook.after_step()
            reads.append(list(calls))
        monkeypatch.undo()
        # iterations 0-2: nothing read back; 3 ((3 + 1) % 4 == 0): one read; 4: none; 5 (last): one
        assert reads == [[], [], [], ["tolist"], [], ["tolist"]]
        latest = storage.latest()
        for j, key in enumerate(HEALTH_KEYS):
            value, it = latest[f"[metric]{key}"]
            assert it == 5 and value == pytest.approx(j + 10 * (4 + 5) / 2)  # mean of steps 4, 5
        history = storage.history(f"[metric]{HEALTH_KEYS[1]}").values()
        assert history[0] == (pytest.approx(1 + 10 * (0 + 1 + 2 + 3) / 4), 3)


# ---------------------------------------------------------------- instance retrieval
def test_retrieval_top1_of_features():
    f = _unit(10, 6, 0)
    assert retrieval_top1(f, f) == 100.0
    assert retrieval_top1(f, f.roll(1, dims=0)) == 0.0
    half = f.clone()
    half[:5] = f[:5].roll(1, dims=0)  # rows 0-4 now point at each other's images
    assert retrieval_top1(f, half) == pytest.approx(50.0)


def test_identical_views_are_always_retrieved():
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 16, 32)
    images = torch.randn(12, 3, 16, 16)
    batches = [images[:5], images[5:]]
    assert view_retrieval_top1(encoder, batches, batches, torch.device("cpu")) == 100.0
    assert encoder.training  # restored
    shifted = [images.roll(1, dims=0)[:5], images.roll(1, dims=0)[5:]]
    assert view_retrieval_top1(encoder, batches, shifted, torch.device("cpu")) == 0.0


@pytest.fixture(scope="module")
def shapes(shapes_folder):
    return shapes_folder(48, 16, 32)


def test_instance_retrieval_is_deterministic(shapes):
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 16, 32).eval()
    val = RobustImageFolder(os.path.join(shapes, "val"), moco_v2_transform(16, (0.2, 1.0)))
    rng = torch.get_rng_state()
    kw = dict(size=10, seed=3, batch_size=4)
    first = instance_retrieval_top1(encoder, val, torch.device("cpu"), **kw)
    second = instance_retrieval_top1(encoder, val, torch.device("cpu"), **kw)
    assert first == second and 0.0 <= first <= 100.0
    assert first * 10 / 100 == pytest.approx(round(first * 10 / 100))  # k hits out of 10
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG stream is untouched
    assert not encoder.training  # restored to eval
    # the two views really are different augmentations
    assert not torch.equal(val[(0, 1)][0], val[(0, 2)][0])
    assert torch.equal(val[(0, 1)][0], val[(0, 1)][0])


def test_retrieval_subset_is_evenly_spaced_and_class_stratified():
    assert retrieval_subset(1000, 256)[:4] == [0, 3, 7, 11]
    assert retrieval_subset(10, 256) == list(range(10))  # a small split: all of it
    assert retrieval_subset(0, 256) == []
    # the demo's val split in ImageFolder order: 5 classes x 200 images, class by class. The
    # first 256 would be 200 of class 0 and 56 of class 1; the subset holds every class equally
    labels = [c for c in range(5) for _ in range(200)]
    counts = Counter(labels[i] for i in retrieval_subset(1000, 256))
    assert sum(counts.values()) == 256 and set(counts) == set(range(5))
    assert set(counts.values()) <= {51, 52}


class _Recording(torch.utils.data.Dataset):
    """40 constant images; remembers which ``(index, seed)`` items were read."""

    def __init__(self):
        self.read = []

    def __len__(self):
        return 40

    def __getitem__(self, item):
        self.read.append(item)
        return torch.full((3, 16, 16), float(item[0]) / 40), 0


def test_instance_retrieval_reads_the_spaced_subset_with_the_same_seeds_per_image():
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 16, 32).eval()
    data = _Recording()
    instance_retrieval_top1(encoder, data, torch.device("cpu"), size=10, seed=0, batch_size=4)
    first, second = data.read[:10], data.read[10:]
    assert [i for i, _ in first] == [i for i, _ in second] == retrieval_subset(40, 10)
    assert all(a != b for (_, a), (_, b) in zip(first, second))  # two different views
    data.read.clear()
    instance_retrieval_top1(encoder, data, torch.device("cpu"), size=10, seed=0, batch_size=3)
    assert data.read == first + second  # the same views whatever the batch size


def test_retrieval_size_config_key():
    assert get_pretrain_cfg().TEST.RETRIEVAL_SIZE == 256
    with pytest.raises(UserError, match="TEST.RETRIEVAL_SIZE must be >= 0"):
        load_pretrain_cfg("", ["TEST.RETRIEVAL_SIZE", "-1"], check_paths=False)


# ---------------------------------------------------------------- a real run
def test_short_run_logs_health_and_retrieval(shapes, tmp_path, caplog, tiny_pretrain_cfg):
    over = {
        "SOLVER.MAX_ITER": 5,
        "SOLVER.CHECKPOINT_PERIOD": 100,
        "LOG_PERIOD": 2,
        "TEST.KNN_PERIOD": 2,
        "TEST.KNN_K": 5,
    }
    cfg = tiny_pretrain_cfg(shapes, tmp_path / "run", **over)
    seed_all_rng(cfg.SEED)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    caplog.set_level(logging.INFO, logger="pretrain.pretrainer")
    results = Pretrainer(cfg).resume_or_load(resume=False).train()

    lines = (tmp_path / "run" / "metrics.json").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    logged = [m for m in metrics if "[metric]health/alignment" in m]
    assert [m["iteration"] for m in logged] == [1, 3, 4]  # every LOG_PERIOD and the last
    for m in logged:
        assert 0.0 <= m["[metric]health/contrastive_top1"] <= 1.0
        assert 0.0 <= m["[metric]health/alignment"] <= 4.0
        assert -4.0 <= m["[metric]health/uniformity"] <= 0.0
        assert 0.0 < m["[metric]health/emb_std"] <= 1.0
    retrieval = [m["instance_retrieval_top1"] for m in metrics if "instance_retrieval_top1" in m]
    assert len(retrieval) == 3  # iterations 1, 3 and after training
    for value in retrieval:
        assert 0.0 <= value <= 100.0
        assert value * 16 / 100 == pytest.approx(round(value * 16 / 100))  # k hits out of 16
    assert results["instance_retrieval_top1"] == retrieval[-1]
    assert 0.0 <= results["knn_top1"] <= 100.0
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["instance_retrieval_top1"] == retrieval[-1]
    assert any("instance retrieval top-1" in r.getMessage() for r in caplog.records)

    # the linear eval's retrieval of the saved backbone, with the pretraining's views and size,
    # is the monitor's last value: one metric, and a random-init backbone gets the same images
    lin = get_lincls_cfg()
    lin.merge_from_list(["MODEL.ARCH", "resnet18", "INPUT.SIZE", cfg.INPUT.SIZE,
                         "DATASETS.ROOT", shapes, "DATALOADER.NUM_WORKERS", 0,
                         "TEST.RETRIEVAL_SIZE", cfg.TEST.RETRIEVAL_SIZE,
                         "TEST.RETRIEVAL_MIN_SCALE", cfg.INPUT.MIN_SCALE,
                         "TEST.RETRIEVAL_MAX_SCALE", cfg.INPUT.MAX_SCALE])  # fmt: skip
    weights = load_pretrained(str(tmp_path / "run" / "model_final.pth"), "resnet18")
    net = build_linear_model("resnet18", 5, weights)
    batch = cfg.SOLVER.IMS_PER_BATCH
    assert frozen_retrieval(net, lin, torch.device("cpu"), batch) == {
        "instance_retrieval_top1": retrieval[-1],
        "retrieval_images": 16,  # the 16 val images (fewer than 256)
    }
