"""detectron2 model zoo / Caffe2 (Detectron) weights, pycls .pyth files and
PATH?matching_heuristics=True load through SafeDetectionCheckpointer as through detectron2's own."""
import os
import pickle
import re

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_resnet_backbone

from pretrain.io import UserError
from transfer.config import load_config
from transfer.trainer import SafeDetectionCheckpointer, check_weights

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the model zoo R-50 row: MSRA weights, BGR / std 1 / stride in 1x1
CONFIG = os.path.join(ROOT, "configs", "fpn_supervised_1x.yaml")
BRANCH = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}


def caffe2_name(name):
    """detectron2 ResNet name -> Caffe2 blob name (the inverse of detectron2's
    convert_basic_c2_names); None for the BN statistics, which MSRA's frozen R-50 does not have."""
    *module, param = name.split(".")
    if param not in ("weight", "bias"):
        return None
    suffix = "w" if param == "weight" else "b"
    if module[-1] == "norm":
        module, suffix = module[:-1], "bn_s" if param == "weight" else "bn_b"
    if module == ["stem", "conv1"]:
        return ("conv1_" if suffix in ("w", "b") else "res_conv1_") + suffix
    stage, block, conv = module  # res2.0.conv1
    return f"{stage}_{block}_{BRANCH[conv]}_{suffix}"


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG, ["MODEL.DEVICE", "cpu"])


@pytest.fixture(scope="module")
def source(cfg):
    """A ResNet-50 as detectron2 builds it for this config, with random affine BN parameters and
    running statistics at (0, 1): a frozen-affine network like the MSRA R-50."""
    torch.manual_seed(0)
    net = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(".norm.weight"):
                p.copy_(torch.rand_like(p) + 0.5)
            elif name.endswith(".norm.bias"):
                p.copy_(torch.randn_like(p))
    return net


@pytest.fixture(scope="module")
def image():
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def features(backbone, image):
    with torch.no_grad():
        return backbone.eval()(image)


def assert_same_backbone(model, source, image):
    ours, theirs = features(model.backbone.bottom_up, image), features(source, image)
    assert set(ours) == {"res2", "res3", "res4", "res5"} == set(theirs)
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], atol=1e-5), k


def fresh_model(cfg):
    torch.manual_seed(123)
    return build_model(cfg)


