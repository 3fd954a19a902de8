"""lightly as an independent oracle for our SimCLR-layout losses (test-only dependency).

Our path is the real one: :class:`pretrain.methods.SimCLR` on raw embeddings (identity encoder),
i.e. normalise, :func:`in_batch_logits` over the 2n anchors, then the loss. lightly's losses
normalise their inputs themselves, use in-batch negatives when ``memory_bank_size=0`` (the
default), gather nothing when ``gather_distributed=False`` (the default), and average over the 2n
anchors (NT-Xent: one cross-entropy over 2n rows; DCL: 0.5 * (view-0 mean + view-1 mean)).
"""

import functools

import pytest
import torch
from torch import nn

from pretrain.losses import dcl, dclw, infonce
from pretrain.methods import SimCLR

lightly_loss = pytest.importorskip("lightly.loss")
dcl_module = pytest.importorskip("lightly.loss.dcl_loss")

# lightly's negative_mises_fisher_weights calls torch.tensor(tensor), which warns
pytestmark = pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def _embeddings(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n, d, generator=g, dtype=torch.float64) * 2  # not normalised
    x2 = x1 + 1.5 * torch.randn(n, d, generator=g, dtype=torch.float64)  # correlated views
    return x1.to(dtype), x2.to(dtype)


def _value_and_grads(fn, x1, x2):
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    loss = fn(a, b)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def _ours(loss_fn, tau):
    model = SimCLR(nn.Identity(), loss_fn=loss_fn, tau=tau, momentum=None)
    return lambda a, b: model.losses(a, b)["loss"]


def _assert_same(ours, theirs, dtype):
    for got, want in zip(ours, theirs, strict=True):
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got, want, **TOL[dtype])


CASES = [(6, 5, 0.2), (2, 3, 0.5), (16, 8, 0.07)]  # (n images, dim, tau)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d,tau", CASES)
def test_simclr_infonce_is_lightly_ntxent(n, d, tau, dtype):
    x1, x2 = _embeddings(n, d, dtype)
    ours = _value_and_grads(_ours(infonce, tau), x1, x2)
    theirs = _value_and_grads(lightly_loss.NTXentLoss(temperature=tau), x1, x2)
    _assert_same(ours, theirs, dtype)
    assert ours[0].item() > 0.05  # not a degenerate comparison


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d,tau", CASES)
def test_simclr_dcl_is_lightly_dcl(n, d, tau, dtype):
    x1, x2 = _embeddings(n, d, dtype)
    ours = _value_and_grads(_ours(dcl, tau), x1, x2)
    theirs = _value_and_grads(lightly_loss.DCLLoss(temperature=tau), x1, x2)
    _assert_same(ours, theirs, dtype)


def _in_graph_weights(out0, out1, sigma):
    """The DCLW weight of the reference code lightly cites (raminnakhli/Decoupled-Contrastive-
    Learning): lightly's formula without its detach, so autograd goes through the weight."""
    return 2 - out0.shape[0] * torch.softmax((out0 * out1).sum(dim=1) / sigma, dim=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sigma", [0.5, 0.2])
@pytest.mark.parametrize("n,d,tau", CASES)
def test_simclr_dclw_is_lightly_dclw(n, d, tau, sigma, dtype):
    x1, x2 = _embeddings(n, d, dtype)
    # detach_weight=True: exactly lightly's DCLWLoss (values and gradients)
    detached_fn = functools.partial(dclw, sigma=sigma, detach_weight=True)
    detached = _value_and_grads(_ours(detached_fn, tau), x1, x2)
    lightly_dclw = lightly_loss.DCLWLoss(temperature=tau, sigma=sigma)
    theirs = _value_and_grads(lightly_dclw, x1, x2)
    _assert_same(detached, theirs, dtype)
    # default: the in-graph weight of the reference code, built on lightly's DCLLoss
    in_graph = _value_and_grads(_ours(functools.partial(dclw, sigma=sigma), tau), x1, x2)
    weight_fn = functools.partial(_in_graph_weights, sigma=sigma)
    reference = _value_and_grads(lightly_loss.DCLLoss(temperature=tau, weight_fn=weight_fn), x1, x2)
    _assert_same(in_graph, reference, dtype)
    # the two modes: same value, different gradients (the documented difference)
    torch.testing.assert_close(in_graph[0], detached[0], **TOL[dtype])
    diff = max((a - b).abs().max().item() for a, b in zip(in_graph[1:], detached[1:]))
    scale = max(g.abs().max().item() for g in detached[1:])
    assert diff > 1e-3 * scale, (diff, scale)


def test_lightly_weight_is_our_weight_over_the_2n_anchors():
    """lightly normalises w over the n images of one view; we normalise over SimCLR's 2n anchors,
    where each positive similarity appears twice: the weights are the same numbers."""
    x1, x2 = _embeddings(7, 4, torch.float64)
    z1, z2 = nn.functional.normalize(x1, dim=1), nn.functional.normalize(x2, dim=1)
    theirs = dcl_module.negative_mises_fisher_weights(z1, z2, sigma=0.5)
    pos = torch.cat([(z1 * z2).sum(1), (z2 * z1).sum(1)])
    ours = 2 - pos.shape[0] * torch.softmax(pos / 0.5, dim=0)
    torch.testing.assert_close(ours, torch.cat([theirs, theirs]), rtol=1e-12, atol=1e-12)
    assert not theirs.requires_grad
