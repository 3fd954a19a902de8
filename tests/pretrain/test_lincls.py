"""pretrain.lincls / tools/lincls.py: linear evaluation on shapes, the kNN top-1 next to it, the
frozen-backbone sanity check, exact resume, the accepted checkpoint formats, bad inputs, outputs
and the CLI."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision

from pretrain.config import get_pretrain_cfg, load_pretrain_cfg
from pretrain.data import build_image_folder, eval_transform
from pretrain.io import UserError, load_checkpoint
from pretrain.knn import knn_predict
from pretrain.lincls import (
    BackboneChangedError,
    BatchNormLinear,
    CachedFeatures,
    LinearEvaluator,
    build_linear_model,
    check_backbone_unchanged,
    evaluate_weights,
    extract_features,
    get_lincls_cfg,
    knn_accuracy,
    lincls_lr,
    load_lincls_cfg,
    load_pretrained,
    run_linear_eval,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 16  # input crop of these tests: ResNet-18 at 16 px keeps every run to a few seconds


@pytest.fixture(scope="module")
def shapes(shapes_folder):
    return shapes_folder(100, 50, 64)


def _images(root, split):
    ds = build_image_folder(root, split, eval_transform(SIZE))
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor(ds.targets)


@pytest.fixture(scope="module")
def oracle(shapes, tmp_path_factory):
    """A ResNet-18 trained with labels on the center crops of *all* shapes images (train and
    val), saved as a torchvision state dict: a backbone whose features encode every label.

    Tiny ResNets trained on 100 shapes images do not generalise (val stays at chance), so the
    features are made informative for the val images directly. What the linear evaluation must
    show is that it recovers them: an fc trained on the train split only, evaluated on val."""
    x_tr, y_tr = _images(shapes, "train")
    x_va, y_va = _images(shapes, "val")
    x, y = torch.cat([x_tr, x_va]), torch.cat([y_tr, y_va])
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randperm(len(y), generator=g)[:32]
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        own_val_top1 = 100.0 * (net(x_va).argmax(1) == y_va).float().mean().item()
    path = str(tmp_path_factory.mktemp("oracle") / "oracle_r18.pth")
    torch.save(net.state_dict(), path)
    return path, own_val_top1


def _cfg(root, out, weights, **over):
    cfg = get_lincls_cfg()
    opts = {
        "MODEL.ARCH": "resnet18",
        "MODEL.WEIGHTS": weights,
        "INPUT.SIZE": SIZE,
        "DATASETS.ROOT": root,
        "SOLVER.IMS_PER_BATCH": 10,
        "SOLVER.EPOCHS": 30,
        "SOLVER.LR_DROP_EPOCHS": [18, 24],
        "SOLVER.CHECKPOINT_PERIOD_EPOCHS": 100.0,
        "TEST.IMS_PER_BATCH": 50,
        "DATALOADER.NUM_WORKERS": 0,
        "CUDNN_BENCHMARK": False,
        "LOG_PERIOD": 5,
        "OUTPUT_DIR": str(out),
    }
    opts.update(over)
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    return cfg


def _our_checkpoint(state_dict, path, name="simo_shapes", arch="resnet18"):
    """Wrap a torchvision state dict the way tools/pretrain.py stores its query encoder."""
    model = {f"encoder_q.{k}": v for k, v in state_dict.items() if not k.startswith("fc.")}
    model["encoder_q.fc.0.weight"] = torch.randn(32, 512)  # projection head: must be dropped
    model.update({f"encoder_k.{k}": v + 1 for k, v in state_dict.items()})
    meta = {"kind": "pretrain", "name": name, "method": "simo", "arch": arch, "loss": "eqco",
            "tau": 0.2, "alpha": 256.0, "num_negatives": 16, "epochs": 15.0}  # fmt: skip
    torch.save({"model": model, "iteration": 9, "meta": meta}, path)
    return meta


def _majority_percent(root):
    targets = build_image_folder(root, "val", eval_transform(SIZE)).targets
    return 100.0 * max(targets.count(c) for c in set(targets)) / len(targets)


# --------------------------------------------------------------------------------------------
# accuracy


def test_informative_backbone_is_well_above_chance_and_constant_features_are_not(
    shapes, oracle, tmp_path
):
    weights, own_val_top1 = oracle
    majority = _majority_percent(shapes)
    meta = _our_checkpoint(torch.load(weights), str(tmp_path / "ours.pth"))
    res = run_linear_eval(
        _cfg(shapes, tmp_path / "good", ""), weights=str(tmp_path / "ours.pth"), cached=True
    )
    assert res["kind"] == "lincls" and res["name"] == "simo_shapes" and res["pretrain"] == meta
    # the oracle's own head gets own_val_top1 on val; an fc trained on the 100 train features
    # alone must find most of that
    assert own_val_top1 > majority + 40, (own_val_top1, majority)
    assert res["top1"] > majority + 30, (res["top1"], majority, own_val_top1)
    assert res["top5"] == 100.0  # 5 classes
    # the kNN vote reads the same label-carrying features without any training
    assert res["knn_top1"] > majority + 30, (res["knn_top1"], majority)
    assert (res["knn_k"], res["knn_t"], res["seed"], res["val_images"]) == (20, 0.1, 0, 50)
    # a sweep reuses the extracted features; same SEED, same features -> the same run
    again = run_linear_eval(
        _cfg(shapes, tmp_path / "again", str(tmp_path / "ours.pth")),
        cached=True,
        features=res["features"],
    )
    assert again["features"] is res["features"] and again["top1"] == res["top1"]

    # control: conv1 = 0 makes every image's feature identical, so no fc can beat the majority
    # class; more would mean labels leak into training or evaluation
    sd = torch.load(weights)
    sd["conv1.weight"].zero_()
    torch.save(sd, tmp_path / "blind.pth")
    blind = run_linear_eval(
        _cfg(shapes, tmp_path / "blind", str(tmp_path / "blind.pth")), cached=True
    )
    assert blind["top1"] <= majority + 1e-6, (blind["top1"], majority)
    assert res["top1"] - blind["top1"] > 30
    # identical features -> identical neighbours for every val image -> one predicted class
    assert blind["knn_top1"] <= majority + 1e-6, (blind["knn_top1"], majority)


def _brute_force_knn_top1(features, num_classes, k, t):
    """kNN top-1 (%) spelled out one val row at a time: cosines, the k largest, exp(s/t) votes."""
    train = features.train / features.train.norm(dim=1, keepdim=True)
    correct = 0
    for f, y in zip(features.val, features.val_labels):
        sims = train @ (f / f.norm())
        top = sims.argsort(descending=True)[:k]
        votes = torch.zeros(num_classes, dtype=torch.float64)
        for j in top:
            votes[features.train_labels[j]] += float(torch.exp(sims[j].double() / t))
        correct += int(votes.argmax()) == int(y)
    return 100.0 * correct / len(features.val_labels)


def test_knn_top1_is_the_weighted_vote_over_the_cached_features(shapes, oracle, tmp_path):
    cfg = _cfg(shapes, tmp_path / "k", oracle[0], **{"SOLVER.MAX_ITER": 2, "TEST.KNN_K": 7})
    res = run_linear_eval(cfg, cached=True)
    f = res["features"]
    # the cached features are not normalised (the fc trains on them as they are); kNN uses
    # normalised copies and leaves them so
    assert f.train.norm(dim=1).sub(1).abs().max() > 0.1
    pred = knn_predict(
        torch.nn.functional.normalize(f.train, dim=1), f.train_labels,
        torch.nn.functional.normalize(f.val, dim=1), 5, k=7, t=0.1,
    )  # fmt: skip
    expected = 100.0 * int((pred == f.val_labels).sum()) / len(f.val_labels)
    assert res["knn_top1"] == pytest.approx(expected, abs=1e-9)
    assert res["knn_top1"] == pytest.approx(_brute_force_knn_top1(f, 5, 7, 0.1), abs=1e-9)
    assert (res["knn_k"], res["knn_t"]) == (7, 0.1)
    log = (tmp_path / "k").joinpath("results.json").read_text()
    assert json.loads(log)["knn_top1"] == res["knn_top1"]

    # a hand-made case: 4 train points, k=3; val 0 sits near class 1's single point but class
    # 0's two farther neighbours outvote it at T=1, not at T=0.05
    tiny = CachedFeatures(
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.1], [-1.0, 0.0]]),
        torch.tensor([1, 0, 0, 2]),
        torch.tensor([[1.0, 0.6], [-3.0, 0.1]]),
        torch.tensor([1, 2]),
    )
    assert knn_accuracy(tiny, 3, k=3, t=1.0) == 50.0  # val 0 -> class 0: 2 e^0.51 > e^0.86
    assert knn_accuracy(tiny, 3, k=3, t=0.05) == 100.0  # e^17.1 > 2 e^10.3
    assert knn_accuracy(tiny, 3, k=1, t=1.0) == 100.0
    assert _brute_force_knn_top1(tiny, 3, 3, 1.0) == 50.0

    # TEST.KNN False skips it
    off = _cfg(shapes, tmp_path / "off", oracle[0], **{"SOLVER.MAX_ITER": 2, "TEST.KNN": False})
    res = run_linear_eval(off, cached=True, features=f)
    assert (res["knn_top1"], res["knn_k"], res["knn_t"]) == (None, None, None)


# --------------------------------------------------------------------------------------------
# frozen backbone


def test_backbone_check_passes_untouched_and_catches_bn_updates(oracle):
    weights = load_pretrained(oracle[0], "resnet18")
    net = build_linear_model("resnet18", 5, weights)
    assert check_backbone_unchanged(net, weights.backbone) == len(weights.backbone)
    assert all(not p.requires_grad for n, p in net.named_parameters() if not n.startswith("fc."))
    net.fc.weight.data.add_(1.0)  # the fc is supposed to change
    check_backbone_unchanged(net, weights.backbone)

    net.layer3[1].bn2.running_var.mul_(1.0001)  # one BN buffer, barely
    with pytest.raises(BackboneChangedError, match=r"1 backbone tensor\(s\) differ.*layer3.1.bn2"):
        check_backbone_unchanged(net, weights.backbone)

    # the classic bug: a forward in train mode updates every BN's running statistics
    net = build_linear_model("resnet18", 5, weights).train()
    net(torch.randn(4, 3, SIZE, SIZE))
    with pytest.raises(BackboneChangedError, match="running_mean"):
        check_backbone_unchanged(net, weights.backbone)


def test_image_protocol_keeps_bn_frozen_and_only_trains_fc(shapes, oracle, tmp_path):
    """The paper protocol (augmented images through the backbone every step): the trainer's
    model is in train mode, the backbone must still run in eval mode."""
    cfg = _cfg(shapes, tmp_path / "img", oracle[0], **{"SOLVER.MAX_ITER": 3})
    evaluator = LinearEvaluator(cfg).resume_or_load(resume=False)
    fc_init = evaluator.net.fc.weight.detach().clone()
    evaluator.model.train()
    assert evaluator.model.training and not evaluator.net.training
    # every backbone module in eval mode; only the head follows train() (its BN, with HEAD_BN)
    assert not any(m.training for n, m in evaluator.net.named_modules() if not n.startswith("fc"))
    assert evaluator.net.fc.training
    res = evaluator.train()
    final = load_checkpoint(str(tmp_path / "img" / "model_final.pth"))
    source = torch.load(oracle[0])
    for k, v in final["model"].items():
        if not k.startswith("fc."):
            assert torch.equal(v, source[k]), k
    assert final["model"]["fc.weight"].shape == (5, 512)
    assert not torch.equal(final["model"]["fc.weight"], fc_init)
    assert final["meta"]["top1"] == res["top1"] and final["meta"]["kind"] == "lincls"
    assert res["protocol"] == "moco" and res["iterations"] == 3
    # kNN through images: train and val features of the *eval* transform (not the augmented
    # crops the fc trains on), the same numbers as an extraction of both splits by hand
    net = build_linear_model("resnet18", 5, load_pretrained(oracle[0], "resnet18"))
    split = {s: build_image_folder(shapes, s, eval_transform(SIZE)) for s in ("train", "val")}
    cpu = torch.device("cpu")
    by_hand = CachedFeatures(
        *extract_features(net, split["train"], cpu, 7), *extract_features(net, split["val"], cpu, 7)
    )
    assert res["knn_top1"] == pytest.approx(knn_accuracy(by_hand, 5, 20, 0.1), abs=1e-9)
    assert res["knn_top1"] > 50.0 and final["meta"]["knn_top1"] == res["knn_top1"]


# --------------------------------------------------------------------------------------------
# resume


def _state(out):
    return load_checkpoint(str(out / "model_final.pth"))


def test_resume_is_exact(shapes, oracle, tmp_path):
    """3 iterations, then --resume to 6, equals 6 in one go (image protocol: augmentations, data
    order, momentum, lr drop at iteration 4 and RNG states all continue)."""
    over = {"SOLVER.LR_DROP_EPOCHS": [0.4], "SOLVER.CHECKPOINT_PERIOD_EPOCHS": 0.3}
    straight = run_linear_eval(
        _cfg(shapes, tmp_path / "straight", oracle[0], **over, **{"SOLVER.MAX_ITER": 6})
    )
    run_linear_eval(_cfg(shapes, tmp_path / "resumed", oracle[0], **over, **{"SOLVER.MAX_ITER": 3}))
    torch.manual_seed(12345)  # a fresh process would not share the RNG state either
    cfg = _cfg(shapes, tmp_path / "resumed", oracle[0], **over, **{"SOLVER.MAX_ITER": 6})
    evaluator = LinearEvaluator(cfg).resume_or_load(resume=True)
    assert evaluator.start_iter == 3
    resumed = evaluator.train()
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(s_a["momentum_buffer"], s_b["momentum_buffer"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(30.0 * 0.1)
    assert a["loader"] == b["loader"] == {"epoch": 0, "batch": 6}
    assert resumed["top1"] == straight["top1"] and resumed["top5"] == straight["top5"]
    assert resumed["knn_top1"] == straight["knn_top1"] and resumed["knn_top1"] > 50.0
    assert resumed["seed"] == 0 and resumed["val_images"] == 50


def test_resume_with_other_weights_is_refused(shapes, oracle, tmp_path):
    run_linear_eval(_cfg(shapes, tmp_path / "r", oracle[0], **{"SOLVER.MAX_ITER": 2}), cached=True)
    sd = torch.load(oracle[0])
    sd["layer1.0.conv1.weight"].add_(0.1)
    torch.save(sd, tmp_path / "other.pth")
    cfg = _cfg(shapes, tmp_path / "r", str(tmp_path / "other.pth"), **{"SOLVER.MAX_ITER": 4})
    with pytest.raises(UserError, match="its backbone is not the one in MODEL.WEIGHTS"):
        run_linear_eval(cfg, cached=True, resume=True)


# --------------------------------------------------------------------------------------------
# input formats


@pytest.fixture(scope="module")
def r18_state():
    torch.manual_seed(1)
    return torchvision.models.resnet18().state_dict()


def _save(obj, path):
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("fmt", ["ours", "moco", "torchvision", "module_prefixed", "lincls"])
def test_accepted_formats_give_the_same_backbone(fmt, r18_state, tmp_path):
    path = tmp_path / f"{fmt}.pth"
    expected_meta = {}
    if fmt == "ours":
        expected_meta = _our_checkpoint(r18_state, path)
    elif fmt == "moco":  # the official main_moco.py layout
        sd = {f"module.encoder_q.{k}": v for k, v in r18_state.items() if not k.startswith("fc.")}
        sd["module.encoder_q.fc.0.weight"] = torch.randn(2048, 512)
        sd["module.encoder_q.fc.2.weight"] = torch.randn(128, 2048)
        sd.update({f"module.encoder_k.{k}": v for k, v in r18_state.items()})
        sd["module.queue"] = torch.randn(128, 4096)
        _save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {}}, path)
    elif fmt == "torchvision":
        _save(r18_state, path)
    elif fmt == "module_prefixed":
        _save({f"module.{k}": v for k, v in r18_state.items()}, path)
    else:  # our linear-eval checkpoint can be evaluated again
        sd = dict(r18_state, **{"fc.weight": torch.randn(5, 512), "fc.bias": torch.zeros(5)})
        meta = {"kind": "lincls", "name": "x", "pretrain": {"name": "x"}}
        _save({"model": sd, "meta": meta}, path)
    w = load_pretrained(str(path), "resnet18")
    expected = {k: v for k, v in r18_state.items() if not k.startswith("fc.")}
    assert w.backbone.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(w.backbone[k], v), k
    assert w.kind == {"ours": "pretrain", "module_prefixed": "torchvision"}.get(fmt, fmt)
    if fmt == "ours":
        assert w.meta == expected_meta
    if fmt == "moco":
        assert w.meta["method"] == "mocov2" and w.meta["num_negatives"] == 4096
    net = build_linear_model("resnet18", 7, w)
    assert net.fc.weight.shape == (7, 512) and float(net.fc.bias.detach().abs().sum()) == 0.0
    assert 0.008 < float(net.fc.weight.detach().std()) < 0.012  # N(0, 0.01^2) as MoCo
    check_backbone_unchanged(net, w.backbone)


def test_old_torchvision_files_without_bn_counters_load(r18_state, tmp_path):
    sd = {k: v for k, v in r18_state.items() if not k.endswith("num_batches_tracked")}
    w = load_pretrained(_save(sd, tmp_path / "old.pth"), "resnet18")
    check_backbone_unchanged(build_linear_model("resnet18", 5, w), w.backbone)


def _bad_inputs(tmp, sd):
    missing = {k: v for k, v in sd.items() if k != "layer4.1.conv2.weight"}
    mangled = dict(sd, **{"layer2.0.conv1.weight": torch.zeros(128, 64, 5, 5)})
    (tmp / "notes.txt").write_text("these are not weights\n")
    return {
        "text file": (str(tmp / "notes.txt"), "resnet18", "not a PyTorch checkpoint"),
        "no file": (str(tmp / "nope.pth"), "resnet18", "no such file"),
        "missing layer": (
            _save(missing, tmp / "missing.pth"),
            "resnet18",
            r"1 backbone tensor\(s\) of a resnet18 are missing, e.g. layer4.1.conv2.weight",
        ),
        "wrong shape": (
            _save(mangled, tmp / "mangled.pth"),
            "resnet18",
            r"wrong shape for a resnet18, e.g. layer2.0.conv1.weight \(128, 64, 5, 5\)",
        ),
        "wrong arch": (
            _save(sd, tmp / "r18.pth"),
            "resnet50",
            "holds a resnet18 backbone but MODEL.ARCH is resnet50; set MODEL.ARCH resnet18",
        ),
        "meta arch": (
            str(tmp / "ours.pth"),
            "resnet34",
            "its meta says it is a resnet18 but MODEL.ARCH is resnet34",
        ),
        "no backbone": (
            _save({"model": {"head.weight": torch.zeros(3)}}, tmp / "head.pth"),
            "resnet18",
            "no ResNet backbone recognised",
        ),
        "not a dict": (_save([torch.zeros(2)], tmp / "list.pth"), "resnet18", "not a checkpoint"),
        "empty": ("", "resnet18", "MODEL.WEIGHTS is empty"),
    }


def test_bad_inputs_are_refused_with_one_sentence(r18_state, tmp_path):
    _our_checkpoint(r18_state, tmp_path / "ours.pth")
    for case, (path, arch, message) in _bad_inputs(tmp_path, r18_state).items():
        with pytest.raises(UserError, match=message) as info:
            load_pretrained(path, arch)
        assert "\n" not in str(info.value), case


# --------------------------------------------------------------------------------------------
# configs, outputs, CLI


def test_shipped_configs_load_and_follow_the_protocol():
    folder = os.path.join(ROOT, "configs", "lincls")
    names = sorted(f for f in os.listdir(folder) if f.endswith(".yaml"))
    assert {"r50_100ep.yaml", "shapes_cpu.yaml"} <= set(names)
    for name in names:
        load_lincls_cfg(os.path.join(folder, name), check_paths=False)
    moco = load_lincls_cfg(os.path.join(folder, "r50_100ep.yaml"), check_paths=False)
    s = moco.SOLVER
    assert (moco.MODEL.ARCH, moco.INPUT.SIZE, moco.INPUT.RESIZE) == ("resnet50", 224, 256)
    assert (s.BASE_LR, s.MOMENTUM, s.WEIGHT_DECAY, s.IMS_PER_BATCH) == (30.0, 0.9, 0.0, 256)
    assert (s.EPOCHS, tuple(s.LR_DROP_EPOCHS), s.GAMMA) == (100, (60, 80), 0.1)
    assert not moco.CACHED_FEATURES
    # the paper's protocol: lr 30 unscaled on the raw features
    assert (moco.MODEL.HEAD_BN, s.REFERENCE_BATCH, lincls_lr(moco)) == (False, 0, 30.0)
    # the steady probe: the same schedule, a head BatchNorm and lr 0.1 at batch 256
    bn = load_lincls_cfg(os.path.join(folder, "r50_100ep_bn.yaml"), check_paths=False)
    assert (bn.MODEL.HEAD_BN, bn.SOLVER.BASE_LR, bn.SOLVER.REFERENCE_BATCH) == (True, 0.1, 256)
    assert (bn.SOLVER.EPOCHS, tuple(bn.SOLVER.LR_DROP_EPOCHS), bn.SOLVER.IMS_PER_BATCH) == (
        100, (60, 80), 256
    )  # fmt: skip
    # the shapes demo evaluates the pretraining demo's backbone at its resolution
    demo = load_lincls_cfg(os.path.join(folder, "shapes_cpu.yaml"), check_paths=False)
    pre_file = os.path.join(ROOT, "configs", "pretrain", "simo_shapes_cpu.yaml")
    pre = load_pretrain_cfg(pre_file, check_paths=False)
    assert (demo.MODEL.ARCH, demo.INPUT.SIZE) == (pre.MODEL.ARCH, pre.INPUT.SIZE)
    assert demo.DATASETS.ROOT == pre.DATASETS.ROOT
    assert (demo.SOLVER.BASE_LR, demo.SOLVER.EPOCHS, demo.MODEL.HEAD_BN) == (0.1, 100, True)
    assert lincls_lr(demo) == pytest.approx(0.1 * 32 / 256)  # r50_100ep_bn.yaml's lr at batch 32
    # its retrieval is the pretraining monitor's: same views (crop scales), same val images
    t = demo.TEST
    assert t.RETRIEVAL_MIN_SCALE == pre.INPUT.MIN_SCALE
    assert t.RETRIEVAL_MAX_SCALE == pre.INPUT.MAX_SCALE
    assert t.RETRIEVAL_SIZE == pre.TEST.RETRIEVAL_SIZE
    assert demo.DATASETS.VAL_SPLIT == pre.DATASETS.VAL_SPLIT
    assert moco.TEST.RETRIEVAL_SIZE == 0  # ImageNet linear evals do not pay for it


def test_run_keys_are_shared_with_pretraining():
    """DATALOADER, NAME, SEED, LOG_PERIOD and CUDNN_BENCHMARK come from one place
    (pretrain.config.add_run_config) with the same defaults; only OUTPUT_DIR's differs."""
    lin, pre = get_lincls_cfg(), get_pretrain_cfg()
    for key in ("DATALOADER", "NAME", "SEED", "LOG_PERIOD", "CUDNN_BENCHMARK"):
        assert lin[key] == pre[key], key
    assert dict(lin.DATALOADER) == {
        "NUM_WORKERS": 8, "PIN_MEMORY": True, "PERSISTENT_WORKERS": True, "PREFETCH_FACTOR": 2
    }  # fmt: skip
    assert (lin.NAME, lin.SEED, lin.LOG_PERIOD, lin.CUDNN_BENCHMARK) == ("", 0, 20, True)
    assert lin.OUTPUT_DIR == "output/lincls/r50_100ep"
    assert pre.OUTPUT_DIR == "output/pretrain/simo_r50_200ep"
    for opts, message in [
        (["DATALOADER.NUM_WORKERS", "-1"], "DATALOADER.NUM_WORKERS must be >= 0."),
        (["LOG_PERIOD", "0"], "LOG_PERIOD must be > 0."),
        (["OUTPUT_DIR", ""], "OUTPUT_DIR must not be empty."),
    ]:
        with pytest.raises(UserError, match=f"^{message}$"):
            load_lincls_cfg("", opts, check_paths=False)


