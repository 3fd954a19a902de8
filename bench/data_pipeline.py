#!/usr/bin/env python
"""Images/s of our pretraining input pipeline vs. MoCo's, one core, same files, e.g.

    python bench/data_pipeline.py --size 224 --seconds 20               # built-in photos
    python bench/data_pipeline.py --images /data/imagenet/train/n01440764 --seconds 20

* **ours**: ``TwoCropsTransform(moco_v2_transform(size)).load(path)`` under a per-sample seed, as
  ``RobustImageFolder`` runs it in a training loader: crops drawn from the JPEG header, one decode
  (reduced when both crops allow it), the exact-but-faster colour ops, the blur as a true
  Gaussian of the same sigma through OpenCV (one thread) where MoCo uses PIL's box approximation
  (docs/methods.md, "Augmentation"), uint8 ``[3, size, size]`` views (normalised later on the
  device);
* **ours_cpu_share**: the loader's share of the device path (``INPUT.DEVICE_AUGMENT``, what a
  GPU run does by default): ``TwoCropsDeviceAugment(moco_v2_transform(size)).load(path)`` under a
  per-sample seed: every random draw of both views, one (reduced) decode, crop + resize and flip,
  uint8 views plus their parameter vectors; the colour jitter, grayscale, blur and normalisation
  run later on the device (``augment_on_device``, not timed here);
* **moco_reference**: facebookresearch/moco ``main_moco.py`` aug+ as written there: torchvision's
  ``RandomResizedCrop(size, scale=(0.2, 1.))``, ``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)],
  p=0.8)``, ``RandomGrayscale(p=0.2)``, ``RandomApply([moco.loader.GaussianBlur([.1, 2.])],
  p=0.5)`` (PIL blur, sigma from Python's ``random``), ``RandomHorizontalFlip()``, ``ToTensor()``,
  ``Normalize`` (float32 output), two views of one full PIL decode (``TwoCropsTransform``,
  torchvision's ``pil_loader``).

All three run in this process on one thread (``torch.set_num_threads(1)``, no DataLoader
workers) over the same files in the same order, and all collate their views into batches of
``--batch`` images (``default_collate``, as a loader worker does; ``--batch 0`` leaves it out).
They are timed in ``--rounds`` alternating blocks of ``seconds / rounds`` each (so background
load hits them alike); an image = decode + both views. Prints one JSON line per pipeline
(``name``, ``images_per_s``, ``cpu_ms_per_image`` (thread CPU time), ...; ours and
ours_cpu_share add both ratios to the reference and the load average), then the CPU share's
ratio in words, and appends two tables to bench/results.md (bench/common.py).

Without ``--images`` the input is made here: the colour photographs scikit-image ships
(astronaut, coffee, chelsea, rocket, the two motorcycle stereo views), 8 crops of each (random 4:3
or 3:4 boxes of 60-100 % of the photo, some mirrored) resized to ImageNet's typical 500 x 375 /
375 x 500 and saved as JPEG at quality 75-95: 48 files in a temp dir.
"""

import argparse
import glob
import json
import os
import random
import sys
import tempfile
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from bench.common import RATIO_HEADER, append_result  # noqa: E402
from pretrain.data import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoCropsDeviceAugment,
    TwoCropsTransform,
    moco_v2_transform,
)
from pretrain.data.datasets import _seeded  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")


def make_photos(out_dir: str, per_photo: int = 8, seed: int = 0) -> list:
    """Write ``6 * per_photo`` JPEGs of ImageNet-typical size made from scikit-image's photos."""
    import skimage.data

    left, right, _disparity = skimage.data.stereo_motorcycle()
    sources = {
        "astronaut": skimage.data.astronaut(),
        "coffee": skimage.data.coffee(),
        "chelsea": skimage.data.chelsea(),
        "rocket": skimage.data.rocket(),
        "motorcycle_left": left,
        "motorcycle_right": right,
    }
    rng = np.random.default_rng(seed)
    paths = []
    for name, array in sources.items():
        photo = Image.fromarray(array).convert("RGB")
        width, height = photo.size
        for k in range(per_photo):
            portrait = k % 4 == 3
            aspect = 3 / 4 if portrait else 4 / 3
            crop_w = min(width, int(rng.uniform(0.6, 1.0) * min(width, height * aspect)))
            crop_h = min(height, int(crop_w / aspect))
            crop_w = int(crop_h * aspect)
            x = int(rng.integers(0, width - crop_w + 1))
            y = int(rng.integers(0, height - crop_h + 1))
            size = (375, 500) if portrait else (500, 375)
            img = photo.crop((x, y, x + crop_w, y + crop_h)).resize(size, Image.BICUBIC)
            if k % 2:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            path = os.path.join(out_dir, f"{name}_{k}.jpg")
            img.save(path, quality=int(rng.integers(75, 96)))
            paths.append(path)
    return paths


