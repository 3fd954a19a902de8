"""pretrain.models / pretrain.methods: checkpoint key layout, SyncBN conversion, momentum update,
negatives, every method trains one step."""

import pytest
import torch
import torchvision
from detectron2.layers import NaiveSyncBatchNorm

from pretrain.config import get_pretrain_cfg
from pretrain.methods import SiMo, build_method, in_batch_logits
from pretrain.models import NaiveSyncBatchNorm1d, build_encoder, convert_to_sync_bn


def _tiny_cfg(method="simo", **over):
    cfg = get_pretrain_cfg()
    cfg.MODEL.METHOD = method
    cfg.MODEL.ARCH = "resnet18"
    cfg.MODEL.DIM = 16
    cfg.MODEL.MLP_HIDDEN = 32
    cfg.LOSS.NUM_NEGATIVES = 4
    cfg.LOSS.QUEUE_SIZE = 24
    cfg.SOLVER.IMS_PER_BATCH = 8
    for k, v in over.items():
        node, key = cfg, k.split(".")
        for part in key[:-1]:
            node = node[part]
        node[key[-1]] = v
    return cfg


def test_checkpoint_keys_follow_moco_layout():
    torch.manual_seed(0)
    model = build_method(_tiny_cfg("mocov2", **{"MODEL.MLP_BN": False}), torch.device("cpu"))
    keys = model.state_dict().keys()
    for k in [
        "encoder_q.conv1.weight",
        "encoder_q.layer1.0.bn1.running_mean",
        "encoder_q.fc.0.weight",
        "encoder_k.conv1.weight",
        "encoder_k.fc.2.weight",
        "queue",
    ]:
        assert k in keys, k
    # the backbone = encoder_q.* minus fc.*, in torchvision names: loads strictly into a ResNet
    backbone = {
        k[len("encoder_q.") :]: v
        for k, v in model.state_dict().items()
        if k.startswith("encoder_q.") and not k.startswith("encoder_q.fc.")
    }
    ref = torchvision.models.resnet18()
    missing, unexpected = ref.load_state_dict(backbone, strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    assert model.queue.shape == (24, 16)
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(24))


def test_simo_head_is_fc_bn_relu_fc_bn():
    enc = build_encoder("resnet18", 16, 32, mlp_bn=True)
    kinds = [type(m).__name__ for m in enc.fc]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert enc.fc[0].in_features == 512 and enc.fc[3].out_features == 16


def test_zero_init_residual_and_head_init():
    """ZERO_INIT_RESIDUAL zeroes the last BN gamma of every residual branch (the released code's
    conv3.norm), so at init every block outputs relu(x + shortcut(x)); HEAD_INIT_STD draws the
    head's fc weights from N(0, std^2)."""
    torch.manual_seed(0)
    enc = build_encoder("resnet50", zero_init_residual=True, head_init_std=0.01).eval()
    blocks = [b for layer in (enc.layer1, enc.layer2, enc.layer3, enc.layer4) for b in layer]
    assert len(blocks) == 16
    for block in blocks:
        assert torch.count_nonzero(block.bn3.weight) == 0
        assert torch.count_nonzero(block.bn1.weight) == block.bn1.weight.numel()
    x = torch.randn(2, 256, 8, 8)
    assert torch.equal(enc.layer1[1](x), torch.relu(x))
    for layer in (enc.fc[0], enc.fc[3]):
        assert abs(layer.weight.std().item() - 0.01) < 1e-3
    default = build_encoder("resnet50")
    assert default.layer1[0].bn3.weight.eq(1).all()
    assert default.fc[0].weight.std().item() < 0.015  # kaiming uniform: 1/sqrt(3 * 2048) ~ 0.013
    assert abs(default.fc[3].weight.std().item() - 0.01) > 1e-3


