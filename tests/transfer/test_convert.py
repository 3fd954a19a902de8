"""tools/convert.py, transfer.convert and transfer.verify: recognition, renaming, refusals,
detectron2 equivalence."""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

from pretrain.checkpoints import ResNetArch, infer_resnet_arch
from pretrain.io import UserError, load_weights_pickle
from transfer.convert import convert, read_provenance, torchvision_to_detectron2
from transfer.verify import load_into_detectron2, verify_conversion

torch.set_num_threads(2)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _random_resnet(arch: str, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict with non-trivial BN statistics and affine parameters."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(**kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
    return model.state_dict()


def _mlp_head(prefix: str) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}fc.0.weight": torch.randn(32, 16),
        f"{prefix}fc.0.bias": torch.randn(32),
        f"{prefix}fc.2.weight": torch.randn(8, 32),
        f"{prefix}fc.2.bias": torch.randn(8),
    }


def _ours(sd: dict[str, torch.Tensor], arch: str, name: str = "simo_test") -> dict:
    """docs/formats.md pretraining checkpoint: encoder_q (+ MLP head), encoder_k, queue, meta."""
    backbone = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    model = {f"encoder_q.{k}": v for k, v in backbone.items()}
    model.update(_mlp_head("encoder_q."))
    model.update({f"encoder_k.{k}": v.clone() + 1 for k, v in backbone.items()})
    model.update(_mlp_head("encoder_k."))
    model["queue"] = torch.randn(8, 16)
    meta = {
        "kind": "pretrain",
        "name": name,
        "method": "simo",
        "arch": arch,
        "loss": "eqco",
        "tau": 0.2,
        "alpha": 256.0,
        "num_negatives": 16,
        "epochs": 3.0,
        "iteration": 30,
        "ims_per_batch": 32,
    }
    return {"model": model, "optimizer": {"state": {}}, "iteration": 30, "meta": meta}


def _d2_weights(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        return pickle.load(f)["model"]


def _assert_same_values(sd: dict[str, torch.Tensor], renamed: list, weights: dict) -> None:
    for old, new, _ in renamed:
        np.testing.assert_array_equal(weights[new], sd[old].numpy(), err_msg=f"{old} -> {new}")


@pytest.fixture(scope="module")
def r18() -> dict[str, torch.Tensor]:
    return _random_resnet("resnet18")


@pytest.fixture(scope="module")
def r50() -> dict[str, torch.Tensor]:
    return _random_resnet("resnet50", seed=3)


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory, r18) -> str:
    path = str(tmp_path_factory.mktemp("r18") / "resnet18_tv.pth")
    torch.save(r18, path)
    return path


# ---------------------------------------------------------------------------------- round trips


