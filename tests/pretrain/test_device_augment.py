"""The device path of aug+ (INPUT.DEVICE_AUGMENT, pretrain/data/device_augment.py): the loader's
CPU share + augment_on_device on CPU tensors, against the all-CPU path (TwoCropsTransform)."""

import math
import os

import cv2
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from detectron2.utils.env import seed_all_rng
from PIL import Image
from torch.utils.data import default_collate

import pretrain.data
from pretrain.config import validate_pretrain_cfg
from pretrain.data import (
    DeviceView,
    RobustImageFolder,
    TwoCropsDeviceAugment,
    TwoCropsTransform,
    ViewParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augment_on_device,
    build_train_loader,
    gaussian_blur,
    moco_v2_transform,
    normalize_uint8,
    open_rgb,
    use_device_augment,
)
from pretrain.data.datasets import _seeded
from pretrain.data.device_augment import PARAM_NAMES, pack_view_params
from pretrain.io import UserError
from pretrain.pretrainer import Pretrainer

GREY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # augment_on_device's mean / std giving x / 255


@pytest.fixture(scope="module")
def photos():
    """Four of scikit-image's colour photographs at ImageNet-like 4:3 / 3:4 sizes."""
    import skimage.data

    arrays = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    sizes = [(200, 150), (150, 200), (180, 135), (160, 120)]
    return [
        Image.fromarray(a).resize(size, Image.BICUBIC)
        for a, size in zip(arrays + [skimage.data.rocket()], sizes)
    ]


def _planar(img):
    return torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())


def _on_device(u8, views, mean_std=None):
    """augment_on_device of uint8 ``[N, 3, H, W]`` with the parameters of ``views``."""
    params = torch.stack([pack_view_params(v) for v in views])
    return augment_on_device(u8, params, *(mean_std or ()))


# ---- (1) statistics of the two paths over 512 views ------------------------------------------


