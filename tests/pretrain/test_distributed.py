"""Two gloo processes on CPU give the same loss, gradients and SyncBN statistics as one process
holding the same global batch: gathered keys, globally drawn negatives (same seeded generator on
every rank), NaiveSyncBatchNorm in backbone and head, differentiable gathers, DDP averaging."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pretrain.config import get_pretrain_cfg
from pretrain.methods import ContrastiveMethod, build_method
from pretrain.models import NaiveSyncBatchNorm1d

N = 8  # global batch
# dclw: its weight is a softmax over the s+ of the global batch, gathered differentiably
METHODS = [("simo", "eqco"), ("simclr", "dcl"), ("simclr", "dclw"), ("simco", "dual_temperature")]


def _cfg(method, loss):
    cfg = get_pretrain_cfg()
    cfg.MODEL.METHOD = method
    cfg.MODEL.ARCH = "resnet18"
    cfg.MODEL.DIM = 16
    cfg.MODEL.MLP_HIDDEN = 32
    cfg.MODEL.MOMENTUM = 0.9
    cfg.LOSS.NAME = loss
    cfg.LOSS.NUM_NEGATIVES = 5
    cfg.LOSS.SYMMETRIC = method != "simo"
    cfg.SOLVER.IMS_PER_BATCH = N
    return cfg


def _batch():
    g = torch.Generator().manual_seed(7)
    return (
        torch.randn(N, 3, 16, 16, generator=g).double(),
        torch.randn(N, 3, 16, 16, generator=g).double(),
    )


def _step(method, loss, rank=0, world=1, negatives_seed=None):
    """One forward/backward on this rank's share; float64 so that only real differences show."""
    torch.manual_seed(0)  # identical initialisation on every process and in the reference
    model = build_method(_cfg(method, loss), torch.device("cpu")).double()
    if negatives_seed is not None:
        model.generator.manual_seed(negatives_seed)
    net = model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=None, broadcast_buffers=False)
    im_q, im_k = _batch()
    n = N // world
    out = net(((im_q[rank * n : (rank + 1) * n], im_k[rank * n : (rank + 1) * n]), None))["loss"]
    out.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    return out.detach(), grads, buffers, model


def _local_simmoco_loss(rank, world):
    cfg = _cfg("simmoco", "dual_temperature")
    cfg.LOSS.LOCAL_NEGATIVES, cfg.MODEL.NORM = True, "BN"
    torch.manual_seed(0)
    model = build_method(cfg, torch.device("cpu")).double()
    im_q, im_k = _batch()
    n = N // 2
    local = (im_q[rank * n : (rank + 1) * n], im_k[rank * n : (rank + 1) * n])
    return model((local, None))["loss"].detach()


def _worker(rank, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {}
    for method, loss in METHODS:
        out, grads, buffers, model = _step(method, loss, rank, world=2)
        assert isinstance(model.encoder_q.fc[1], NaiveSyncBatchNorm1d)  # the head is synced too
        losses = [torch.zeros_like(out) for _ in range(2)]
        dist.all_gather(losses, out)
        results[f"{method}/{loss}"] = {
            "loss": torch.stack(losses).mean(),
            "grads": grads,
            "buffers": buffers,
        }
    # SimMoCo as the official script runs it: per-process BN and negatives from this process's
    # batch only, i.e. each process computes the loss of a single process holding its half
    local = [torch.zeros(()).double() for _ in range(2)]
    dist.all_gather(local, _local_simmoco_loss(rank, world=2))
    results["simmoco_local"] = torch.stack(local)
    # MoCo v2's shuffling BN: with per-sample BN (eval mode) shuffling the global batch across
    # processes, embedding and un-shuffling must give exactly the keys of this process's images
    cfg = _cfg("mocov2", "infonce")
    cfg.MODEL.NORM, cfg.MODEL.SHUFFLE_BN, cfg.LOSS.QUEUE_SIZE = "BN", True, 16
    torch.manual_seed(0)
    moco = build_method(cfg, torch.device("cpu")).double().eval()
    local = _batch()[1][rank * N // 2 : (rank + 1) * N // 2]
    shuffled = moco.embed_k(local)
    direct = ContrastiveMethod.embed_k(moco, local)
    results["shuffle_bn_max_diff"] = (shuffled - direct).abs().max()
    # ... while with batch statistics (train mode) the shuffled keys differ: the shuffle happened
    moco.train()
    with torch.no_grad():
        direct_train = ContrastiveMethod.embed_k(moco, local)
    results["shuffle_bn_train_diff"] = (moco.embed_k(local) - direct_train).abs().max()
    if rank == 0:
        torch.save(results, result_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    result_file = str(tmp / "results.pt")
    # fork: the test module is not importable by name under --import-mode=importlib
    mp.start_processes(
        _worker, args=(str(tmp / "init"), result_file), nprocs=2, start_method="fork", join=True
    )
    return torch.load(result_file, weights_only=True)


@pytest.mark.parametrize("method,loss", METHODS)
def test_two_processes_equal_one_process(two_process_results, method, loss):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref_loss, ref_grads, ref_buffers, _ = _step(method, loss)
    finally:
        torch.set_num_threads(n)
    got = two_process_results[f"{method}/{loss}"]
    # DDP averages the per-process gradients of the per-process mean losses: the global mean
    assert torch.allclose(got["loss"], ref_loss, rtol=1e-10, atol=1e-12)
    assert got["grads"].keys() == ref_grads.keys() and len(ref_grads) > 60
    for k, g in ref_grads.items():
        assert torch.allclose(got["grads"][k], g, rtol=1e-9, atol=1e-11), k
    # SyncBN running means = those of one BN over the global batch (query and key encoders)
    has_key_encoder = method == "simo"
    assert any(k.startswith("encoder_k.") for k in ref_buffers) == has_key_encoder
    for k, v in ref_buffers.items():
        assert torch.allclose(got["buffers"][k], v, rtol=1e-9, atol=1e-12), k


def test_mocov2_shuffle_bn_unshuffles_keys(two_process_results):
    assert two_process_results["shuffle_bn_max_diff"] < 1e-12
    assert two_process_results["shuffle_bn_train_diff"] > 1e-3


def test_other_negatives_give_another_loss(two_process_results):
    """Guard against a vacuous match: with other negatives the SiMo loss is different."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        other, _, _, _ = _step("simo", "eqco", negatives_seed=123)
    finally:
        torch.set_num_threads(n)
    assert not torch.allclose(two_process_results["simo/eqco"]["loss"], other, rtol=1e-6)


def test_simmoco_local_negatives_are_per_process(two_process_results):
    """LOSS.LOCAL_NEGATIVES with per-process BN: each of 2 processes gets the loss that one process
    holding only its half computes; the global-negatives loss of the same batch differs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = torch.stack([_local_simmoco_loss(rank, world=1) for rank in range(2)])
        cfg = _cfg("simmoco", "dual_temperature")
        cfg.MODEL.NORM = "BN"
        torch.manual_seed(0)
        model = build_method(cfg, torch.device("cpu")).double()
        im_q, im_k = _batch()
        whole = model(((im_q, im_k), None))["loss"].detach()
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(two_process_results["simmoco_local"], alone, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(alone.mean(), whole, rtol=1e-4)