def test_round_trip_resnet50_ours(tmp_path, r50):
    sd = r50
    src, out = str(tmp_path / "ckpt.pth"), str(tmp_path / "r50.pkl")
    torch.save(_ours(sd, "resnet50"), src)

    report = convert(src, out, verify=True)

    assert report["input_kind"] == "pretrain"
    assert report["arch"] == ResNetArch(50, 1, 64, 64, 256)
    assert report["verify"]["max_abs_diff"] <= 1e-4
    assert set(report["verify"]["stages"]) == {"stem", "res2", "res3", "res4", "res5"}
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert data["__author__"] == "eqco-transfer" and data["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in data["model"].values())
    # 53 convs + 53 BNs x 5 tensors
    assert len(data["model"]) == len(report["renamed"]) == 53 + 53 * 5
    assert data["model"]["res4.5.conv3.norm.running_var"].shape == (1024,)
    _assert_same_values(sd, report["renamed"], data["model"])
    # every backbone parameter/buffer of detectron2's ResNet-50 was loaded, nothing left over
    _, check, _ = load_into_detectron2(out, report["arch"], norm="BN")
    assert (check.missing, check.not_loaded, check.unexpected) == ([], [], [])
    # provenance (docs/formats.md)
    prov = data["provenance"]
    assert prov["name"] == "simo_test" and prov["method"] == "simo" and prov["loss"] == "eqco"
    assert (prov["alpha"], prov["num_negatives"], prov["epochs"], prov["top1"]) == (
        256.0,
        16,
        3.0,
        None,
    )
    assert prov["source"] == os.path.abspath(src)
    assert prov["sha256"] == hashlib.sha256(open(src, "rb").read()).hexdigest()
    assert read_provenance(out) == prov
    # what was thrown away: head, key encoder, queue, training state
    dropped = " ".join(keys for keys, _ in report["dropped"])
    assert "encoder_k.*" in dropped and "queue" in dropped and "optimizer" in dropped
    assert report["rule_counts"]["conv1 -> stem.conv1"] == 1
    assert report["rule_counts"]["downsample.1 -> shortcut.norm"] == 4 * 5


def test_round_trip_resnet18_frozenbn_and_fpn(tmp_path, r18):
    src, out = str(tmp_path / "ckpt.pth"), str(tmp_path / "r18.pkl")
    torch.save(_ours(r18, "resnet18"), src)
    report = convert(src, out, verify=True, norm="FrozenBN")
    assert report["arch"] == ResNetArch(18, 1, 64, 64, 64)
    assert report["verify"]["max_abs_diff"] <= 1e-4

    weights = _d2_weights(out)
    # train_det reads MODEL.WEIGHTS with pretrain.io's code-free unpickler: it must accept ours
    assert load_weights_pickle(out)["provenance"]["name"] == "simo_test"
    assert weights["res3.0.shortcut.norm.running_mean"].shape == (128,)
    assert "res2.1.conv3.weight" not in weights  # basic blocks: two convs
    _assert_same_values(r18, report["renamed"], weights)
    # FrozenBN keeps no batch counter; that is the only thing it may leave unused
    _, check, _ = load_into_detectron2(out, report["arch"], norm="FrozenBN")
    assert check.missing == [] and check.not_loaded == []
    assert check.unexpected and all(k.endswith("num_batches_tracked") for k in check.unexpected)
    # inside a ResNet-FPN (as MODEL.WEIGHTS is used by train_det), every bottom_up tensor is loaded
    _, check, _ = load_into_detectron2(out, report["arch"], norm="SyncBN", fpn=True)
    assert (check.missing, check.not_loaded, check.unexpected) == ([], [], [])


def test_resnext_and_wide_resnet_shapes():
    with torch.device("meta"):
        wide = torchvision.models.wide_resnet50_2().state_dict()
        resnext = torchvision.models.resnext50_32x4d().state_dict()
    assert infer_resnet_arch(wide) == ResNetArch(50, 1, 128, 64, 256)
    assert infer_resnet_arch(resnext) == ResNetArch(50, 32, 4, 64, 256)


@pytest.mark.slow
def test_resnext_round_trip(tmp_path):
    # detectron2 needs NUM_GROUPS 32, WIDTH_PER_GROUP 4: the numerical check proves the mapping
    sd = _random_resnet("resnext50_32x4d", seed=7)
    src = str(tmp_path / "x.pth")
    torch.save(sd, src)
    report = convert(src, str(tmp_path / "x.pkl"), verify=True)
    assert report["arch"] == ResNetArch(50, 32, 4, 64, 256)
    assert report["verify"]["max_abs_diff"] <= 1e-4


def test_renaming_rules():
    with torch.device("meta"):
        sd = torchvision.models.resnet50().state_dict()
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in sd.items()}
    weights, renamed, dropped = torchvision_to_detectron2(sd)
    mapping = {old: new for old, new, _ in renamed}
    assert mapping["conv1.weight"] == "stem.conv1.weight"
    assert mapping["bn1.running_var"] == "stem.conv1.norm.running_var"
    assert mapping["layer1.0.downsample.0.weight"] == "res2.0.shortcut.weight"
    assert mapping["layer1.0.downsample.1.bias"] == "res2.0.shortcut.norm.bias"
    assert mapping["layer4.2.bn3.weight"] == "res5.2.conv3.norm.weight"
    assert mapping["layer3.5.conv2.weight"] == "res4.5.conv2.weight"
    assert dropped == ["fc.bias", "fc.weight"]
    assert len(weights) == len(sd) - 2


# ---------------------------------------------------------------------------------- input kinds


