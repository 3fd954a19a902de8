"""pretrain.features.extract_features, the one feature extraction behind the kNN monitor, linear
evaluation and instance retrieval: dataset order and labels, eval mode (module mode and BN
statistics restored), normalisation, batches given as a loader or as bare image tensors, empty
shards, and two gloo processes gathering their shards in dataset order."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch.utils.data import Dataset

from pretrain.features import extract_features
from pretrain.models import backbone_features, build_encoder

CPU = torch.device("cpu")


class _Images(Dataset):
    """``n`` seeded random 16 px images, label ``i % 3``."""

    def __init__(self, n: int) -> None:
        self.images = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i % 3


def _encoder():
    torch.manual_seed(0)
    return build_encoder("resnet18", 16, 32)  # backbone + projection head, in train mode


def test_dataset_order_labels_and_eval_mode():
    enc = _encoder()
    buffers = {k: v.clone() for k, v in enc.state_dict().items()}
    data = _Images(7)
    f, y = extract_features(enc, data, CPU, batch_size=3)
    assert f.shape == (7, 512) and f.dtype == torch.float32 and f.device == CPU
    assert y.tolist() == [i % 3 for i in range(7)]
    assert enc.training  # restored
    for k, v in enc.state_dict().items():
        assert torch.equal(v, buffers[k]), k  # eval mode: BN statistics untouched
    with torch.no_grad():
        expected = backbone_features(enc.eval(), data.images)
    torch.testing.assert_close(f, expected, rtol=1e-5, atol=1e-5)
    assert f.norm(dim=1).sub(1).abs().max() > 0.1  # not normalised by default


def test_normalize_loader_batches_and_bare_tensors():
    enc, data = _encoder(), _Images(7)
    f, y = extract_features(enc, data, CPU, batch_size=3)
    fn, yn = extract_features(enc, data, CPU, batch_size=3, normalize=True)
    assert torch.equal(fn, F.normalize(f, dim=1)) and torch.equal(y, yn)
    # the same batches given as an iterable of (images, labels): the same numbers
    batches = [(data.images[i : i + 3], torch.arange(i, min(i + 3, 7)) % 3) for i in (0, 3, 6)]
    fl, yl = extract_features(enc, batches, CPU, normalize=True)
    assert torch.equal(fl, fn) and torch.equal(yl, y)
    # bare image tensors: no labels; gather False and cpu False (the device here is the CPU)
    fb, yb = extract_features(
        enc, [b[0] for b in batches], CPU, normalize=True, gather=False, cpu=False
    )
    assert torch.equal(fb, fn) and yb is None


def test_empty_shard_keeps_the_feature_width():
    enc = _encoder()
    f, y = extract_features(enc, [], CPU)  # no batches (e.g. a process's empty shard)
    assert f.shape == (0, 512) and y.shape == (0,) and y.dtype == torch.long
    net = torchvision.models.resnet50(weights=None, num_classes=5)  # a classifier fc
    assert extract_features(net, [], CPU)[0].shape == (0, 2048)
    net.fc = torch.nn.Identity()  # no Linear: the channels of layer4
    assert extract_features(net, [], CPU)[0].shape == (0, 2048)


def _worker(rank, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    enc = _encoder()
    out = {
        # 7 images: rank 0 holds 0-3, rank 1 holds 4-6 (contiguous shards)
        "gathered": extract_features(enc, _Images(7), CPU, batch_size=2, normalize=True),
        "local": extract_features(enc, _Images(7), CPU, batch_size=2, gather=False),
        # 1 image: rank 1's shard is empty
        "one": extract_features(enc, _Images(1), CPU, batch_size=2),
    }
    if rank == 0:
        torch.save(out, result_file)
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_gather_their_shards_in_dataset_order(tmp_path):
    result_file = str(tmp_path / "out.pt")
    # fork: the test module is not importable by name under --import-mode=importlib
    mp.start_processes(
        _worker, args=(str(tmp_path / "init"), result_file), nprocs=2, start_method="fork"
    )
    out = torch.load(result_file, weights_only=True)
    enc, data = _encoder(), _Images(7)
    # one process, the same batches (2, 2 | 2, 1): bit for bit
    f, y = extract_features(enc, data, CPU, batch_size=2, normalize=True)
    assert torch.equal(out["gathered"][0], f) and torch.equal(out["gathered"][1], y)
    assert out["local"][0].shape == (4, 512) and out["local"][1].tolist() == [0, 1, 2, 0]
    one_f, one_y = extract_features(enc, _Images(1), CPU)
    assert torch.equal(out["one"][0], one_f) and out["one"][1].tolist() == [0]


@pytest.mark.parametrize("name", ["knn", "health", "lincls"])
def test_every_user_calls_the_one_extractor(name):
    import importlib

    module = importlib.import_module(f"pretrain.{name}")
    assert module.extract_features is extract_features
