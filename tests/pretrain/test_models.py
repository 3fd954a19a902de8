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


def test_zero_init_residual():
    enc = build_encoder("resnet50", zero_init_residual=True)
    assert torch.count_nonzero(enc.layer1[0].bn3.weight) == 0


def test_convert_to_sync_bn_keeps_keys_and_values():
    torch.manual_seed(0)
    enc = build_encoder("resnet18", 16, 32)
    with torch.no_grad():
        enc.bn1.running_mean.uniform_()
    sync = convert_to_sync_bn(enc, "cpu")
    assert isinstance(sync.bn1, NaiveSyncBatchNorm) and isinstance(sync.fc[1], NaiveSyncBatchNorm1d)
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
    out = model(x1, x2)
    assert set(out) == {"loss"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    opt.step()
    assert not torch.equal(before, model.encoder_q.conv1.weight)
    if method == "mocov2":
        assert int(model.queue_ptr) == 8  # the batch's keys were enqueued