def test_moco_official_format(tmp_path, r18):
    backbone = {k: v for k, v in r18.items() if not k.startswith("fc.")}
    state = {f"module.encoder_q.{k}": v for k, v in backbone.items()}
    state.update(_mlp_head("module.encoder_q."))
    state.update({f"module.encoder_k.{k}": v for k, v in backbone.items()})
    state["module.queue"] = torch.randn(8, 4096)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    src, out = str(tmp_path / "checkpoint_0199.pth.tar"), str(tmp_path / "moco.pkl")
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": {}}, src)

    report = convert(src, out, verify=True)
    assert report["input_kind"] == "moco"
    prov = report["provenance"]
    assert prov["method"] == "mocov2"  # MLP head
    assert (prov["num_negatives"], prov["epochs"], prov["name"]) == (4096, 200, "checkpoint_0199")
    assert prov["alpha"] is None and prov["tau"] is None  # not in the file: not invented
    _assert_same_values(r18, report["renamed"], _d2_weights(out))


@pytest.mark.parametrize("prefix", ["", "module."])
def test_torchvision_format(tmp_path, r18, prefix):
    src, out = str(tmp_path / "tv.pth"), str(tmp_path / "tv.pkl")
    torch.save({prefix + k: v for k, v in r18.items()}, src)
    report = convert(src, out, name="supervised IN")
    assert report["input_kind"] == "torchvision"
    assert report["dropped"] == [("fc.* (2)", "classifier")]
    assert report["provenance"]["name"] == "supervised IN"
    assert report["provenance"]["method"] is None
    assert "verify" not in report
    _assert_same_values(r18, report["renamed"], _d2_weights(out))


def test_lincls_checkpoint_and_top1(tmp_path, r18):
    sd = dict(r18)
    sd["fc.weight"], sd["fc.bias"] = torch.randn(5, 512), torch.randn(5)  # a 5-class linear head
    pretrain_meta = {"kind": "pretrain", "name": "simo_test", "method": "simo", "alpha": 256.0}
    src = str(tmp_path / "lincls.pth")
    torch.save(
        {"model": sd, "meta": {"kind": "lincls", "top1": 61.25, "pretrain": pretrain_meta}}, src
    )

    report = convert(src, str(tmp_path / "a.pkl"), verify=True)
    assert report["input_kind"] == "lincls"
    prov = report["provenance"]
    assert (prov["name"], prov["method"], prov["alpha"], prov["top1"]) == (
        "simo_test",
        "simo",
        256.0,
        61.25,
    )

    lincls_dir = tmp_path / "lincls_out"
    lincls_dir.mkdir()
    (lincls_dir / "results.json").write_text(
        json.dumps({"kind": "lincls", "name": "simo_test", "top1": 63.5, "top5": 90.0})
    )
    report = convert(src, str(tmp_path / "b.pkl"), lincls_dir=str(lincls_dir))
    assert report["provenance"]["top1"] == 63.5
    assert read_provenance(str(tmp_path / "b.pkl"))["top1"] == 63.5
    assert convert(src, str(tmp_path / "c.pkl"), top1=70.0)["provenance"]["top1"] == 70.0

    (lincls_dir / "results.json").write_text(
        json.dumps({"kind": "lincls", "name": "other", "top1": 1})
    )
    with pytest.raises(UserError, match="linear eval of 'other'"):
        convert(src, str(tmp_path / "d.pkl"), lincls_dir=str(lincls_dir))
    with pytest.raises(UserError, match="percentage"):
        convert(src, str(tmp_path / "e.pkl"), top1=681.0)
    assert not (tmp_path / "d.pkl").exists() and not (tmp_path / "e.pkl").exists()


def test_output_dir_input_uses_last_checkpoint(tmp_path, r18):
    run = tmp_path / "run"
    run.mkdir()
    torch.save(_ours(r18, "resnet18", name="run"), run / "model_0000010.pth")
    (run / "last_checkpoint").write_text("model_0000010.pth")
    report = convert(str(run), str(tmp_path / "w.pkl"))
    assert report["input"] == str(run / "model_0000010.pth")
    assert report["provenance"]["name"] == "run"


# ---------------------------------------------------------------------------------- refusals


def _refused(tmp_path, obj, match: str) -> None:
    src, out = str(tmp_path / "bad.pth"), tmp_path / "bad.pkl"
    torch.save(obj, src)
    with pytest.raises(UserError, match=match):
        convert(src, str(out))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp_")] == []


