"""pretrain.data: robust ImageFolder, aug+ two-crop pipeline, resumable distributed sampler."""

import logging
import os

import numpy as np
import pytest
import torch
import cv2
from PIL import Image

from pretrain.data import (
    GaussianBlur,
    ResumableDistributedSampler,
    RobustImageFolder,
    TwoCropsTransform,
    build_train_loader,
    eval_transform,
    load_rgb,
    moco_v2_transform,
)
from pretrain.io import UserError


def _rgb(rng, size=40):
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def messy_folder(tmp_path):
    """Two classes: 4 good RGB JPEGs, a CMYK JPEG, a PNG with alpha, a palette PNG, a 16-bit
    grayscale PNG, a truncated JPEG and a text file named .jpg."""
    rng = np.random.default_rng(0)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i in range(4):
        _rgb(rng).save(a / f"good{i}.jpg", quality=95)
    _rgb(rng).convert("CMYK").save(a / "cmyk.jpg")
    rgba = np.concatenate(
        [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), np.zeros((40, 40, 1), np.uint8)], 2
    )
    Image.fromarray(rgba, "RGBA").save(b / "alpha.png")
    _rgb(rng).convert("P").save(b / "palette.png")
    Image.fromarray(np.full((40, 40), 65535, np.uint16)).save(b / "gray16.png")
    full = tmp_path / "full.jpg"
    _rgb(rng, 64).save(full, quality=95)
    data = full.read_bytes()
    (b / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (b / "notes.jpg").write_text("this is not an image\n")
    return tmp_path


def test_load_rgb_converts_modes(messy_folder):
    for name in ["a/cmyk.jpg", "b/alpha.png", "b/palette.png", "b/gray16.png", "a/good0.jpg"]:
        img = load_rgb(str(messy_folder / name))
        assert img.mode == "RGB" and img.size == (40, 40), name
    # fully transparent pixels are composited over white, a 16-bit white stays white (not clipped)
    assert np.asarray(load_rgb(str(messy_folder / "b/alpha.png"))).min() == 255
    assert np.asarray(load_rgb(str(messy_folder / "b/gray16.png"))).min() == 255
    with pytest.raises(OSError):
        load_rgb(str(messy_folder / "b/truncated.jpg"))


def test_robust_folder_skips_and_counts_bad_files(messy_folder, caplog):
    ds = RobustImageFolder(str(messy_folder), transform=eval_transform(32))
    names = [os.path.relpath(p, messy_folder) for p, _ in ds.samples]
    bad = {names.index("b/truncated.jpg"), names.index("b/notes.jpg")}
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        for _epoch in range(2):  # the second pass must not log again
            for i in range(len(ds)):
                img, target = ds[i]
                assert img.shape == (3, 32, 32) and target in (0, 1)
    assert ds.num_bad == 2
    assert sorted(os.path.relpath(p, messy_folder) for p in ds.bad_files()) == [
        "b/notes.jpg",
        "b/truncated.jpg",
    ]
    skipped = [r for r in caplog.records if "Skipping unreadable image" in r.getMessage()]
    assert len(skipped) == 2
    # a bad index returns the next readable sample (deterministic replacement)
    for i in bad:
        j = (i + 1) % len(ds)
        while j in bad:
            j = (j + 1) % len(ds)
        assert torch.equal(ds[i][0], ds[j][0])


def test_bad_count_is_shared_by_loader_workers(messy_folder):
    ds = RobustImageFolder(str(messy_folder), transform=TwoCropsTransform(moco_v2_transform(24)))
    loader = build_train_loader(ds, total_batch_size=5, num_workers=2, seed=0)
    it = iter(loader)
    seen = 0
    for _ in range(2 * loader.batches_per_epoch):  # two epochs through worker processes
        (im_q, im_k), _target = next(it)
        assert im_q.shape == im_k.shape == (5, 3, 24, 24)
        seen += 5
    # only 10 files, 2 batches/epoch: every index was visited, so both bad files were met
    assert ds.num_bad == 2
    assert loader.state_dict() == {"epoch": 1, "batch": 2}


def test_missing_or_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such image folder"):
        RobustImageFolder(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no class sub-folders"):
        RobustImageFolder(str(tmp_path))
    (tmp_path / "cls").mkdir()
    with pytest.raises(UserError, match="no image files"):
        RobustImageFolder(str(tmp_path))


def test_two_crops_differ_and_seeded_index_is_reproducible(messy_folder):
    ds = RobustImageFolder(str(messy_folder), transform=TwoCropsTransform(moco_v2_transform(24)))
    (v1, v2), _ = ds[(0, 1234)]
    assert v1.shape == (3, 24, 24) and not torch.equal(v1, v2)
    state = torch.get_rng_state()
    (w1, w2), _ = ds[(0, 1234)]
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG stream is untouched
    (u1, _), _ = ds[(0, 99)]
    assert not torch.equal(u1, v1)


def test_sampler_partitions_epoch_and_resumes_mid_epoch():
    n, world = 23, 3
    per_rank = [
        list(ResumableDistributedSampler(n, seed=5, num_replicas=world, rank=r))
        for r in range(world)
    ]
    flat = [i for r in per_rank for i in r]
    assert all(len(r) == n // world for r in per_rank)
    assert len(set(flat)) == len(flat) == (n // world) * world  # disjoint, drop_last
    s = ResumableDistributedSampler(n, seed=5, num_replicas=world, rank=1)
    s.set_start(3)
    assert list(s) == per_rank[1][3:] and len(s) == n // world - 3
    s.set_start(0)
    s.set_epoch(1)
    assert list(s) != per_rank[1]  # a new permutation each epoch
    # per-sample seeds depend on (seed, epoch, index) only, not on the rank or start position
    a = dict(ResumableDistributedSampler(n, seed=5, sample_seeds=True, num_replicas=1, rank=0))
    b = ResumableDistributedSampler(n, seed=5, sample_seeds=True, num_replicas=world, rank=2)
    b.set_start(2)
    assert all(a[i] == seed for i, seed in b)


def test_loader_resume_gives_same_batches(tmp_path):
    rng = np.random.default_rng(1)
    for c in ("x", "y"):
        (tmp_path / c).mkdir()
        for i in range(6):
            _rgb(rng, 32).save(tmp_path / c / f"{i}.png")
    ds = RobustImageFolder(str(tmp_path), transform=TwoCropsTransform(moco_v2_transform(16)))
    straight = build_train_loader(ds, 4, seed=3)
    it = iter(straight)
    ref = [next(it) for _ in range(7)]  # 3 batches / epoch: crosses two epoch boundaries
    first = build_train_loader(ds, 4, seed=3)
    it = iter(first)
    for _ in range(4):
        next(it)
    resumed = build_train_loader(ds, 4, seed=3)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    for expected in ref[4:]:
        got = next(it)
        assert torch.equal(got[0][0], expected[0][0]) and torch.equal(got[0][1], expected[0][1])
        assert torch.equal(got[1], expected[1])


def test_batch_larger_than_dataset_is_a_user_error(messy_folder):
    ds = RobustImageFolder(str(messy_folder), transform=eval_transform(16))
    with pytest.raises(UserError, match="fewer than one batch"):
        build_train_loader(ds, 64)


def test_gaussian_blur_is_opencvs_with_a_torch_seeded_sigma():
    # the aug+ blur: a true Gaussian of sigma ~ U(0.1, 2) from torch's RNG (OpenCV; MoCo's PIL
    # box approximation of it is compared in test_data_pipeline.py)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8))
    blur = GaussianBlur((0.1, 2.0))
    torch.manual_seed(5)
    out = blur(img)
    torch.manual_seed(5)
    sigma = 0.1 + 1.9 * float(torch.rand(()))
    k = 2 * int(np.ceil(3 * sigma)) + 1
    expected = cv2.GaussianBlur(np.asarray(img), (k, k), sigmaX=sigma, sigmaY=sigma,
                                borderType=cv2.BORDER_REFLECT)
    assert 0.1 <= sigma <= 2.0
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    torch.manual_seed(5)
    assert np.array_equal(np.asarray(blur(img)), np.asarray(out))  # same seed, same output
    # it blurs: the pixel noise's variance drops
    assert np.asarray(out, dtype=np.float32).std() < np.asarray(img, dtype=np.float32).std()