@pytest.mark.parametrize(
    "opts,message",
    [
        (["SOLVER.LR", "3"], "unknown config key SOLVER.LR; check the spelling against pretrain/"),
        (["MODEL.ARCH", "vit_b"], "MODEL.ARCH 'vit_b' is unknown"),
        (["SOLVER.LR_DROP_EPOCHS", "[80, 60]"], "must be strictly increasing"),
        (["DATASETS.ROOT", "/nonexistent"], "/nonexistent/train is not a folder"),
        (["SOLVER.EPOCHS"], "KEY VALUE pairs"),
        (["TEST.RETRIEVAL_SIZE", "-1"], "TEST.RETRIEVAL_SIZE must be >= 0 (0 = off), got -1."),
        (["TEST.RETRIEVAL_MIN_SCALE", "0.5", "TEST.RETRIEVAL_MAX_SCALE", "0.3"],
         "TEST.RETRIEVAL_MIN_SCALE and RETRIEVAL_MAX_SCALE must satisfy 0 < MIN <= MAX <= 1"),
    ],
)
def test_bad_config_is_one_clear_user_error(opts, message, shapes):
    base = ["DATASETS.ROOT", shapes] if "DATASETS.ROOT" not in opts else []
    with pytest.raises(UserError) as info:
        load_lincls_cfg("", base + opts)
    assert message in str(info.value) and "\n" not in str(info.value)