# ---- the MoCo reference, as in facebookresearch/moco (main_moco.py, moco/loader.py) -------------


class MoCoGaussianBlur:
    """moco.loader.GaussianBlur: Gaussian blur augmentation in SimCLR."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, x):
        sigma = random.uniform(self.sigma[0], self.sigma[1])
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))


class MoCoTwoCropsTransform:
    """moco.loader.TwoCropsTransform: take two random crops of one image as the query and key."""

    def __init__(self, base_transform):
        self.base_transform = base_transform

    def __call__(self, x):
        return [self.base_transform(x), self.base_transform(x)]


def pil_loader(path: str) -> Image.Image:
    """torchvision.datasets.folder.pil_loader (ImageFolder's default loader)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def moco_reference(size: int):
    augmentation = [
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),  # not strengthened
        T.RandomGrayscale(p=0.2),
        T.RandomApply([MoCoGaussianBlur([0.1, 2.0])], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ]
    two = MoCoTwoCropsTransform(T.Compose(augmentation))
    return lambda path, seed: two(pil_loader(path))


def ours(size: int):
    two = TwoCropsTransform(moco_v2_transform(size))
    assert two.uint8
    return lambda path, seed: _seeded(seed, two.load, path)


def ours_cpu_share(size: int):
    two = TwoCropsDeviceAugment(moco_v2_transform(size))
    return lambda path, seed: _seeded(seed, two.load, path)


def _nbytes(view) -> int:
    """Bytes of one view: a tensor, or a DeviceView's pixels + parameters."""
    tensors = view if isinstance(view, tuple) else (view,)
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- timing ------------------------------------------------------------------------------------


class Runner:
    """Runs one pipeline over the files (cycling), collating every ``batch`` images."""

    def __init__(self, name, fn, paths, batch):
        self.name, self.fn, self.paths, self.batch = name, fn, paths, batch
        self.pos = 0
        self.images = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0  # this thread's CPU time: what other processes' load inflates less
        self.pending = []
        self.bytes_per_image = None

    def run_for(self, seconds: float) -> None:
        start, cpu_start = time.perf_counter(), time.thread_time()
        while True:
            path = self.paths[self.pos % len(self.paths)]
            views = self.fn(path, 1000003 * self.pos)
            self.pos += 1
            self.images += 1
            if self.bytes_per_image is None:
                self.bytes_per_image = sum(_nbytes(v) for v in views)
            if self.batch:
                self.pending.append((views, 0))
                if len(self.pending) == self.batch:
                    default_collate(self.pending)
                    self.pending = []
            if time.perf_counter() - start >= seconds:
                break
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.thread_time() - cpu_start

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def draft_histogram(paths, size: int, seed: int = 0) -> dict:
    """How often each JPEG reduction is chosen over one pass of the files (ours)."""
    aug = moco_v2_transform(size)
    counts: dict = {}
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            width, height = img.size
            jpeg = img.format == "JPEG"
        torch.manual_seed(seed + i)
        views = [aug.sample(width, height), aug.sample(width, height)]
        s = aug.draft_factor(views) if jpeg else 1
        counts[s] = counts.get(s, 0) + 1
    return {f"1/{s}": n for s, n in sorted(counts.items())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", help="folder of images (searched recursively); default: "
                        "48 JPEGs made from scikit-image's photos")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=20.0, help="per pipeline")
    parser.add_argument("--rounds", type=int, default=4, help="alternating blocks per pipeline")
    parser.add_argument("--batch", type=int, default=32, help="collate size, 0 = no collation")
    parser.add_argument("--no-record", action="store_true", help="do not append to results.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            paths = sorted(
                p
                for p in glob.glob(os.path.join(args.images, "**", "*"), recursive=True)
                if p.endswith(IMAGE_EXTENSIONS)
            )
            if not paths:
                parser.error(f"{args.images}: no .jpg / .jpeg / .png files found")
            source = args.images
        else:
            paths = make_photos(tmp)
            source = f"{len(paths)} JPEGs from scikit-image's photos, 500x375 / 375x500, q75-95"
        sizes = []
        for p in paths[:200]:
            with Image.open(p) as img:
                sizes.append(img.size)
        mean_size = tuple(int(round(np.mean([s[i] for s in sizes]))) for i in (0, 1))
        runners = [
            Runner("moco_reference", moco_reference(args.size), paths, args.batch),
            Runner("ours", ours(args.size), paths, args.batch),
            Runner("ours_cpu_share", ours_cpu_share(args.size), paths, args.batch),
        ]
        for r in runners:  # warm-up (imports, hue tables, file cache)
            r.run_for(0.5)
            r.images, r.seconds, r.cpu_seconds = 0, 0.0, 0.0
        load_start = os.getloadavg()[0]
        for _ in range(args.rounds):
            for r in runners:
                r.run_for(args.seconds / args.rounds)
        load_end = os.getloadavg()[0]
        drafts = draft_histogram(paths, args.size)

    ref, our, share = runners
    results = {}
    for r in runners:
        line = {
            "name": r.name,
            "images_per_s": round(r.images_per_s, 1),
            "ms_per_image": round(1000.0 / r.images_per_s, 3),
            "cpu_ms_per_image": round(1000.0 * r.cpu_seconds / r.images, 3),
            "images": r.images,
            "seconds": round(r.seconds, 2),
            "size": args.size,
            "batch": args.batch,
            "bytes_per_image": r.bytes_per_image,
        }
        if r is not ref:
            line["ratio_to_reference"] = round(r.images_per_s / ref.images_per_s, 3)
            line["cpu_ratio_to_reference"] = round(
                ref.cpu_seconds / ref.images / (r.cpu_seconds / r.images), 3
            )
            line["load_average"] = [round(load_start, 2), round(load_end, 2)]
            line["jpeg_reduction"] = drafts
        print(json.dumps(line), flush=True)
        results[r.name] = line
    print(
        f"CPU share of the device path: {share.images_per_s / ref.images_per_s:.2f}x the MoCo "
        f"reference's images/s per core at {args.size} px (all-CPU path "
        f"{our.images_per_s / ref.images_per_s:.2f}x)",
        flush=True,
    )
    if not args.no_record:
        ratio = our.images_per_s / ref.images_per_s
        rows = [
            f"| images/s, decode + 2 views at {args.size} px, one core | "
            f"{ref.images_per_s:.1f} | {our.images_per_s:.1f} | {ratio:.2f} |",
            f"| ms per image | {1000 / ref.images_per_s:.2f} | {1000 / our.images_per_s:.2f} | "
            f"{ref.images_per_s / our.images_per_s:.2f} |",
            f"| CPU ms per image (thread time) | {1000 * ref.cpu_seconds / ref.images:.2f} | "
            f"{1000 * our.cpu_seconds / our.images:.2f} | "
            f"{(our.cpu_seconds / our.images) / (ref.cpu_seconds / ref.images):.2f} |",
            f"| bytes per image (2 views) | {ref.bytes_per_image} | {our.bytes_per_image} | "
            f"{our.bytes_per_image / ref.bytes_per_image:.2f} |",
        ]
        share_ratio = share.images_per_s / ref.images_per_s
        share_rows = [
            f"| images/s, CPU share of the device path at {args.size} px, one core | "
            f"{ref.images_per_s:.1f} | {share.images_per_s:.1f} | {share_ratio:.2f} |",
            f"| ms per image | {1000 / ref.images_per_s:.2f} | {1000 / share.images_per_s:.2f} | "
            f"{ref.images_per_s / share.images_per_s:.2f} |",
            f"| CPU ms per image (thread time) | {1000 * ref.cpu_seconds / ref.images:.2f} | "
            f"{1000 * share.cpu_seconds / share.images:.2f} | "
            f"{(share.cpu_seconds / share.images) / (ref.cpu_seconds / ref.images):.2f} |",
            f"| bytes per image (2 views + parameters) | {ref.bytes_per_image} | "
            f"{share.bytes_per_image} | {share.bytes_per_image / ref.bytes_per_image:.2f} |",
        ]
        notes = [
            f"input: {source} ({len(paths)} files, mean size {mean_size[0]}x{mean_size[1]})",
            "reference = facebookresearch/moco main_moco.py aug+ (torchvision, PIL decode of the "
            "full image, ToTensor + Normalize float32); ours = TwoCropsTransform(moco_v2_transform"
            "(size)).load under a per-sample seed (uint8 views, OpenCV Gaussian blur and HSV "
            "converters); ours_cpu_share (second table) = TwoCropsDeviceAugment(moco_v2_transform"
            "(size)).load under a per-sample seed: draws, decode, crop + resize, flip (uint8 views "
            "+ parameters; colour, grey, blur and normalisation left to the device, untimed)",
            f"one thread, no workers, {args.rounds} alternating blocks of "
            f"{args.seconds / args.rounds:.1f} s per pipeline, collated in batches of "
            f"{args.batch or 'none'}; JPEG reductions chosen by ours: {drafts}",
            f"1-minute load average {load_start:.2f} at the start, {load_end:.2f} at the end "
            f"({os.cpu_count()} cores; a load above ~1 means other processes shared them, which "
            "slows both pipelines, ours more: compare ratios from runs on an idle machine)",
        ]
        name = "data_pipeline.py: MoCo v2 aug+ input pipeline"
        append_result(name, [(RATIO_HEADER, rows), (RATIO_HEADER, share_rows)], notes)
    return results


if __name__ == "__main__":
    main()