def test_missing_tensor_refused(tmp_path, r18):
    sd = {k: v for k, v in r18.items() if k != "layer2.0.bn1.running_var"}
    _refused(tmp_path, _ours(sd, "resnet18"), r"1 backbone tensor\(s\) of a ResNet-18 are missing")


def test_missing_layer_refused(tmp_path, r18):
    sd = {k: v for k, v in r18.items() if not k.startswith("layer3.1.")}
    _refused(tmp_path, _ours(sd, "resnet18"), r"\(2, 2, 1, 2\) basic blocks .* no ResNet depth")
    sd = {k: v for k, v in r18.items() if not k.startswith("layer1.")}
    _refused(tmp_path, sd, "layer1.0.conv1.weight is missing")


def test_wrong_shape_refused(tmp_path, r18):
    sd = dict(r18)
    sd["layer3.0.conv2.weight"] = torch.randn(256, 256, 1, 1)
    _refused(tmp_path, sd, r"wrong shape, e.g. layer3.0.conv2.weight \(256, 256, 1, 1\)")


def test_unplaceable_tensor_refused(tmp_path, r18):
    sd = dict(r18)
    sd["layer2.1.se.fc1.weight"] = torch.randn(8, 128)
    _refused(tmp_path, _ours(sd, "resnet18"), r"cannot be placed .* layer2.1.se.fc1.weight")


def test_not_a_resnet_refused(tmp_path):
    _refused(tmp_path, {"model": {"blocks.0.weight": torch.zeros(3)}}, "no ResNet backbone")
    _refused(tmp_path, [1, 2, 3], "holds a list, not a checkpoint dict")


def test_text_file_refused(tmp_path):
    src = tmp_path / "notes.txt"
    src.write_text("this is not a checkpoint\n")
    with pytest.raises(UserError, match="not a PyTorch checkpoint"):
        convert(str(src), str(tmp_path / "out.pkl"))
    with pytest.raises(UserError, match="no such file"):
        convert(str(tmp_path / "nope.pth"), str(tmp_path / "out.pkl"))


def test_pickled_custom_class_needs_unsafe(tmp_path, r18):
    src = str(tmp_path / "args.pth")
    torch.save({"state_dict": dict(r18), "args": argparse.Namespace(lr=0.03)}, src)
    with pytest.raises(UserError, match="--unsafe"):
        convert(src, str(tmp_path / "out.pkl"))
    report = convert(src, str(tmp_path / "out.pkl"), unsafe=True)
    assert report["input_kind"] == "torchvision"


def test_existing_output_needs_force(tmp_path, r18_file):
    out = tmp_path / "out.pkl"
    out.write_bytes(b"precious")
    with pytest.raises(UserError, match="already exists; pass --force"):
        convert(r18_file, str(out))
    assert out.read_bytes() == b"precious"
    convert(r18_file, str(out), force=True)
    assert len(_d2_weights(str(out))) == 120
    with pytest.raises(UserError, match="must end in .pkl"):
        convert(r18_file, str(tmp_path / "out.pth"))


# ---------------------------------------------------------------------------------- verification


def test_verify_detects_a_wrong_tensor(tmp_path, r18, r18_file):
    out = str(tmp_path / "w.pkl")
    convert(r18_file, out)
    assert verify_conversion(out, r18, depth=18) <= 1e-4
    with pytest.raises(UserError, match="ResNet-18, not a ResNet-50"):
        verify_conversion(out, r18, depth=50)
    with open(out, "rb") as f:
        data = pickle.load(f)
    data["model"]["res4.1.conv1.norm.running_mean"] += 1.0
    with open(out, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(UserError, match=r"differs from torchvision's by .*res4"):
        verify_conversion(out, r18, depth=18)


R18_OPTS = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]


def test_verify_under_the_shipped_detection_config(tmp_path, r18_file):
    config = os.path.join(REPO, "configs", "shapes_fpn_cpu.yaml")
    report = convert(
        r18_file, str(tmp_path / "a.pkl"), verify=True, config_file=config, config_opts=R18_OPTS
    )
    assert report["verify"]["norm"] == "SyncBN" and report["verify"]["max_abs_diff"] <= 1e-4
    # the shipped config is a ResNet-50: verifying R18 weights under it says what to override
    with pytest.raises(UserError, match="DEPTH is 50 but the weights are a ResNet-18; train"):
        convert(r18_file, str(tmp_path / "b.pkl"), verify=True, config_file=config)
    with pytest.raises(UserError, match="used only by --verify"):
        convert(r18_file, str(tmp_path / "c.pkl"), config_file=config)