def save_pickle(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # as Python 2 Detectron wrote them
    return str(path)


def caffe2_blobs(source):
    blobs = {}
    for name, value in source.state_dict().items():
        c2 = caffe2_name(name)
        if c2 is not None:
            blobs[c2] = value.numpy().astype(np.float32)
    assert {"conv1_w", "res_conv1_bn_s", "res_conv1_bn_b", "res2_0_branch1_w", "res2_0_branch2a_w",
            "res2_0_branch2a_bn_s", "res5_2_branch2c_bn_b"} <= set(blobs)  # fmt: skip
    # what else MSRA's R-50.pkl holds: a tiny conv1 bias, the classifier, optimizer momenta
    blobs["conv1_b"] = np.zeros(64, np.float32)
    blobs["fc1000_w"] = np.zeros((1000, 2048), np.float32)
    blobs["fc1000_b"] = np.zeros(1000, np.float32)
    for name in ("conv1_w", "res2_0_branch2a_w", "res5_2_branch2c_bn_s"):
        blobs[name + "_momentum"] = np.full_like(blobs[name], 7.0)
    return blobs


@pytest.mark.parametrize("wrap", [True, False], ids=["blobs", "plain"])
def test_caffe2_pickle_reads_as_detectron2_does(cfg, source, tmp_path, wrap):
    blobs = caffe2_blobs(source)
    path = save_pickle({"blobs": blobs} if wrap else blobs, tmp_path / "R-50.pkl")
    model = fresh_model(cfg)
    ours = SafeDetectionCheckpointer(model)._load_file(path)
    theirs = DetectionCheckpointer(model)._load_file(path)  # unrestricted pickle: our own file
    assert ours.keys() == theirs.keys() == {"model", "__author__", "matching_heuristics"}
    assert ours["__author__"] == "Caffe2" and ours["matching_heuristics"] is True
    assert ours["model"].keys() == theirs["model"].keys()
    assert not any(k.endswith("_momentum") for k in ours["model"])
    assert len(ours["model"]) == len(blobs) - 3
    for k, v in ours["model"].items():
        assert isinstance(v, np.ndarray) and np.array_equal(v, theirs["model"][k]), k


def test_caffe2_r50_loads_into_the_detector(cfg, source, image, tmp_path):
    path = save_pickle({"blobs": caffe2_blobs(source)}, tmp_path / "R-50.pkl")
    model = fresh_model(cfg)
    assert list(model.pixel_mean.flatten()) == pytest.approx([103.53, 116.28, 123.675])  # BGR
    assert list(model.pixel_std.flatten()) == [1.0, 1.0, 1.0]
    before = features(model.backbone.bottom_up, image)["res5"]
    assert not torch.allclose(before, features(source, image)["res5"])

    with_cfg = cfg.clone()
    with_cfg.MODEL.WEIGHTS = path
    assert check_weights(with_cfg, model) == {"name": "R-50"}
    SafeDetectionCheckpointer(model).load(path)
    assert_same_backbone(model, source, image)


def test_pyth_and_matching_heuristics_query(cfg, source, image, tmp_path):
    # bare ResNet names (stem.conv1.weight, res2.0.conv1.weight): only name matching finds them
    state = {k: v.clone() for k, v in source.state_dict().items()}
    pyth = str(tmp_path / "pycls.pyth")
    torch.save({"model_state": state, "epoch": 100}, pyth)
    model = fresh_model(cfg)
    data = SafeDetectionCheckpointer(model)._load_file(pyth)
    assert data["__author__"] == "pycls" and data["matching_heuristics"] is True
    assert state.keys() - data["model"].keys() == {
        k for k in state if k.endswith("num_batches_tracked")
    } != set()
    SafeDetectionCheckpointer(model).load(pyth)
    assert_same_backbone(model, source, image)

    pth = str(tmp_path / "bare.pth")
    torch.save(state, pth)  # a bare state dict, read as {"model": state}
    model = fresh_model(cfg)
    SafeDetectionCheckpointer(model).load(pth)  # exact names only: nothing matches
    assert not torch.allclose(
        features(model.backbone.bottom_up, image)["res5"], features(source, image)["res5"]
    )
    with_cfg = cfg.clone()
    with_cfg.MODEL.WEIGHTS = pth
    with pytest.raises(UserError, match=re.escape(pth) + r" has bare .*\?matching_heuristics=True"):
        check_weights(with_cfg, model)
    with_cfg.MODEL.WEIGHTS = pth + "?matching_heuristics=True"
    assert check_weights(with_cfg, model) == {"name": "bare"}
    SafeDetectionCheckpointer(model).load(with_cfg.MODEL.WEIGHTS)
    assert_same_backbone(model, source, image)


def test_bad_files_are_refused_with_a_sentence(cfg, tmp_path, capfd):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    model = fresh_model(cfg)
    with_cfg = cfg.clone()
    evil = with_cfg.MODEL.WEIGHTS = save_pickle({"blobs": {"conv1_w": Evil()}}, tmp_path / "e.pkl")
    refused = re.escape(evil) + ": not a plain weights pickle .*--unsafe"
    with pytest.raises(UserError, match=refused):
        check_weights(with_cfg, model)
    with pytest.raises(UserError, match=refused):
        SafeDetectionCheckpointer(model).load(evil)
    evil_pth = str(tmp_path / "e.pth")  # through detectron2's _load_file, query and all
    torch.save({"model": {"x": Evil()}}, evil_pth)
    with pytest.raises(UserError, match=re.escape(evil_pth) + ": this file needs code execution"):
        SafeDetectionCheckpointer(model).load(evil_pth + "?matching_heuristics=True")
    assert "pwned" not in capfd.readouterr().out

    cases = {
        "list.pkl": ([np.zeros(3)], "not detectron2 or Caffe2 weights"),
        "other.pkl": ({"blobs": {"foo_w": np.zeros(3)}}, "none of its 1 tensors belongs"),
        "r18.pkl": ({"conv1_w": np.zeros((64, 3, 3, 3), np.float32)},
                    r"stem.conv1.weight has shape \(64, 3, 3, 3\)"),
        "bare.pkl": ({"model": {"stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)},
                      "__author__": "x"}, "bare backbone names .*'matching_heuristics': True"),
    }  # fmt: skip
    for name, (obj, message) in cases.items():
        with_cfg.MODEL.WEIGHTS = save_pickle(obj, tmp_path / name)
        with pytest.raises(UserError, match=re.escape(with_cfg.MODEL.WEIGHTS) + ".*" + message):
            check_weights(with_cfg, model)

    pyth = str(tmp_path / "nostate.pyth")
    torch.save({"model": {}}, pyth)
    with pytest.raises(UserError, match=re.escape(pyth) + ": not a pycls checkpoint"):
        SafeDetectionCheckpointer(model)._load_file(pyth)