def test_device_path_matches_the_cpu_path_statistics(photos):
    # 256 images x 2 views at 64 px under the same sample seeds: the same draws, so the paths are
    # compared view by view, not only in distribution. Measured (2026-12-07, this code): channel
    # means and stds equal to 0.0007 (of 1); grey views 105 / 512 in both, the same ones; 224
    # views drew a blur, 196 were changed by it in both paths; per view the mean |difference| is
    # 0.20 grey levels on average (of 255), at most 1.3; 14 % of views are identical.
    size, n = 64, 256
    cpu = TwoCropsTransform(moco_v2_transform(size))
    dev = TwoCropsDeviceAugment(moco_v2_transform(size))
    aug = cpu.base_transform
    cpu_views, dev_views, draws = [], [], []
    for i in range(n):
        img = photos[i % len(photos)]
        cpu_views += _seeded(i, cpu, img)
        dev_views += _seeded(i, dev, img)
        draws += _seeded(i, lambda im: [aug.sample(*im.size), aug.sample(*im.size)], img)
    a = torch.stack(cpu_views).float() / 255
    batch = default_collate(dev_views)
    assert isinstance(batch, DeviceView) and batch.image.dtype == torch.uint8
    assert batch.params.shape == (2 * n, len(PARAM_NAMES))
    b = augment_on_device(batch.image, batch.params, *GREY)
    assert b.dtype == torch.float32 and b.shape == (2 * n, 3, size, size)
    # per-channel mean / std of the outputs
    assert torch.allclose(a.mean(dim=(0, 2, 3)), b.mean(dim=(0, 2, 3)), atol=0.002)
    assert torch.allclose(a.std(dim=(0, 2, 3)), b.std(dim=(0, 2, 3)), atol=0.002)

    # grey outputs: the same views, ~20 % of them
    def grey(x):
        return ((x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])).flatten(1).all(dim=1)

    assert torch.equal(grey(a), grey(b))
    assert 0.15 < grey(b).float().mean() < 0.25
    # blurred outputs: views the blur changed (sigma ~ U(0.1, 2), p = 0.5; a sigma below ~0.3
    # leaves 8-bit pixels as they are in both paths)
    blurred = torch.tensor([v.sigma is not None for v in draws])
    assert 0.43 < blurred.float().mean() < 0.57
    unblurred = [v._replace(sigma=None) for v in draws]
    cpu_sharp = torch.stack(
        [aug.render(photos[i // 2 % len(photos)], v) for i, v in enumerate(unblurred)]
    )
    cpu_changed = (cpu_sharp.float() / 255 != a).flatten(1).any(dim=1)
    sharp_params = batch.params.clone()
    sharp_params[:, PARAM_NAMES.index("sigma")] = 0
    dev_changed = (augment_on_device(batch.image, sharp_params, *GREY) != b).flatten(1).any(dim=1)
    assert not (cpu_changed & ~blurred).any() and not (dev_changed & ~blurred).any()
    assert abs(int(cpu_changed.sum()) - int(dev_changed.sum())) <= 3
    assert 0.35 < dev_changed.float().mean() < 0.55
    # view by view, in grey levels
    per_view = ((a - b).abs() * 255).flatten(1).mean(dim=1)
    assert per_view.mean() < 0.3 and per_view.max() < 2.0, (per_view.mean(), per_view.max())


# ---- (2) each op against the CPU path's op ---------------------------------------------------


def test_blend_ops_and_grayscale_give_the_cpu_paths_bytes(photos):
    # brightness, contrast, saturation (PIL blends, truncated) and grayscale (PIL's L) in float32
    # on integral levels: the CPU path's uint8 result exactly, after the same normalisation
    base = ViewParams((0, 0, 1, 1), None, False, None, False)
    for img in photos:
        u8 = _planar(img)[None]
        for k, op in enumerate((adjust_brightness, adjust_contrast, adjust_saturation)):
            for f in (0.6, 0.77, 1.0, 1.13, 1.4):
                factors = [1.0, 1.0, 1.0, 0.0]
                factors[k] = f
                view = base._replace(jitter=([2, 0, 3, 1], *factors))
                want = normalize_uint8(_planar(op(img, f))[None])
                assert torch.equal(_on_device(u8, [view]), want), (op.__name__, f)
        want = normalize_uint8(_planar(img.convert("L").convert("RGB"))[None])
        assert torch.equal(_on_device(u8, [base._replace(gray=True)]), want)
        # nothing drawn: normalize_uint8's numbers
        assert torch.equal(_on_device(u8, [base]), normalize_uint8(u8))


def test_hue_and_blur_are_close_to_the_cpu_paths(photos):
    # hue: a rotation of the HSV hue by int(255 h) / 256 turn in float, where the CPU path
    # (OpenCV) and torchvision (PIL, MoCo's) go through 8-bit H and S, each rounding its own
    # way. Measured on the 4 photos at their size, shifts -0.1 to 0.1: mean |difference| to the
    # CPU path 0.11-0.80 grey levels per shift (single pixels up to 7), to torchvision's PIL hue
    # 0.11-0.45 (up to 6), where the CPU path is 0.27-0.62 from torchvision's.
    base = ViewParams((0, 0, 1, 1), None, False, None, False)
    for img in photos:
        u8 = _planar(img)[None]
        for h in (-0.1, -0.05, -0.013, 0.02, 0.07, 0.1):
            view = base._replace(jitter=([0, 1, 2, 3], 1.0, 1.0, 1.0, h))
            got = _on_device(u8, [view], GREY)[0] * 255
            cpu = _planar(adjust_hue(img, h)).float()
            pil = _planar(TF.adjust_hue(img, h)).float()
            diff = (got - cpu).abs()
            assert diff.mean() < 1.0 and diff.max() <= 8, (h, diff.mean(), diff.max())
            to_pil = (got - pil).abs()
            assert to_pil.mean() < 0.6 and to_pil.max() <= 8, (h, to_pil.mean(), to_pil.max())
            assert to_pil.mean() < (cpu - pil).abs().mean() + 0.1
        # blur: the same sampled Gaussian, float32 kernel where OpenCV's is 8-bit fixed point;
        # measured: at most 1 grey level, on average at most 0.09
        for sigma in (0.1, 0.3, 0.55, 1.0, 1.37, 2.0):
            got = _on_device(u8, [base._replace(sigma=sigma)], GREY) * 255
            want = torch.from_numpy(gaussian_blur(np.asarray(img), sigma).transpose(2, 0, 1))
            diff = (got[0] - want.float()).abs()
            assert diff.max() <= 1.0 + 1e-4 and diff.mean() < 0.15, (sigma, diff.mean())


def test_hue_rotation_on_every_colour_is_close_to_opencvs():
    # the RGB cube (every 3rd level of each channel: 86^3 colours), shifts of up to 0.1 turn.
    # Measured: mean |difference| to the CPU path 0.55 grey levels, at most 9 (saturated colours,
    # where one 8-bit H step of the CPU path moves a channel most); to torchvision's PIL hue
    # 0.59-0.65, at most 12; the CPU path is 1.09 (at most 13) from torchvision's
    levels = np.arange(0, 256, 3, dtype=np.uint8)
    r, g, b = np.meshgrid(levels, levels, levels, indexing="ij")
    img = Image.fromarray(np.stack([r, g, b], axis=-1).reshape(len(levels) ** 2, len(levels), 3))
    u8 = _planar(img)[None]
    base = ViewParams((0, 0, 1, 1), None, False, None, False)
    for h in (-0.1, -0.02, 0.05, 0.1):
        got = _on_device(u8, [base._replace(jitter=([3, 0, 1, 2], 1, 1, 1, h))], GREY) * 255
        diff = (got - _planar(adjust_hue(img, h)).float()).abs()
        assert diff.mean() < 0.7 and diff.max() <= 12, (h, diff.mean(), diff.max())
        to_pil = (got - _planar(TF.adjust_hue(img, h)).float()).abs()
        assert to_pil.mean() < 0.8 and to_pil.max() <= 14, (h, to_pil.mean(), to_pil.max())


def test_blur_kernel_and_edges_are_opencvs():
    # random float images: the device blur (OpenCV's getGaussianKernel, symmetric edges, each
    # view's sigma, kernels zero-padded to the widest of the batch, sigma 0 = no blur) is OpenCV's
    # float blur up to its final rounding; 5 x 4 views: edges reflected more than once
    rng = np.random.default_rng(0)
    for h, w in ((21, 17), (5, 4)):
        img = rng.integers(0, 256, (3, 3, h, w)).astype(np.float32)
        for sigmas in ((0.4, 2.0, 0.0), (1.0, 0.0, 0.55)):
            want = img.copy()
            for i, sigma in enumerate(sigmas):
                if sigma:
                    k = 2 * math.ceil(3 * sigma) + 1
                    hwc = np.ascontiguousarray(img[i].transpose(1, 2, 0))
                    blurred = cv2.GaussianBlur(hwc, (k, k), sigma, sigma,
                                               borderType=cv2.BORDER_REFLECT)  # fmt: skip
                    want[i] = blurred.transpose(2, 0, 1)
            got = pretrain.data.device_augment.gaussian_blur_batch(
                torch.from_numpy(img.copy()), torch.tensor(sigmas)
            ).numpy()
            assert np.abs(got - want).max() <= 0.5 + 1e-3, (h, w, sigmas)
            assert np.array_equal(got[np.array(sigmas) == 0], img[np.array(sigmas) == 0])


def test_colour_order_and_the_whole_chain_are_the_cpu_paths(photos):
    # the four ops in several drawn orders, then grey and blur: as the CPU path's render, up to
    # the hue / blur rounding and what later ops make of it (measured: mean |difference| 0.16-0.21
    # grey levels with grey, 0.41-0.56 without; single pixels up to 8)
    aug = moco_v2_transform(48)
    img = photos[0]
    torch.manual_seed(0)
    box = aug.sample(*img.size).box
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
        for gray, sigma in ((False, None), (True, None), (False, 1.3)):
            view = ViewParams(box, (order, 1.3, 0.7, 1.25, -0.07), gray, sigma, True)
            geometry = aug.render(img, view._replace(jitter=None, gray=False, sigma=None))
            got = _on_device(geometry[None], [view], GREY)[0] * 255
            diff = (got - aug.render(img, view).float()).abs()
            assert diff.mean() < 0.8 and diff.max() <= 12, (order, gray, sigma, diff.mean())


# ---- (3) the parameters are the CPU path's draws: seeded, reproducible, resumable -------------


def test_cpu_share_is_the_cpu_paths_geometry_and_draws(tmp_path, photos):
    path = str(tmp_path / "photo.jpg")
    photos[0].resize((500, 375)).save(path, quality=90)
    aug = moco_v2_transform(96)
    dev, cpu = TwoCropsDeviceAugment(aug), TwoCropsTransform(aug)
    for seed in (0, 1, 7):
        first, again = _seeded(seed, dev.load, path), _seeded(seed, dev.load, path)
        for v, w in zip(first, again):
            assert torch.equal(v.image, w.image) and torch.equal(v.params, w.params)
        img = Image.open(path).convert("RGB")
        draws = _seeded(seed, lambda im: [aug.sample(*im.size), aug.sample(*im.size)], img)
        # the CPU path's decode of the file (reduced by 2 for some seeds at 96 px)
        decoded, factor = open_rgb(path, lambda w, h: aug.draft_factor(draws))
        for v, draw in zip(first, draws):
            assert torch.equal(v.params, pack_view_params(draw))
            plain = draw._replace(jitter=None, gray=False, sigma=None)
            # the same crop, resize and flip
            assert torch.equal(v.image, aug.render(decoded, plain, factor))
        # the RNG stream moves as in the CPU path (so every later draw is the same too)
        after = [_seeded(seed, lambda p: (t.load(p), torch.rand(2))[1], path) for t in (dev, cpu)]
        assert torch.equal(*after)
    with pytest.raises(ValueError, match="ImageNet"):
        TwoCropsDeviceAugment(moco_v2_transform(32, mean=(0.5,) * 3, std=(0.5,) * 3))


def test_loader_resume_gives_the_same_device_batches(shapes_folder):
    root = os.path.join(shapes_folder(48, 16, 32, style="colour"), "train")
    ds = RobustImageFolder(root, TwoCropsDeviceAugment(moco_v2_transform(16)))
    full = build_train_loader(ds, 8, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(3)]
    resumed = build_train_loader(ds, 8, seed=3)
    resumed.load_state_dict({"epoch": 0, "batch": 2})
    (q, k), labels = next(iter(resumed))
    (q2, k2), labels2 = batches[2]
    assert isinstance(q, DeviceView) and q.image.shape == (8, 3, 16, 16)
    for a, b in ((q, q2), (k, k2)):
        assert torch.equal(a.image, b.image) and torch.equal(a.params, b.params)
    assert torch.equal(labels, labels2)
    assert not torch.equal(batches[0][0][0].params, batches[1][0][0].params)


# ---- (4) selection: INPUT.DEVICE_AUGMENT -------------------------------------------------------


def test_device_augment_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_device_augment("auto", cpu) and use_device_augment("auto", cuda)
    assert use_device_augment("on", cpu) and not use_device_augment("off", cuda)
    with pytest.raises(ValueError, match="INPUT.DEVICE_AUGMENT"):
        use_device_augment("gpu", cpu)
    from pretrain.config import get_pretrain_cfg

    cfg = get_pretrain_cfg()
    assert cfg.INPUT.DEVICE_AUGMENT == "auto"
    cfg.INPUT.DEVICE_AUGMENT = "yes"
    with pytest.raises(UserError, match=r"^INPUT.DEVICE_AUGMENT 'yes' is unknown"):
        validate_pretrain_cfg(cfg, check_paths=False)


def _trainer(cfg):
    seed_all_rng(cfg.SEED)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    return Pretrainer(cfg).resume_or_load(resume=False)


def test_auto_on_cpu_keeps_the_cpu_path(shapes_folder, tmp_path, tiny_pretrain_cfg):
    root = shapes_folder(48, 16, 32, style="colour")
    trainer = _trainer(tiny_pretrain_cfg(root, tmp_path / "auto"))
    ds = trainer.dataset
    assert type(ds.transform) is TwoCropsTransform
    # the views of today's pipeline for the same sample seed, byte for byte
    before = RobustImageFolder(ds.root, TwoCropsTransform(moco_v2_transform(16, (0.2, 1.0))))
    for index in ((0, 11), (5, 2**40 + 3)):
        (q, k), _ = ds[index]
        (q0, k0), _ = before[index]
        assert q.dtype == torch.uint8 and torch.equal(q, q0) and torch.equal(k, k0)


def test_on_runs_the_device_path_on_cpu(shapes_folder, tmp_path, tiny_pretrain_cfg, monkeypatch):
    calls = []
    real = pretrain.data.augment_on_device

    def counting(images, params, *args):
        calls.append(images.shape[0])
        return real(images, params, *args)

    monkeypatch.setattr(pretrain.data, "augment_on_device", counting)
    root = shapes_folder(48, 16, 32, style="colour")
    over = {"INPUT.DEVICE_AUGMENT": "on", "SOLVER.MAX_ITER": 4, "SOLVER.CHECKPOINT_PERIOD": 10}
    trainer = _trainer(tiny_pretrain_cfg(root, tmp_path / "on", **over))
    assert type(trainer.dataset.transform) is TwoCropsDeviceAugment
    results = trainer.train()
    losses = [v for v, _ in trainer.trainer.storage.history("total_loss").values()]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert results["final_loss"] is not None and np.isfinite(results["final_loss"])
    assert calls == [8] * 8  # both views of every step, batch 8