def test_verify_rejects_mismatched_detection_config(tmp_path, r50, r18_file):
    stride = tmp_path / "stride.yaml"
    rgb = "INPUT:\n  FORMAT: RGB\nMODEL:\n  PIXEL_MEAN: [123.675, 116.28, 103.53]\n"
    rgb += "  PIXEL_STD: [58.395, 57.12, 57.375]\n"
    stride.write_text(rgb + "  RESNETS:\n    DEPTH: 50\n    STRIDE_IN_1X1: True\n")
    src = str(tmp_path / "r50.pth")
    torch.save(r50, src)
    with pytest.raises(UserError, match="differs from torchvision's.*STRIDE_IN_1X1"):
        convert(src, str(tmp_path / "a.pkl"), verify=True, config_file=str(stride))
    assert not (tmp_path / "a.pkl").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp_")] == []

    # detectron2's defaults (BGR, caffe statistics) are wrong for torchvision-style weights
    with pytest.raises(UserError, match="INPUT.FORMAT is BGR"):
        convert(r18_file, str(tmp_path / "b.pkl"), verify=True, config_opts=R18_OPTS)
    caffe = tmp_path / "caffe.yaml"
    caffe.write_text(
        "INPUT:\n  FORMAT: RGB\n"
        "MODEL:\n  PIXEL_MEAN: [103.53, 116.28, 123.675]\n  PIXEL_STD: [1.0, 1.0, 1.0]\n"
    )
    with pytest.raises(UserError, match="MODEL.PIXEL_MEAN is"):
        convert(
            r18_file,
            str(tmp_path / "c.pkl"),
            verify=True,
            config_file=str(caffe),
            config_opts=R18_OPTS,
        )


def test_read_provenance_executes_no_code(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {}, "x": collections.Counter("ab")}))
    with pytest.raises(UserError, match="not a plain weights pickle"):
        read_provenance(str(path))


# ---------------------------------------------------------------------------------- CLI


