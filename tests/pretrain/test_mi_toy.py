"""The toy mutual-information experiment (tools/mi_toy.py, tools/experiments/mi_toy*): building
blocks, file formats, the bound's basic facts."""
from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

from pretrain.losses import eqco, infonce

# the experiment code beside the tools (tools/experiments/): tests/conftest.py puts tools/ on
# the path as tools/sweep.py and tools/mi_toy.py do
from experiments.mi_toy import BatchedCritics, MIToyConfig, _sample, pair_logits, rho_for_mi
from experiments.mi_toy import run_grid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

torch.set_num_threads(1)


def _load_cli():
    path = os.path.join(ROOT, "tools", "mi_toy.py")
    spec = importlib.util.spec_from_file_location("mi_toy_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mi", [0.5, 2.0, 10.0])
def test_rho_gives_the_requested_mutual_information(mi):
    rho = rho_for_mi(mi, dim=20)
    assert -(20 / 2) * math.log(1 - rho**2) == pytest.approx(mi, rel=1e-12)


def test_samples_have_the_requested_correlation():
    rhos = torch.tensor([rho_for_mi(2.0), rho_for_mi(10.0)])
    x, y = _sample(20000, rhos, 20, torch.Generator().manual_seed(0))
    assert x.shape == (20000, 20) and y.shape == (2, 20000, 20)
    for m in range(2):
        corr = (x * y[m]).mean(0) / (x.std(0) * y[m].std(0))  # per coordinate
        assert (corr - rhos[m]).abs().max() < 0.03
        assert y[m].var(0).mean().item() == pytest.approx(1.0, abs=0.03)


def test_pair_logits_takes_every_other_column_once():
    scores = torch.randn(3, 7, 7)
    pos, neg = pair_logits(scores)
    assert pos.shape == (3, 7) and neg.shape == (3, 7, 6)
    for m in range(3):
        for i in range(7):
            assert pos[m, i] == scores[m, i, i]
            want = sorted(scores[m, i, j].item() for j in range(7) if j != i)
            assert sorted(neg[m, i].tolist()) == want


def test_batched_critics_match_separate_mlps_and_do_not_interact():
    torch.manual_seed(0)
    critics = BatchedCritics(3, 5, 16, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():  # make the models different from one another
        for p in critics.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(6, 5)
    y = torch.randn(3, 6, 5)
    scores = critics(x, y)
    for m in range(3):
        g = torch.relu(x @ critics.w1x[m] + critics.b1x[m]) @ critics.w2x[m] + critics.b2x[m]
        h = torch.relu(y[m] @ critics.w1y[m] + critics.b1y[m]) @ critics.w2y[m] + critics.b2y[m]
        torch.testing.assert_close(scores[m], g @ h.T)
    # a loss on model 1 only leaves the other models' gradients at exactly zero
    pos, neg = pair_logits(scores)
    infonce(pos[1], neg[1], 1.0).backward()
    for p in critics.parameters():
        assert p.grad[1].abs().sum() > 0
        assert p.grad[0].abs().sum() == 0 and p.grad[2].abs().sum() == 0


def test_toy_losses_are_the_library_losses():
    # the toy's bound for one model equals the loss functions applied row by row
    scores = torch.randn(1, 5, 5, dtype=torch.float64)
    pos, neg = pair_logits(scores)
    rows = [torch.logsumexp(scores[0, i], 0) - scores[0, i, i] for i in range(5)]
    assert infonce(pos[0], neg[0], 1.0).item() == pytest.approx(torch.stack(rows).mean().item())
    assert eqco(pos[0], neg[0], 1.0, 4.0).item() == pytest.approx(
        infonce(pos[0], neg[0], 1.0).item()
    )


def _reduced(**overrides) -> MIToyConfig:
    settings = dict(mi=[2.0, 6.0, 10.0], k=[8, 32], alpha=64.0, steps=300, eval_batches=20,
                    seed=0, log_every=1000)
    settings.update(overrides)
    return MIToyConfig(**settings)


def test_reduced_grid_writes_the_files_and_obeys_the_bound(tmp_path):
    cli = _load_cli()
    out = tmp_path / "toy"
    cli.main(["--mi", "2", "6", "10", "--k", "8", "32", "--alpha", "64", "--steps", "300",
              "--eval-batches", "20", "--seed", "0", "--threads", "1", "--out", str(out)])
    records = json.loads((out / "mi_toy.json").read_text())
    assert isinstance(records, list) and len(records) == 3 * 2 * 2
    for r in records:
        assert set(r) == {"mi", "k", "loss", "estimate"}
        assert isinstance(r["mi"], float) and isinstance(r["k"], int)
        assert r["loss"] in ("infonce", "eqco") and math.isfinite(r["estimate"])
    est = {(r["mi"], r["k"], r["loss"]): r["estimate"] for r in records}
    for k in (8, 32):
        for mi in (2.0, 6.0, 10.0):
            assert est[(mi, k, "infonce")] <= math.log(k + 1) + 1e-6
        for loss in ("infonce", "eqco"):
            assert est[(2.0, k, loss)] < est[(6.0, k, loss)] < est[(10.0, k, loss)], (k, loss)
    # InfoNCE is capped by log(K+1): at high MI a larger K gives a larger estimate
    assert est[(10.0, 32, "infonce")] > est[(10.0, 8, "infonce")] + 0.5

    table = (out / "mi_toy.md").read_text().splitlines()
    assert table[0] == ("| true MI (nats) | InfoNCE K=8 | InfoNCE K=32 | EqCo K=8 | EqCo K=32 |")
    assert table[2].startswith("| 2 | ") and table[4].startswith("| 10 | ")
    assert table[4].split(" | ")[2] == f"{est[(10.0, 32, 'infonce')]:.2f}"
    assert (out / "mi_toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_deterministic_and_independent_of_the_rest_of_the_grid():
    quiet = lambda s: None  # noqa: E731
    full = run_grid(_reduced(mi=[2.0, 6.0], k=[8], steps=60, eval_batches=5), log=quiet)
    again = run_grid(_reduced(mi=[2.0, 6.0], k=[8], steps=60, eval_batches=5), log=quiet)
    assert full == again
    alone = run_grid(_reduced(mi=[6.0], k=[8], steps=60, eval_batches=5), log=quiet)
    for r in alone:
        key = (r["mi"], r["k"], r["loss"])
        match = next(f for f in full if (f["mi"], f["k"], f["loss"]) == key)
        assert r["estimate"] == pytest.approx(match["estimate"], abs=1e-4)


@pytest.mark.parametrize(
    "argv,flag",
    [(["--k", "0"], "--k"), (["--mi", "-1"], "--mi"), (["--steps", "0"], "--steps"),
     (["--alpha", "0"], "--alpha"), (["--device", "cuda:7"], None)],
)
def test_cli_rejects_bad_input_with_one_sentence(tmp_path, capsys, argv, flag):
    if flag is None and torch.cuda.is_available():
        pytest.skip("CUDA present: --device cuda is valid here")
    cli = _load_cli()
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert (flag or "--device") in err
    assert not (tmp_path / "x").exists()
