"""Exactness, equivalences, stability and sampling guarantees of pretrain/losses.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.io import UserError
from pretrain.losses import (
    LOSSES,
    batch_logits,
    dcl,
    dclw,
    dual_temperature,
    eqco,
    get_loss,
    infonce,
    pairwise_logits,
    sample_batch_negatives,
)

torch.set_num_threads(1)

# default extra keyword per loss, so every loss can be called through the registry
EXTRA = {
    "infonce": {"margin": 0.1},
    "eqco": {"alpha": 3.0},
    "dcl": {},
    "dclw": {"sigma": 0.5},
    "dual_temperature": {"beta": 10.0},
}


def _similarities(n=6, k=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, generator=g, dtype=dtype) * 2 - 1
    neg = torch.rand(n, k, generator=g, dtype=dtype) * 2 - 1
    return pos, neg


# ---------------------------------------------------------------- brute-force references
def _ref_infonce(pos, neg, tau, margin=0.0):
    total = 0.0
    for i in range(len(pos)):
        num = math.exp((pos[i] - margin) / tau)
        den = num + sum(math.exp(s / tau) for s in neg[i])
        total += -math.log(num / den)
    return total / len(pos)


def _ref_eqco(pos, neg, tau, alpha):
    total = 0.0
    for i in range(len(pos)):
        num = math.exp(pos[i] / tau)
        den = num + alpha / len(neg[i]) * sum(math.exp(s / tau) for s in neg[i])
        total += -math.log(num / den)
    return total / len(pos)


def _ref_dcl(pos, neg, tau):
    return sum(
        -pos[i] / tau + math.log(sum(math.exp(s / tau) for s in neg[i])) for i in range(len(pos))
    ) / len(pos)


def _ref_dclw(pos, neg, tau, sigma):
    n = len(pos)
    z = sum(math.exp(p / sigma) for p in pos)
    total = 0.0
    for i in range(n):
        w = 2 - n * math.exp(pos[i] / sigma) / z
        total += -w * pos[i] / tau + math.log(sum(math.exp(s / tau) for s in neg[i]))
    return total / n


def _softmax_first(values, temperature):
    exps = [math.exp(v / temperature) for v in values]
    return exps[0] / sum(exps)


def _ref_dual_temperature(pos, neg, tau, beta):
    total = 0.0
    for i in range(len(pos)):
        row = [pos[i]] + list(neg[i])
        p_intra = _softmax_first(row, tau)
        p_inter = _softmax_first(row, tau * beta)
        total += (1 - p_inter) / (1 - p_intra) * -math.log(p_intra)
    return total / len(pos)


REFERENCES = {
    "infonce": _ref_infonce,
    "eqco": _ref_eqco,
    "dcl": _ref_dcl,
    "dclw": _ref_dclw,
    "dual_temperature": _ref_dual_temperature,
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("k", [1, 7])
def test_loss_matches_brute_force_formula(name, k):
    pos, neg = _similarities(k=k)
    tau = 0.2
    got = LOSSES[name](pos, neg, tau, **EXTRA[name]).item()
    want = REFERENCES[name](pos.tolist(), neg.tolist(), tau, *EXTRA[name].values())
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------- equivalences
def test_eqco_with_alpha_equal_k_is_infonce():
    pos, neg = _similarities(n=9, k=13)
    for tau in (0.05, 0.2, 1.0):
        torch.testing.assert_close(eqco(pos, neg, tau, alpha=13), infonce(pos, neg, tau), rtol=0,
                                   atol=1e-13)


@pytest.mark.parametrize("alpha", [1.0, 16.0, 256.0, 65536.0])
def test_eqco_is_infonce_with_margin(alpha):
    pos, neg = _similarities(n=9, k=16)
    tau = 0.2
    margin = tau * math.log(alpha / 16)
    torch.testing.assert_close(eqco(pos, neg, tau, alpha), infonce(pos, neg, tau, margin=margin),
                               rtol=1e-12, atol=1e-12)
    # and the gradients agree too (same function, different parametrisation)
    p1, n1 = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    p2, n2 = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    eqco(p1, n1, tau, alpha).backward()
    infonce(p2, n2, tau, margin=margin).backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(n1.grad, n2.grad, rtol=1e-10, atol=1e-12)


def test_dual_temperature_with_beta_one_is_infonce():
    pos, neg = _similarities(n=9, k=11)
    torch.testing.assert_close(dual_temperature(pos, neg, 0.1, beta=1.0), infonce(pos, neg, 0.1),
                               rtol=1e-13, atol=1e-13)


def test_dual_temperature_weight_changes_the_loss():
    # with beta != 1 the weight is not identically 1: a loss ignoring beta would fail here
    pos, neg = _similarities(n=9, k=11)
    assert abs(dual_temperature(pos, neg, 0.1, 10.0) - infonce(pos, neg, 0.1)) > 1e-3


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_invariant_to_the_order_of_negatives(name):
    pos, neg = _similarities(n=5, k=9)
    g = torch.Generator().manual_seed(1)
    perm = torch.stack([torch.randperm(9, generator=g) for _ in range(5)])
    shuffled = neg.gather(1, perm)
    assert not torch.equal(shuffled, neg)
    torch.testing.assert_close(LOSSES[name](pos, shuffled, 0.2, **EXTRA[name]),
                               LOSSES[name](pos, neg, 0.2, **EXTRA[name]), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", ["infonce", "eqco", "dcl", "dclw"])
def test_gradcheck(name):
    """dclw: its weight is in the graph by default, so gradcheck differentiates through it."""
    pos, neg = _similarities(n=4, k=5)
    pos.requires_grad_()
    neg.requires_grad_()
    assert torch.autograd.gradcheck(lambda p, n: LOSSES[name](p, n, 0.3, **EXTRA[name]), (pos, neg))


@pytest.mark.parametrize("name", ["dclw", "dual_temperature"])
def test_weighted_losses_have_detached_weights(name):
    """Their weights are constants for autograd (dclw with detach_weight=True): the gradient
    equals that of the loss with the weights frozen at their current values (gradcheck would
    differentiate through the weights)."""
    pos, neg = _similarities(n=4, k=5)
    tau = 0.3
    extra = dict(EXTRA[name], detach_weight=True) if name == "dclw" else EXTRA[name]
    if name == "dclw":
        w = 2 - 4 * torch.softmax(pos / 0.5, dim=0)

        def frozen(p, n):
            return (torch.logsumexp(n / tau, 1) - w * p / tau).mean()

    else:
        logits = torch.cat([pos[:, None], neg], 1)
        p_inter = torch.softmax(logits / (tau * 10), 1)[:, 0]
        w = (1 - p_inter) / (1 - torch.softmax(logits / tau, 1)[:, 0])

        def frozen(p, n):
            lg = torch.cat([p[:, None], n], 1) / tau
            return (w * (torch.logsumexp(lg, 1) - lg[:, 0])).mean()

    p1, n1 = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    LOSSES[name](p1, n1, tau, **extra).backward()
    p2, n2 = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    assert torch.autograd.gradcheck(frozen, (p2, n2))
    frozen(p2, n2).backward()
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(n1.grad, n2.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_through_the_embedding_helpers():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    kp = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    shared = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    per_query = torch.randn(4, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for negs in (shared, per_query):
        assert torch.autograd.gradcheck(
            lambda a, b, c: eqco(*pairwise_logits(a, b, c), 0.5, 8.0), (q, kp, negs)
        )

    def via_batch(a, keys):
        gen = torch.Generator().manual_seed(3)  # same negatives at every evaluation
        return infonce(*batch_logits(a, keys, 2, generator=gen), 0.5)

    keys = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(via_batch, (q, keys))


def _mean_query_grad_norm(loss_fn, q0, k_pos, negatives):
    q = q0.clone().requires_grad_()
    loss_fn(*pairwise_logits(q, k_pos, negatives)).backward()
    # the loss is a mean over N queries: undo the 1/N to get per-query gradient norms
    return (q.grad.norm(dim=1) * q0.shape[0]).mean().item()


def test_eqco_gradient_norm_is_independent_of_k():
    """EqCo Theorem 2: with alpha fixed the gradient norm w.r.t. q does not depend on K, whereas
    plain InfoNCE's grows with K. Embeddings as in a trained model: the positive is the query plus
    small noise (cosine ~0.96), the negatives are random directions."""
    g = torch.Generator().manual_seed(0)
    n, d, tau, alpha = 64, 128, 0.2, 256.0
    q0 = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    k_pos = F.normalize(q0 + 0.3 / d**0.5 * torch.randn(n, d, generator=g, dtype=torch.float64),
                        dim=1)
    norms = {"eqco": [], "infonce": []}
    for k in (16, 256, 4096):
        negatives = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
        norms["eqco"].append(
            _mean_query_grad_norm(lambda p, s: eqco(p, s, tau, alpha), q0, k_pos, negatives)
        )
        norms["infonce"].append(
            _mean_query_grad_norm(lambda p, s: infonce(p, s, tau), q0, k_pos, negatives)
        )
    eq, nce = norms["eqco"], norms["infonce"]
    assert 0.85 < eq[1] / eq[0] < 1.15 and 0.85 < eq[2] / eq[0] < 1.15, eq
    assert nce[1] / nce[0] > 3.0 and nce[2] / nce[0] > 5.0, nce


# ---------------------------------------------------------------- numerics and dtypes
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("k", [1, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_similarities_stay_finite(name, k, dtype):
    tau = 0.05
    for p_val, n_val in ((1.0, -1.0), (-1.0, 1.0), (1.0, 1.0)):
        pos = torch.full((3,), p_val, dtype=dtype, requires_grad=True)
        neg = torch.full((3, k), n_val, dtype=dtype, requires_grad=True)
        loss = LOSSES[name](pos, neg, tau, **EXTRA[name])
        loss.backward()
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss), (p_val, n_val, loss)
        assert torch.isfinite(pos.grad).all() and torch.isfinite(neg.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    pos, neg = _similarities(n=8, k=6, dtype=torch.float32)
    pos_h, neg_h = pos.to(dtype), neg.to(dtype)
    for name, fn in LOSSES.items():
        got = fn(pos_h, neg_h, 0.07, **EXTRA[name])
        assert got.dtype == torch.float32
        # identical to the float32 computation on the same (rounded) values
        torch.testing.assert_close(got, fn(pos_h.float(), neg_h.float(), 0.07, **EXTRA[name]),
                                   rtol=0, atol=0)


def test_pairwise_logits_layouts_and_autocast():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    kp = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    negs = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    pos, neg = pairwise_logits(q, kp, negs)
    torch.testing.assert_close(pos, (q * kp).sum(1))
    pos3, neg3 = pairwise_logits(q, kp, negs.expand(5, 3, 8))
    torch.testing.assert_close(pos3, pos)
    torch.testing.assert_close(neg3, neg)
    for i in range(5):
        for j in range(3):
            assert neg[i, j].item() == pytest.approx(float(q[i] @ negs[j]), abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pos_a, neg_a = pairwise_logits(q, kp, negs)
    assert pos_a.dtype == neg_a.dtype == torch.float32
    torch.testing.assert_close(neg_a, neg, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        pairwise_logits(q, kp, negs[:, :4])


def test_bad_shapes_and_parameters_are_rejected():
    pos, neg = _similarities(n=3, k=2)
    with pytest.raises(ValueError):
        infonce(pos, neg[:2], 0.2)
    with pytest.raises(ValueError):
        infonce(pos, neg[:, :0], 0.2)
    with pytest.raises(ValueError):
        eqco(pos, neg, 0.0, 4.0)
    with pytest.raises(ValueError):
        eqco(pos, neg, 0.2, 0.0)


def test_registry_and_unknown_name():
    assert set(LOSSES) == {"infonce", "eqco", "dcl", "dclw", "dual_temperature"}
    assert get_loss("eqco") is eqco and get_loss("dclw") is dclw and get_loss("dcl") is dcl
    with pytest.raises(UserError, match="eqco"):
        get_loss("eq_co")


# ---------------------------------------------------------------- batch layout
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("num_keys,k", [(2, 1), (9, 8), (64, 16), (300, 5)])
def test_batch_negatives_are_distinct_and_never_the_own_key(shared, num_keys, k):
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        idx = sample_batch_negatives(num_keys, k, generator=g, shared=shared)
        assert idx.shape == (num_keys, k) and idx.dtype == torch.long
        assert (idx >= 0).all() and (idx < num_keys).all()
        assert not (idx == torch.arange(num_keys)[:, None]).any()
        assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()  # K distinct per query


def test_batch_negatives_with_gathered_keys():
    # a rank holding queries 8..11 of a global batch of 16 keys
    own = torch.arange(8, 12)
    for shared in (True, False):
        idx = sample_batch_negatives(16, 15, own, generator=torch.Generator().manual_seed(1),
                                     shared=shared)
        assert idx.shape == (4, 15)
        for row, mine in zip(idx.tolist(), own.tolist()):
            assert sorted(row) == [j for j in range(16) if j != mine]


@pytest.mark.parametrize("shared", [True, False])
def test_batch_negatives_are_uniform_over_the_other_keys(shared):
    """Each query's negatives are a uniform K-subset of the other keys: every other key appears
    with frequency K / (M - 1). Catches e.g. a shared scheme that over-uses the spare key."""
    g = torch.Generator().manual_seed(0)
    m, k, trials = 6, 2, 4000
    counts = torch.zeros(m, m)
    for _ in range(trials):
        idx = sample_batch_negatives(m, k, generator=g, shared=shared)
        counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=counts.dtype))
    freq = counts / trials
    expected = k / (m - 1)
    off_diagonal = ~torch.eye(m, dtype=torch.bool)
    assert (freq.diagonal() == 0).all()
    assert (freq[off_diagonal] - expected).abs().max() < 0.04, freq


def _released_negatives(sims: torch.Tensor, neg_perm: torch.Tensor) -> torch.Tensor:
    """The released SiMo code's selection, written as it is there (NT_Xent.forward, Megvii's
    SelfSup): drop the diagonal of the B x B similarity matrix, keep the columns neg_perm of every
    row."""
    b = sims.shape[0]
    neg_mask = ~torch.eye(b, dtype=torch.bool)
    return sims[neg_mask].reshape(b, -1)[:, neg_perm]


@pytest.mark.parametrize("b,k", [(16, 5), (16, 15), (256, 16), (256, 255)])
def test_shared_negatives_are_the_released_selection(b, k):
    """shared=True picks, for a given generator state, exactly the logits the released code picks
    from ``randperm(B - 1)[:K]``; a rank holding rows 4..7 gets those rows of the same selection."""
    g = torch.Generator().manual_seed(3)
    sims = torch.randn(b, b, generator=g, dtype=torch.float64)
    for step in range(3):
        state = g.get_state()
        neg_perm = torch.randperm(b - 1, generator=g)[:k]
        g.set_state(state)
        idx = sample_batch_negatives(b, k, generator=g, shared=True)
        want = _released_negatives(sims, neg_perm)
        assert torch.equal(sims.gather(1, idx), want)
        g.set_state(state)
        own = torch.arange(4, 8)
        local = sample_batch_negatives(b, k, own, generator=g, shared=True)
        assert torch.equal(sims[own].gather(1, local), want[4:8])
    if k == b - 1:  # the released K = 255 at N = 256: every other key, in a random order
        assert torch.equal(idx.sort(1).values, _released_negatives(
            torch.arange(b).expand(b, b), torch.arange(b - 1)))


@pytest.mark.parametrize("shared", [True, False])
def test_rows_are_the_rows_of_the_full_draw(shared):
    """A process selecting only its rows (``rows=``) gets exactly those rows of the whole batch's
    draw for the same generator state, as one process holding the global batch would."""
    for first, n in [(0, 8), (8, 8), (24, 8), (0, 32)]:
        full = sample_batch_negatives(32, 16, generator=torch.Generator().manual_seed(9),
                                      shared=shared)
        mine = sample_batch_negatives(32, 16, generator=torch.Generator().manual_seed(9),
                                      shared=shared, rows=slice(first, first + n))
        assert torch.equal(mine, full[first : first + n])


def test_batch_negatives_need_enough_keys_and_are_deterministic():
    with pytest.raises(UserError, match="at least 17 keys"):
        sample_batch_negatives(16, 16)
    a = sample_batch_negatives(50, 7, generator=torch.Generator().manual_seed(5), shared=False)
    b = sample_batch_negatives(50, 7, generator=torch.Generator().manual_seed(5), shared=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("shared", [True, False])
def test_batch_logits_match_gathering_the_keys(shared):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    keys = F.normalize(torch.randn(10, 8, generator=g), dim=1)
    own = torch.tensor([3, 4, 5, 6])
    pos, neg = batch_logits(q, keys, 5, own, generator=torch.Generator().manual_seed(7),
                            shared=shared)
    idx = sample_batch_negatives(10, 5, own, generator=torch.Generator().manual_seed(7),
                                 shared=shared)
    ref_pos, ref_neg = pairwise_logits(q, keys[own], keys[idx])
    torch.testing.assert_close(pos, ref_pos)
    torch.testing.assert_close(neg, ref_neg)


# ---------------------------------------------------------------- torch.compile
def test_losses_under_torch_compile():
    """fullgraph=True proves dynamo traces each loss without graph breaks; the aot_eager backend
    also runs AOTAutograd (forward + backward graphs) without needing a C++ toolchain, in a few
    seconds on CPU. Inductor is exercised by the GPU test."""
    torch._dynamo.reset()
    pos, neg = _similarities(n=6, k=5, dtype=torch.float32)
    for name, fn in LOSSES.items():
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
        p1, n1 = pos.clone().requires_grad_(), neg.clone().requires_grad_()
        p2, n2 = pos.clone().requires_grad_(), neg.clone().requires_grad_()
        out = compiled(p1, n1, 0.2, **EXTRA[name])
        ref = fn(p2, n2, 0.2, **EXTRA[name])
        out.backward()
        ref.backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(n1.grad, n2.grad)
    compiled_helper = torch.compile(pairwise_logits, backend="aot_eager", fullgraph=True)
    q = F.normalize(torch.randn(6, 8), dim=1)
    torch.testing.assert_close(compiled_helper(q, q, q[:3]), pairwise_logits(q, q, q[:3]))


@pytest.mark.slow
def test_eqco_under_inductor_on_cpu():
    """One real inductor compile (generated C++), ~25 s on one CPU core: forward and backward agree
    with eager."""
    torch._dynamo.reset()
    pos, neg = _similarities(n=6, k=5, dtype=torch.float32)
    compiled = torch.compile(eqco, fullgraph=True)
    p1, n1 = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    p2, n2 = pos.clone().requires_grad_(), neg.clone().requires_grad_()
    out, ref = compiled(p1, n1, 0.2, 3.0), eqco(p2, n2, 0.2, 3.0)
    out.backward()
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(p1.grad, p2.grad)
    torch.testing.assert_close(n1.grad, n2.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu_and_compiles_with_inductor(dtype):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    keys = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    cpu_gen = torch.Generator().manual_seed(1)
    pos, neg = batch_logits(q.to(dtype).float(), keys.to(dtype).float(), 8, generator=cpu_gen)
    cuda_gen = torch.Generator().manual_seed(1)  # CPU generator: same draw, moved to the GPU
    pos_c, neg_c = batch_logits(q.cuda().to(dtype), keys.cuda().to(dtype), 8, generator=cuda_gen)
    assert pos_c.dtype == torch.float32 and pos_c.is_cuda
    torch.testing.assert_close(pos_c.cpu(), pos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(neg_c.cpu(), neg, rtol=1e-5, atol=1e-5)
    for name, fn in LOSSES.items():
        ref = fn(pos, neg, 0.2, **EXTRA[name])
        compiled = torch.compile(fn, fullgraph=True)
        torch.testing.assert_close(compiled(pos_c, neg_c, 0.2, **EXTRA[name]).cpu(), ref,
                                   rtol=1e-4, atol=1e-5)