def _cli_main():
    spec = importlib.util.spec_from_file_location(
        "convert_cli", os.path.join(REPO, "tools/convert.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_prints_what_it_did(tmp_path, r18, capsys):
    src = str(tmp_path / "ckpt.pth")
    torch.save(_ours(r18, "resnet18"), src)
    _cli_main()([src, str(tmp_path / "w.pkl"), "--verify", "--top1", "12.5"])
    out = capsys.readouterr().out
    assert "recognised: our pretraining checkpoint" in out
    assert "bnX -> convX.norm" in out and "encoder_k.* (124): momentum key encoder" in out
    assert "encoder_q.fc.* (4): projection head of the query encoder" in out
    assert "top1=12.5" in out and "method=simo" in out
    assert "verify: max abs diff" in out and ": OK" in out
    assert "MODEL.RESNETS.STRIDE_IN_1X1 False" in out

    with pytest.raises(SystemExit) as exc:
        _cli_main()([src, str(tmp_path / "w.pkl")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists; pass --force" in err


def test_cli_one_sentence_no_traceback(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools/convert.py"), str(bad), str(tmp_path / "o.pkl")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle); "
        "pass the .pth/.pth.tar written by pretraining, MoCo or torchvision."
    ]


# ---------------------------------------------------------------------------------- C4 and FPN

# a ResNet-50 with 16-wide bottlenecks (torchvision's width_per_group; the stage widths stay
# ResNet-50's): MoCo's C4 and FPN benchmark configs verify it with this one override
NARROW_R50_OPTS = ["MODEL.RESNETS.WIDTH_PER_GROUP", "16"]


@pytest.fixture(scope="module")
def r50_narrow_file(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    sd = _random_resnet("resnet50", seed=5, width_per_group=16)
    path = str(tmp_path_factory.mktemp("r50n") / "r50_narrow.pth")
    torch.save(sd, path)
    return path, sd


def test_one_pickle_serves_c4_and_fpn(tmp_path, r50_narrow_file, capsys):
    """tools/convert.py --verify under the VOC R50-C4 config: res2..res4 land in backbone.*, res5
    in roi_heads.res5.* (the box head), all equal to torchvision's outputs; the same file fills
    an FPN model's backbone.bottom_up.*."""
    import re

    from transfer.verify import DetectionConfig

    src, _ = r50_narrow_file
    out = str(tmp_path / "w.pkl")
    c4 = os.path.join(REPO, "configs", "voc_R_50_C4_24k_simo.yaml")
    _cli_main()([src, out, "--verify", "--config-file", c4, *NARROW_R50_OPTS])
    printed = capsys.readouterr().out
    assert re.search(r"settings of \S+voc_R_50_C4_24k_simo.yaml with \S+ 16; stem \S+, res2 \S+, "
                     r"res3 \S+, res4 \S+, res5 \d\.\d\de[-+]\d\d\): OK", printed)
    # 53 convs + 53 BNs x 5 tensors; res5 = 3 blocks of 3 convs + 1 shortcut = 10 convs
    assert "backbone 258 tensors, roi_heads.res5 60 tensors" in printed
    assert len(_d2_weights(out)) == 318 == 258 + 60

    arch = ResNetArch(50, 1, 16, 64, 256)
    config = DetectionConfig(c4, tuple(NARROW_R50_OPTS))
    _, check, cfg = load_into_detectron2(out, arch, config=config)
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
    assert cfg.MODEL.RESNETS.NORM == "SyncBN"
    assert (check.missing, check.not_loaded, check.unexpected) == ([], [], [])
    assert check.placed == {"backbone": 258, "roi_heads.res5": 60}
    for name in ("coco_mask_R_50_FPN_1x_simo.yaml", "fpn_simo_1x.yaml"):
        fpn = DetectionConfig(os.path.join(REPO, "configs", name), tuple(NARROW_R50_OPTS))
        _, check, _ = load_into_detectron2(out, arch, config=fpn)
        assert (check.missing, check.not_loaded, check.unexpected) == ([], [], [])
        assert check.placed == {"backbone.bottom_up": 318}


def _r18_state(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def test_c4_verify_fails_when_a_weight_is_perturbed(tmp_path, r50_narrow_file, r18_file):
    from transfer.verify import DetectionConfig, backbone_output_diffs

    src, sd = r50_narrow_file
    out = str(tmp_path / "w.pkl")
    convert(src, out)
    c4 = DetectionConfig(
        os.path.join(REPO, "configs", "coco_mask_R_50_C4_2x_simo.yaml"), tuple(NARROW_R50_OPTS)
    )
    assert verify_conversion(out, sd, config=c4) <= 1e-4
    with open(out, "rb") as f:
        data = pickle.load(f)
    # a res5 tensor: it lives in the box head (roi_heads.res5) of a C4 model, and is checked there
    data["model"]["res5.1.conv2.weight"] *= 1.01
    with open(out, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(UserError, match=r"differs from torchvision's by .*res5"):
        verify_conversion(out, sd, config=c4)
    diffs, check = backbone_output_diffs(out, sd, config=c4)
    assert max(diffs[k] for k in ("stem", "res2", "res3", "res4")) <= 1e-4 < diffs["res5"]
    assert check.placed == {"backbone": 258, "roi_heads.res5": 60} and check.not_loaded == []
    # ResNet-18 weights fill the C4 head too: Res5ROIHeadsExtraNorm builds it of basic blocks
    r18_c4 = DetectionConfig(c4.file, tuple(R18_OPTS))
    r18_out = str(tmp_path / "r18.pkl")
    convert(r18_file, r18_out, verify=True, config_file=r18_c4.file, config_opts=list(r18_c4.opts))
    diffs, check = backbone_output_diffs(r18_out, _r18_state(r18_file), config=r18_c4)
    assert max(diffs.values()) <= 1e-4 and set(diffs) >= {"res4", "res5"}
    # 20 convs + 20 BNs x 5 tensors = 120; res5 = 2 basic blocks (2 convs) + 1 shortcut = 5 convs
    assert check.placed == {"backbone": 90, "roi_heads.res5": 30} and check.not_loaded == []
