"""MODEL.SYNC_BN_GROUP_SIZE: 4 gloo processes on CPU with groups of 2 synchronise BN within each
group (running statistics, outputs and input gradients equal those of one BN over the group's
combined batch, and the two groups differ); 0 synchronises over all 4; a size that does not
divide the world is one UserError sentence; build_method converts both encoders."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pretrain.config import get_pretrain_cfg
from pretrain.io import UserError
from pretrain.methods import build_method
from pretrain.models import (
    GroupNaiveSyncBatchNorm,
    NaiveSyncBatchNorm1d,
    convert_to_sync_bn,
    sync_bn_process_group,
)

WORLD, PER_RANK = 4, 3


def _inputs(rank):
    """Rank r's batch: a 4-d one for BN2d and a 2-d one for the head's BN1d, shifted by r so
    that the groups' statistics differ."""
    g = torch.Generator().manual_seed(100 + rank)
    x2 = torch.randn(PER_RANK, 3, 4, 4, generator=g, dtype=torch.float64) + rank
    x1 = torch.randn(PER_RANK, 5, generator=g, dtype=torch.float64) * (1 + rank)
    return x2, x1


def _bns():
    return nn.ModuleDict({"bn2": nn.BatchNorm2d(3), "bn1": nn.BatchNorm1d(5)}).double()


def _step(bns, x2, x1):
    """One training forward/backward; returns outputs, input gradients and running stats."""
    x2, x1 = x2.clone().requires_grad_(), x1.clone().requires_grad_()
    out2, out1 = bns["bn2"](x2), bns["bn1"](x1)
    # a loss whose gradient depends on the batch statistics (weights differ per channel)
    (out2 * torch.arange(1.0, 4.0).double().view(1, 3, 1, 1)).pow(2).sum().backward()
    (out1 * torch.arange(1.0, 6.0).double()).pow(3).sum().backward()
    return {
        "out2": out2.detach(),
        "out1": out1.detach(),
        "grad2": x2.grad,
        "grad1": x1.grad,
        **{f"{k}.{b}": getattr(m, b).clone() for k, m in bns.items() for b in ("running_mean",
                                                                            "running_var")},
    }


def _worker(rank, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    x2, x1 = _inputs(rank)
    for size in (2, 0):
        group = sync_bn_process_group(size)
        bns = convert_to_sync_bn(_bns(), group)
        assert isinstance(bns["bn2"], GroupNaiveSyncBatchNorm)
        assert isinstance(bns["bn1"], NaiveSyncBatchNorm1d)
        results[size] = _step(bns, x2, x1)
    try:
        sync_bn_process_group(3)
        results["error"] = ""
    except UserError as e:
        results["error"] = str(e)
    # build_method: groups of 2 in the query and the (deep-copied) key encoder
    cfg = get_pretrain_cfg()
    cfg.MODEL.ARCH, cfg.MODEL.DIM, cfg.MODEL.MLP_HIDDEN = "resnet18", 16, 32
    cfg.MODEL.SYNC_BN_GROUP_SIZE = 2
    model = build_method(cfg, torch.device("cpu"))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    results["method"] = (
        len(bns),
        all(isinstance(m, GroupNaiveSyncBatchNorm) for m in bns),
        {dist.get_world_size(m.process_group) for m in bns},
        model.encoder_k.bn1.process_group is model.encoder_q.bn1.process_group,
    )
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, result_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def four_process_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bn_groups")
    result_file = str(tmp / "results.pt")
    # fork: the test module is not importable by name under --import-mode=importlib
    mp.start_processes(
        _worker, args=(str(tmp / "init"), result_file), nprocs=WORLD, start_method="fork"
    )
    return torch.load(result_file, weights_only=False)


def _reference(ranks):
    """One BN (plain BatchNorm, one process) over the combined batch of ``ranks``, split back."""
    parts = [_inputs(r) for r in ranks]
    x2 = torch.cat([p[0] for p in parts])
    x1 = torch.cat([p[1] for p in parts])
    ref = _step(_bns(), x2, x1)
    # detectron2's NaiveSyncBatchNorm keeps the biased variance in running_var; BatchNorm the
    # unbiased one: convert the reference (running_var = 0.9 * 1 + 0.1 * var)
    for k, n in (("bn2", x2[:, 0].numel()), ("bn1", x1.shape[0])):
        var_unbiased = (ref[f"{k}.running_var"] - 0.9) / 0.1
        ref[f"{k}.running_var"] = 0.9 + 0.1 * var_unbiased * (n - 1) / n
    return ref


def _check(got, ref, i):
    s = slice(i * PER_RANK, (i + 1) * PER_RANK)
    for k in ("out2", "out1", "grad2", "grad1"):
        torch.testing.assert_close(got[k], ref[k][s], rtol=1e-10, atol=1e-10, msg=k)
    for k in ("bn2.running_mean", "bn2.running_var", "bn1.running_mean", "bn1.running_var"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-12, msg=k)


def test_groups_of_two_equal_one_bn_over_the_group_batch(four_process_results):
    for group in ((0, 1), (2, 3)):
        ref = _reference(group)
        for i, rank in enumerate(group):
            _check(four_process_results[rank][2], ref, i)
    # the two groups' statistics differ (their batches do)
    a, b = four_process_results[0][2], four_process_results[2][2]
    assert not torch.allclose(a["bn2.running_mean"], b["bn2.running_mean"], atol=1e-3)
    assert not torch.allclose(a["bn1.running_var"], b["bn1.running_var"], atol=1e-3)


def test_group_size_zero_syncs_all_processes(four_process_results):
    ref = _reference(range(WORLD))
    for rank in range(WORLD):
        _check(four_process_results[rank][0], ref, rank)


def test_group_size_must_divide_the_world(four_process_results):
    msg = four_process_results[0]["error"]
    assert msg.startswith("MODEL.SYNC_BN_GROUP_SIZE=3:") and "divisor of 4" in msg
    assert msg.endswith(".") and ". " not in msg  # one sentence


def test_build_method_converts_both_encoders_in_groups(four_process_results):
    n, all_group_bn, sizes, shared = four_process_results[0]["method"]
    assert n == 2 * (20 + 2) and all_group_bn and sizes == {2} and shared