def _cli(*args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "lincls.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_cli_cached_run_writes_the_documented_outputs(shapes, oracle, tmp_path):
    out = tmp_path / "cli"
    _our_checkpoint(torch.load(oracle[0]), tmp_path / "ours.pth", name="demo")
    proc = _cli(
        "--config-file", "configs/lincls/shapes_cpu.yaml", "--cached-features",
        "MODEL.WEIGHTS", str(tmp_path / "ours.pth"), "DATASETS.ROOT", shapes,
        "INPUT.SIZE", str(SIZE), "SOLVER.IMS_PER_BATCH", "10", "SOLVER.EPOCHS", "10",
        "SOLVER.LR_DROP_EPOCHS", "[6, 8]", "TEST.EVAL_PERIOD_EPOCHS", "5.0",
        "SOLVER.CHECKPOINT_PERIOD_EPOCHS", "5.0", "OUTPUT_DIR", str(out), "LOG_PERIOD", "20",
        "DATALOADER.NUM_WORKERS", "0", "TEST.IMS_PER_BATCH", "50",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["config.yaml", "log.txt", "metrics.json", "model_final.pth", "results.json"]:
        assert (out / name).is_file(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    assert load_lincls_cfg(str(out / "config.yaml")).CACHED_FEATURES is True
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "lincls" and res["name"] == "demo"
    assert res["weights"] == str(tmp_path / "ours.pth") and res["pretrain"]["method"] == "simo"
    assert res["iterations"] == 100 and res["cached_features"] is True
    assert (res["knn_k"], res["knn_t"], res["seed"], res["val_images"]) == (20, 0.1, 0, 50)
    assert res["knn_top1"] > 50.0
    # shapes_cpu.yaml's instance retrieval: the 50 val images (fewer than its 256), k hits of 50
    assert res["retrieval_images"] == 50
    assert res["instance_retrieval_top1"] * 50 / 100 == pytest.approx(
        round(res["instance_retrieval_top1"] * 50 / 100)
    )
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    evals = [m for m in metrics if "val/top1" in m]
    assert [m["iteration"] for m in evals] == [49, 100]  # every 5 epochs, then the final one
    assert evals[-1]["val/top1"] == res["top1"]
    lrs = {m["iteration"]: m["lr"] for m in metrics if "lr" in m}
    # shapes_cpu.yaml: 0.1 x 10 / 256 at batch 10, x0.1 at epoch 6
    assert lrs[59] == pytest.approx(0.1 * 10 / 256) and lrs[79] == pytest.approx(0.1 * 10 / 2560)
    assert res["lr"] == pytest.approx(0.1 * 10 / 256) and res["head_bn"] is True
    log = (out / "log.txt").read_text()
    assert "eta:" in log and "not the paper protocol" in log and "Sanity check passed" in log
    assert f"kNN top-1 {res['knn_top1']:.2f}% (k=20, T=0.1; 50 val against 100 train" in log

    final = load_checkpoint(str(out / "model_final.pth"))
    assert final["meta"]["kind"] == "lincls" and final["meta"]["top1"] == res["top1"]
    assert final["meta"]["pretrain"]["name"] == "demo"
    # the head's BatchNorm folded into the fc: a plain torchvision state dict
    assert set(final["model"]) == set(torchvision.models.resnet18(num_classes=5).state_dict())
    assert final["meta"]["head_bn"] is True and final["meta"]["head_bn_folded"] is True

    # tools/convert.py takes it and carries name and top-1 on
    from transfer.convert import convert

    report = convert(str(out / "model_final.pth"), str(tmp_path / "demo.pkl"))
    assert report["input_kind"] == "lincls"
    assert report["provenance"]["top1"] == res["top1"] and report["provenance"]["name"] == "demo"

    # --eval-only --resume: the last checkpoint of OUTPUT_DIR, through images instead of cached
    # features, gives the same accuracy
    proc = _cli(
        "--config-file", "configs/lincls/shapes_cpu.yaml", "--eval-only", "--resume",
        "DATASETS.ROOT", shapes, "INPUT.SIZE", str(SIZE), "OUTPUT_DIR", str(out),
        "TEST.IMS_PER_BATCH", "50", "DATALOADER.NUM_WORKERS", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert again["eval_only"] is True and again["weights"] == str(out / "model_final.pth")
    assert again["top1"] == pytest.approx(res["top1"]) and again["top5"] == res["top5"]
    assert again["name"] == "demo" and again["input_kind"] == "lincls"
    # the same backbone, the same eval-transform features: the same kNN; the seed is the one
    # that trained the fc (from the checkpoint's meta)
    assert again["knn_top1"] == pytest.approx(res["knn_top1"]) and again["seed"] == 0
    assert (again["knn_k"], again["knn_t"], again["val_images"]) == (20, 0.1, 50)
    # and the same views of the same images: the same retrieval
    assert again["instance_retrieval_top1"] == res["instance_retrieval_top1"]
    assert again["retrieval_images"] == 50


def test_eval_only_reproduces_a_supervised_head_and_needs_one(shapes, oracle, tmp_path):
    # a torchvision ResNet with a head for these 5 classes is evaluated as is: its accuracy is
    # what the fixture measured with its own forward pass
    res = evaluate_weights(_cfg(shapes, tmp_path / "e", ""), oracle[0])
    assert res["top1"] == pytest.approx(oracle[1]) and res["input_kind"] == "torchvision"
    assert res["knn_top1"] > 50.0 and res["seed"] is None  # no linear eval trained this head
    # a split with other classes (here: 2 folders, train/ and val/) needs another head
    other = _cfg(shapes, tmp_path / "e", "", **{"DATASETS.VAL_SPLIT": "."})
    with pytest.raises(UserError, match=r"has an fc of shape \(5, 512\), but --eval-only needs"):
        evaluate_weights(other, oracle[0])
    sd = {k: v for k, v in torch.load(oracle[0]).items() if not k.startswith("fc.")}
    torch.save(sd, tmp_path / "headless.pth")
    with pytest.raises(UserError, match="has no linear classifier"):
        evaluate_weights(_cfg(shapes, tmp_path / "e", ""), str(tmp_path / "headless.pth"))


def test_cli_bad_weights_exit_with_one_sentence(tmp_path):
    (tmp_path / "w.pth").write_text("not a checkpoint")
    proc = _cli(
        "--config-file", "configs/lincls/shapes_cpu.yaml", "MODEL.WEIGHTS", str(tmp_path / "w.pth"),
        "DATASETS.ROOT", str(tmp_path), "DATASETS.TRAIN_SPLIT", "", "DATASETS.VAL_SPLIT", "",
        "OUTPUT_DIR", str(tmp_path / "out"),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: {tmp_path / 'w.pth'}: ")
    assert "PyTorch checkpoint" in errors[0]


@pytest.mark.slow
def test_cli_two_processes_match_one(shapes, oracle, tmp_path):
    """DDP over the fc (2 gloo processes, 5 + 5 images per step) trains the same fc as one
    process with 10 images per step: same samples per step, gradients averaged."""
    common = [
        "--config-file", "configs/lincls/shapes_cpu.yaml", "--cached-features",
        "MODEL.WEIGHTS", oracle[0], "DATASETS.ROOT", shapes, "INPUT.SIZE", str(SIZE),
        "SOLVER.IMS_PER_BATCH", "10", "SOLVER.MAX_ITER", "20", "TEST.IMS_PER_BATCH", "50",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.BASE_LR", "0.03", "MODEL.DEVICE", "cpu",
    ]  # fmt: skip
    one = _cli(*common, "OUTPUT_DIR", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli("--num-gpus", "2", "--dist-url", "auto", *common, "OUTPUT_DIR", str(tmp_path / "2"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _state(tmp_path / "one"), _state(tmp_path / "2")
    assert len(b["rng"]["per_rank"]) == 2
    for k in ("fc.weight", "fc.bias"):
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    fc_init = torch.randn(5, 512, generator=torch.Generator().manual_seed(0)) * 0.01  # SEED 0
    assert (a["model"]["fc.weight"] - fc_init).abs().max() > 1e-3  # it did train
    assert "World size: 2" in (tmp_path / "2" / "log.txt").read_text()
    # the kNN splits the val rows between the ranks and sums the counts: the same top-1
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "2"))
    assert r2["knn_top1"] == pytest.approx(r1["knn_top1"]) and r1["knn_top1"] > 50.0
    assert r1["val_images"] == r2["val_images"] == 50


# --------------------------------------------------------------------------------------------
# the head BatchNorm (MODEL.HEAD_BN): a calm log, the folded export, resume


def _demo_cfg(root, out, weights, *extra):
    """configs/lincls/shapes_cpu.yaml, the demo's probe (head BatchNorm, lr 0.1 x N / 256), sized
    for these tests: 100 train images, 10 per step (10 iterations per epoch), 30 epochs."""
    return load_lincls_cfg(
        os.path.join(ROOT, "configs", "lincls", "shapes_cpu.yaml"),
        [
            "MODEL.WEIGHTS", weights, "DATASETS.ROOT", root, "INPUT.SIZE", str(SIZE),
            "SOLVER.IMS_PER_BATCH", "10", "SOLVER.EPOCHS", "30",
            "SOLVER.LR_DROP_EPOCHS", "[18, 24]", "SOLVER.CHECKPOINT_PERIOD_EPOCHS", "30.0",
            "TEST.IMS_PER_BATCH", "50",
            "TEST.RETRIEVAL_SIZE", "0", "DATALOADER.NUM_WORKERS", "0", "LOG_PERIOD", "1",
            "OUTPUT_DIR", str(out), *extra,
        ],
    )  # fmt: skip


def _logged_losses(out, start):
    """The total_loss values metrics.json holds (what the progress line shows: detectron2's
    median of the last 20 steps) from iteration ``start`` on."""
    lines = (out / "metrics.json").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    return [m["total_loss"] for m in metrics if "total_loss" in m and m["iteration"] >= start]


def test_feature_batchnorm_is_batchnorm1d_and_folds_into_one_linear():
    torch.manual_seed(0)
    head = BatchNormLinear(512, 5)
    reference = torch.nn.BatchNorm1d(512, eps=1e-6, affine=False)
    x = torch.randn(200, 512) * 3 + 2
    for i in range(0, 200, 20):  # training: batch statistics, running ones updated as torch does
        assert torch.equal(head.bn(x[i : i + 20]), reference(x[i : i + 20]))
    assert torch.equal(head.bn.running_var, reference.running_var)
    assert [n for n, _ in head.named_parameters()] == ["weight", "bias"]  # BN: no parameters
    head.eval()
    folded = head.folded()
    assert type(folded) is torch.nn.Linear and not folded.training
    torch.testing.assert_close(folded(x), head(x), rtol=1e-5, atol=1e-5)
    assert (folded(x) - head(x)).abs().max() < 1e-5


def test_head_bn_probe_logs_a_bounded_loss(shapes, oracle, tmp_path):
    """The demo's probe logs losses below 10 after its first epoch where MoCo's lr 30 on the raw
    features (the demo's probe before MODEL.HEAD_BN) logs hundreds, and probes as well."""
    calm = run_linear_eval(_demo_cfg(shapes, tmp_path / "bn", oracle[0]), cached=True)
    raw_cfg = _demo_cfg(
        shapes, tmp_path / "raw", oracle[0],
        "MODEL.HEAD_BN", "False", "SOLVER.BASE_LR", "30.0", "SOLVER.REFERENCE_BATCH", "0",
    )  # fmt: skip
    raw = run_linear_eval(raw_cfg, cached=True, features=calm["features"])
    after_epoch_1 = _logged_losses(tmp_path / "bn", 10)
    assert len(after_epoch_1) == 290
    assert max(after_epoch_1) < 10.0, max(after_epoch_1)
    assert max(_logged_losses(tmp_path / "raw", 10)) > 100.0
    majority = _majority_percent(shapes)
    assert calm["top1"] > majority + 30 and calm["top1"] >= raw["top1"] - 4.0, (calm, raw)
    assert (calm["head_bn"], raw["head_bn"]) == (True, False)
    assert calm["lr"] == pytest.approx(0.1 * 10 / 256) and raw["lr"] == 30.0


def test_head_bn_export_is_folded_and_gives_the_unfolded_outputs(shapes, oracle, tmp_path):
    """model_final.pth holds the BatchNorm folded into a plain fc; the periodic checkpoint of
    the same iteration holds it unfolded; both give the same logits, and --eval-only reads
    either as the same fc."""
    out = tmp_path / "fold"
    res = run_linear_eval(_demo_cfg(shapes, out, oracle[0]), cached=True)
    final = load_checkpoint(str(out / "model_final.pth"))
    periodic = load_checkpoint(str(out / "model_0000299.pth"))  # the same, last iteration
    assert set(final["model"]) == set(torchvision.models.resnet18(num_classes=5).state_dict())
    head_keys = {k for k in periodic["model"] if k.startswith("fc.")}
    assert head_keys == {"fc.weight", "fc.bias", "fc.bn.running_mean", "fc.bn.running_var",
                         "fc.bn.num_batches_tracked"}  # fmt: skip
    assert int(periodic["model"]["fc.bn.num_batches_tracked"]) == 300
    unfolded = BatchNormLinear(512, 5)
    unfolded.load_state_dict({k[3:]: v for k, v in periodic["model"].items() if k in head_keys})
    unfolded.eval()
    plain = torch.nn.Linear(512, 5)
    plain.load_state_dict({k[3:]: final["model"][k] for k in ("fc.weight", "fc.bias")})
    val = res["features"].val
    with torch.no_grad():
        a, b = unfolded(val), plain(val)
    assert (a - b).abs().max() < 1e-4 * a.abs().max()
    labels = res["features"].val_labels
    top1 = [100.0 * (x.argmax(1) == labels).float().mean().item() for x in (a, b)]
    assert top1 == [pytest.approx(res["top1"])] * 2
    assert final["meta"]["head_bn_folded"] is True and periodic["meta"]["head_bn_folded"] is False
    # --eval-only's reader folds an unfolded checkpoint itself: the same fc as model_final's
    fc = load_pretrained(str(out / "model_0000299.pth"), "resnet18").fc
    torch.testing.assert_close(fc["fc.weight"], final["model"]["fc.weight"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fc["fc.bias"], final["model"]["fc.bias"], rtol=1e-6, atol=1e-7)


def test_head_bn_resume_is_exact_and_mismatched_heads_are_refused(shapes, oracle, tmp_path):
    """A run killed after iteration 3 of 6 (its periodic checkpoint holds the BatchNorm's running
    statistics) resumes to the uninterrupted run's bits; a finished run resumes to its folded fc
    and is only evaluated; a head unlike MODEL.HEAD_BN is one sentence."""
    over = ["SOLVER.LR_DROP_EPOCHS", "[0.4]", "SOLVER.CHECKPOINT_PERIOD_EPOCHS", "0.3"]
    cfg = _demo_cfg(shapes, tmp_path / "straight", oracle[0], *over, "SOLVER.MAX_ITER", "6")
    straight = run_linear_eval(cfg, cached=True)
    shutil.copytree(tmp_path / "straight", tmp_path / "killed")
    for name in ("model_final.pth", "model_0000005.pth"):  # killed before iteration 6 was saved
        (tmp_path / "killed" / name).unlink()
    (tmp_path / "killed" / "last_checkpoint").write_text("model_0000002.pth")
    killed = _demo_cfg(
        shapes, tmp_path / "killed", oracle[0], *over, "SOLVER.MAX_ITER", "6",
        "CACHED_FEATURES", "True",
    )  # fmt: skip
    evaluator = LinearEvaluator(killed).resume_or_load(resume=True)
    assert evaluator.start_iter == 3 and isinstance(evaluator.net.fc, BatchNormLinear)
    resumed = evaluator.train()
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "killed")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert resumed["top1"] == straight["top1"] and resumed["head_bn"] is True
    # a finished run resumes to its folded fc and evaluates it as it is
    again = run_linear_eval(cfg, cached=True, resume=True)
    assert again["top1"] == straight["top1"] and again["head_bn"] is True
    assert torch.equal(_state(tmp_path / "straight")["model"]["fc.weight"], a["model"]["fc.weight"])
    longer = _demo_cfg(shapes, tmp_path / "straight", oracle[0], *over, "SOLVER.MAX_ITER", "9")
    with pytest.raises(UserError, match="folded in after 6 iterations .* use a fresh OUTPUT_DIR"):
        run_linear_eval(longer, cached=True, resume=True)

    # a run without the head BatchNorm, resumed with it, and the other way round
    plain = _cfg(shapes, tmp_path / "plain", oracle[0], **{"SOLVER.MAX_ITER": 3})
    run_linear_eval(plain, cached=True)
    with_bn = _demo_cfg(shapes, tmp_path / "plain", oracle[0], "SOLVER.MAX_ITER", "6")
    with pytest.raises(UserError, match="trained without the head BatchNorm, but MODEL.HEAD_BN is"):
        run_linear_eval(with_bn, cached=True, resume=True)
    cfg.defrost()
    cfg.MODEL.HEAD_BN = False
    with pytest.raises(UserError, match="trained with the head BatchNorm, but MODEL.HEAD_BN is F"):
        run_linear_eval(cfg, cached=True, resume=True)
    # a checkpoint from before the key (no head_bn in its meta): said so
    final = load_checkpoint(str(tmp_path / "plain" / "model_final.pth"))
    del final["meta"]["head_bn"]
    torch.save(final, tmp_path / "plain" / "model_final.pth")
    with pytest.raises(UserError, match=r"without the head BatchNorm \(a run from before") as info:
        run_linear_eval(with_bn, cached=True, resume=True)
    assert "\n" not in str(info.value)