def test_convert_to_sync_bn_keeps_keys_and_values():
    torch.manual_seed(0)
    enc = build_encoder("resnet18", 16, 32)
    with torch.no_grad():
        enc.bn1.running_mean.uniform_()
    sync = convert_to_sync_bn(enc)
    assert isinstance(sync.bn1, NaiveSyncBatchNorm) and isinstance(sync.fc[1], NaiveSyncBatchNorm1d)
    # on every device: nn.SyncBatchNorm would wait for the host in every layer on CUDA
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in sync.modules())
    assert sync.state_dict().keys() == enc.state_dict().keys()
    assert torch.equal(sync.bn1.running_mean, enc.bn1.running_mean)
    # single process: same output as plain BN, also for the [N, C] head input
    x = torch.randn(4, 3, 32, 32)
    ref = build_encoder("resnet18", 16, 32)
    ref.load_state_dict(sync.state_dict())
    assert torch.allclose(sync(x), ref(x), atol=1e-6)


def test_momentum_update_matches_formula():
    torch.manual_seed(0)
    model = build_method(_tiny_cfg("simo", **{"MODEL.MOMENTUM": 0.9}), torch.device("cpu"))
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    q = [p.clone() for p in model.encoder_q.parameters()]
    k = [p.clone() for p in model.encoder_k.parameters()]
    model.momentum_update()
    for p_k, old_k, p_q in zip(model.encoder_k.parameters(), k, q, strict=True):
        assert torch.allclose(p_k, 0.9 * old_k + 0.1 * p_q, atol=1e-6)
        # bit-identical to the per-tensor loop the fused update replaces
        assert torch.equal(p_k, old_k.clone().mul_(0.9).add_(p_q, alpha=1.0 - 0.9))
    assert not any(p.requires_grad for p in model.encoder_k.parameters())


@pytest.mark.parametrize("shared", [False, True])
def test_simo_negatives_never_include_own_key(shared):
    captured = {}

    def spy(pos, neg, tau):
        captured["pos"], captured["neg"] = pos, neg
        return neg.mean() - pos.mean()

    model = SiMo(
        build_encoder("resnet18", 16, 32),
        spy,
        0.2,
        momentum=0.9,
        num_negatives=7,
        shared_negatives=shared,
    )
    torch.manual_seed(1)
    keys = torch.nn.functional.normalize(torch.randn(8, 64), dim=1)
    for _ in range(20):
        model.pair_loss(keys, keys)  # q == k: the own key is the only similarity equal to 1
        assert torch.allclose(captured["pos"], torch.ones(8))
        assert captured["neg"].shape == (8, 7)
        assert (captured["neg"] < 1 - 1e-4).all()
        # the 7 negatives of each query are the 7 other keys, each exactly once
        assert torch.allclose(
            captured["neg"].sort(1).values,
            (keys @ keys.t())
            .masked_select(~torch.eye(8, dtype=torch.bool))
            .view(8, 7)
            .sort(1)
            .values,
        )


def test_in_batch_logits_excludes_self_and_positive():
    z = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    pos_col = torch.tensor([3, 4, 5, 0, 1, 2])
    pos, neg = in_batch_logits(z, z, pos_col, exclude=torch.arange(6))
    sims = z @ z.t()
    assert torch.allclose(pos, sims[torch.arange(6), pos_col])
    assert neg.shape == (6, 4)
    for i in range(6):
        expected = [sims[i, j] for j in range(6) if j not in (i, int(pos_col[i]))]
        assert torch.allclose(neg[i], torch.stack(expected))


@pytest.mark.parametrize(
    "method,loss",
    [
        ("simo", "eqco"),
        ("mocov2", "infonce"),
        ("simclr", "dcl"),
        ("simclr", "dclw"),
        ("simmoco", "dual_temperature"),
        ("simco", "dual_temperature"),
    ],
)
def test_every_method_takes_a_finite_step(method, loss):
    torch.manual_seed(0)
    symmetric = method in ("simclr", "simmoco", "simco")
    cfg = _tiny_cfg(method, **{"LOSS.NAME": loss, "LOSS.SYMMETRIC": symmetric})
    model = build_method(cfg, torch.device("cpu"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    before = model.encoder_q.conv1.weight.detach().clone()
    out = model(((x1, x2), None))
    assert set(out) == {"loss"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    opt.step()
    assert not torch.equal(before, model.encoder_q.conv1.weight)
    if method == "mocov2":
        assert int(model.queue_ptr) == 8  # the batch's keys were enqueued


def test_simo_shared_negatives_are_the_released_selection():
    """SiMo with LOSS.SHARED_NEGATIVES: for the model's generator state, the logits of each query
    are those the released code selects with ``randperm(B - 1)[:K]`` (one draw per step)."""
    captured = {}

    def spy(pos, neg, tau):
        captured["neg"] = neg
        return neg.mean() - pos.mean()

    model = SiMo(build_encoder("resnet18", 16, 32), spy, 0.2, momentum=0.9, num_negatives=5,
                 shared_negatives=True, seed=4)
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
    for _ in range(3):
        state = model.generator.get_state()
        neg_perm = torch.randperm(7, generator=torch.Generator().set_state(state))[:5]
        model.pair_loss(q, k)
        sims = q @ k.t()
        released = sims[~torch.eye(8, dtype=torch.bool)].reshape(8, -1)[:, neg_perm]
        torch.testing.assert_close(captured["neg"], released)


def test_mocov2_symmetric_enqueues_once_and_never_scores_the_own_key():
    """LOSS.SYMMETRIC with MoCo v2: both halves score against the queue of before the step, so no
    query meets a key of its own image among its negatives; the queue advances N per step."""
    torch.manual_seed(0)
    cfg = _tiny_cfg("mocov2", **{"LOSS.SYMMETRIC": True, "LOSS.QUEUE_SIZE": 16,
                                 "MODEL.MLP_BN": False, "MODEL.NORM": "BN"})
    model = build_method(cfg, torch.device("cpu"))
    seen = {"q": [], "k": [], "neg": []}
    embed_q, embed_k, loss_fn = model.embed_q, model.embed_k, model.loss_fn

    def record(name, fn):
        def wrapped(x):
            seen[name].append(fn(x))
            return seen[name][-1]
        return wrapped

    def spy(pos, neg, tau):
        seen["neg"].append(neg)
        return loss_fn(pos, neg, tau)

    model.embed_q, model.embed_k, model.loss_fn = record("q", embed_q), record("k", embed_k), spy
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        for v in seen.values():
            v.clear()
        queue_before = model.queue.clone()
        im_q, im_k = torch.randn(2, 8, 3, 32, 32, generator=g)
        model(((im_q, im_k), None))["loss"].backward()
        q1, q2 = seen["q"]
        k2, k1 = seen["k"]  # view 2's keys for half 1, view 1's keys for half 2
        for q, neg in zip((q1, q2), seen["neg"], strict=True):
            torch.testing.assert_close(neg, q @ queue_before.t())  # the queue of before the step
            for own in (k1, k2):  # either view of the query's own image
                own_sim = (q * own).sum(1, keepdim=True)
                assert ((neg - own_sim).abs() > 1e-5).all()
        assert int(model.queue_ptr) == (step + 1) * 8 % 16
        ptr = step * 8 % 16
        torch.testing.assert_close(model.queue[ptr : ptr + 8], k2)  # view 2's keys, once


@pytest.mark.parametrize("size", [4, 12, 24])
def test_mocov2_queue_is_a_ring_of_any_length(size):
    """LOSS.QUEUE_SIZE need not be a multiple of the batch (the K-sweep's K = 4 and 16 at N = 32):
    the queue always holds the newest ``size`` keys, written in order and wrapping at its end."""
    torch.manual_seed(0)
    model = build_method(_tiny_cfg("mocov2", **{"LOSS.QUEUE_SIZE": size}), torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    history = torch.empty(0, 16)
    for step in range(5):
        keys = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=1)
        model.after_loss(keys)
        history = torch.cat([history, keys])
        newest = history[-size:]  # the last `size` keys enqueued, oldest first
        ptr = int(model.queue_ptr)
        assert ptr == model._ptr < size
        ring = torch.cat([model.queue[ptr:], model.queue[:ptr]]) if len(history) >= size else None
        if ring is not None:
            torch.testing.assert_close(ring, newest)
        else:  # not yet full: the keys so far from slot 0 on, the random init after them
            torch.testing.assert_close(model.queue[: len(history)], history)
            assert ptr == len(history)
