"""The EqCo paper's toy mutual-information experiment (its appendix): train InfoNCE and EqCo critics
on correlated Gaussians for every (true MI, K) and return their MI estimates; the table, plot and
files are :mod:`mi_toy_report`'s.

x ~ N(0, I_d), y = rho x + sqrt(1 - rho^2) eps with d = 20, so I(x; y) = -(d/2) log(1 - rho^2).
Two critics g(x), h(y) (one hidden layer of 256 units + ReLU each) score a pair by the dot product
g(x) . h(y). Each training step draws K + 1 independent pairs; pair i's positive score is
g(x_i) . h(y_i) and its K negatives are g(x_i) . h(y_j), j != i. After training with InfoNCE or
EqCo (tau = 1: the critic's scale is learned), the critics are frozen and the bound is averaged
over fresh batches:

* InfoNCE: I >= log(K + 1) - L_InfoNCE, which can never exceed log(K + 1);
* EqCo:    log(alpha) - L_EqCo, which should stay roughly flat in K (docs/methods.md, "Losses").

Speed: for one K, all (true MI, loss) critic pairs of the grid are trained together as one batch
of independent models (stacked weights, batched matmuls, one Adam), so the per-step Python
overhead is paid once per K rather than once per model. Their gradients do not interact.

Determinism and fairness: for a given (seed, K) every model starts from the same initial weights
and all models see the same x and eps draws (each MI mixes them with its own rho). InfoNCE and EqCo
therefore differ only by the loss, and a cell's estimate does not depend on which other MI values
are in the grid.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch
from torch import nn

from pretrain.io import UserError
from pretrain.losses import eqco, infonce

__all__ = [
    "LOSS_NAMES",
    "MIToyConfig",
    "rho_for_mi",
    "BatchedCritics",
    "pair_logits",
    "run_for_k",
    "run_grid",
]

LOSS_NAMES = ("infonce", "eqco")


@dataclass
class MIToyConfig:
    """Settings of the toy experiment; defaults follow the paper's appendix."""

    mi: List[float] = field(default_factory=lambda: [2.0, 4.0, 6.0, 8.0, 10.0])  # true MI, nats
    k: List[int] = field(default_factory=lambda: [64, 128, 256, 512])  # negatives per query
    alpha: float = 512.0  # EqCo's fixed alpha
    steps: int = 5000  # Adam steps per (MI, K, loss)
    eval_batches: int = 1000  # fresh batches the frozen bound is averaged over
    seed: int = 0
    lr: float = 5e-4
    dim: int = 20  # dimension of x and y
    hidden: int = 256  # hidden units of each critic
    embed_dim: int = 32  # critic output size (the paper does not state it; Poole et al. use 32)
    device: str = "cpu"
    log_every: int = 1000  # steps between progress lines

    def validate(self) -> None:
        """Raise a :class:`UserError` naming the first bad setting."""
        if not self.mi or any(not (math.isfinite(m) and m > 0) for m in self.mi):
            raise UserError(
                f"--mi: every true MI must be a positive number of nats, got {self.mi}."
            )
        if not self.k or any(int(k) != k or k < 1 for k in self.k):
            raise UserError(f"--k: every K must be an integer >= 1, got {self.k}.")
        checks = {
            "--alpha": self.alpha > 0,
            "--steps": self.steps >= 1,
            "--eval-batches": self.eval_batches >= 1,
            "--lr": self.lr > 0,
            "--hidden": self.hidden >= 1,
            "--embed-dim": self.embed_dim >= 1,
            "--dim": self.dim >= 1,
            "--log-every": self.log_every >= 1,
        }
        for flag, ok in checks.items():
            if not ok:
                raise UserError(f"{flag} must be positive.")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(
                f"--device {self.device}: CUDA is not available here; use --device cpu."
            )


def rho_for_mi(mi: float, dim: int = 20) -> float:
    """Correlation rho with I(x; y) = -(dim/2) log(1 - rho^2) = ``mi`` nats (dim i.i.d. coords)."""
    return math.sqrt(1.0 - math.exp(-2.0 * mi / dim))


class BatchedCritics(nn.Module):
    """``num_models`` independent pairs of critics g, h: R^dim -> R^embed (Linear-ReLU-Linear),
    stored as stacked weights so that all models run in a few batched matmuls."""

    def __init__(
        self, num_models: int, dim: int, hidden: int, embed_dim: int, generator: torch.Generator
    ) -> None:
        super().__init__()
        shapes = {"w1": (dim, hidden), "b1": (1, hidden), "w2": (hidden, embed_dim),
                  "b2": (1, embed_dim)}
        fan_in = {"w1": dim, "b1": dim, "w2": hidden, "b2": hidden}
        for side in ("x", "y"):
            for name, shape in shapes.items():
                # nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); one draw shared by
                # all models (see the module docstring)
                bound = 1.0 / math.sqrt(fan_in[name])
                one = (torch.rand(shape, generator=generator) * 2 - 1) * bound
                self.register_parameter(
                    f"{name}{side}", nn.Parameter(one.expand(num_models, *shape).clone())
                )

    def _embed(self, v: torch.Tensor, side: str) -> torch.Tensor:
        w1, b1, w2, b2 = (getattr(self, f"{n}{side}") for n in ("w1", "b1", "w2", "b2"))
        return torch.relu(v @ w1 + b1) @ w2 + b2

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scores ``[M, B, B]``: entry (m, i, j) = g_m(x_i) . h_m(y_j).

        ``x`` is ``[B, dim]`` (shared by all models) or ``[M, B, dim]``; ``y`` is ``[M, B, dim]``.
        """
        return self._embed(x, "x") @ self._embed(y, "y").transpose(1, 2)


def pair_logits(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``[M, B, B]`` scores into positives ``[M, B]`` (diagonal) and negatives
    ``[M, B, B - 1]`` (row i without column i), with no Python loop."""
    m, b, _ = scores.shape
    pos = scores.diagonal(dim1=1, dim2=2)
    # row i takes columns i+1, ..., i+B-1 (mod B): every column but i, in a cyclic order (the
    # losses do not depend on the order of the negatives); a gather is cheaper to differentiate
    # than slicing the flattened matrix
    rows = torch.arange(b, device=scores.device)
    cols = (rows.unsqueeze(1) + torch.arange(1, b, device=scores.device)) % b
    return pos, scores.gather(2, cols.expand(m, b, b - 1))


def _sample(batch: int, rhos: torch.Tensor, dim: int, generator: torch.Generator):
    """x [B, dim] and y [len(rhos), B, dim] from the same x, eps draw."""
    device = rhos.device
    x = torch.randn(batch, dim, generator=generator, device=device)
    eps = torch.randn(batch, dim, generator=generator, device=device)
    r = rhos.view(-1, 1, 1)
    return x, r * x + torch.sqrt(1 - r * r) * eps


def _group_losses(pos, neg, k: int, alpha: float, n_mi: int) -> Dict[str, torch.Tensor]:
    """Mean loss per loss group; models are ordered [infonce x n_mi, eqco x n_mi]."""
    out = {}
    for g, name in enumerate(LOSS_NAMES):
        p = pos[g * n_mi : (g + 1) * n_mi].reshape(-1)
        n = neg[g * n_mi : (g + 1) * n_mi].reshape(-1, k)
        out[name] = infonce(p, n, 1.0) if name == "infonce" else eqco(p, n, 1.0, alpha)
    return out


def run_for_k(cfg: MIToyConfig, k: int, log: Callable[[str], None] = print) -> List[dict]:
    """Train and evaluate InfoNCE and EqCo critics for every true MI at one K; return records."""
    device = torch.device(cfg.device)
    mis = sorted(set(float(m) for m in cfg.mi))
    n_mi, batch = len(mis), k + 1
    rhos = torch.tensor([rho_for_mi(m, cfg.dim) for m in mis], device=device)
    rhos = torch.cat([rhos, rhos])  # one copy per loss
    # separate random streams for the initial weights, the training data and the evaluation
    # data, each fixed by (seed, K) alone
    base = cfg.seed * 1_000_003 + 3 * k
    init_gen = torch.Generator().manual_seed(base)
    train_gen = torch.Generator(device=device).manual_seed(base + 1)
    eval_gen = torch.Generator(device=device).manual_seed(base + 2)
    critics = BatchedCritics(2 * n_mi, cfg.dim, cfg.hidden, cfg.embed_dim, init_gen).to(device)
    optimizer = torch.optim.Adam(critics.parameters(), lr=cfg.lr)

    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        x, y = _sample(batch, rhos, cfg.dim, train_gen)
        losses = _group_losses(*pair_logits(critics(x, y)), k, cfg.alpha, n_mi)
        # each group loss is the mean over its n_mi models; x n_mi gives every model the gradient
        # of its own mean loss (models share no parameters)
        total = n_mi * (losses["infonce"] + losses["eqco"])
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            log(
                f"[mi_toy] K={k} step {step}/{cfg.steps} mean loss infonce "
                f"{losses['infonce'].item():.4f} eqco {losses['eqco'].item():.4f} "
                f"({time.perf_counter() - start:.1f}s)"
            )

    sums = torch.zeros(2 * n_mi, dtype=torch.float64, device=device)
    with torch.no_grad():
        for _ in range(cfg.eval_batches):
            x, y = _sample(batch, rhos, cfg.dim, eval_gen)
            pos, neg = pair_logits(critics(x, y))
            for m in range(2 * n_mi):
                loss_fn = infonce if m < n_mi else eqco
                extra = () if m < n_mi else (cfg.alpha,)
                sums[m] += loss_fn(pos[m], neg[m], 1.0, *extra).double()
    mean_loss = (sums / cfg.eval_batches).tolist()
    records = []
    for i, mi in enumerate(mis):
        records.append({"mi": mi, "k": k, "loss": "infonce",
                        "estimate": math.log(k + 1) - mean_loss[i]})
        records.append({"mi": mi, "k": k, "loss": "eqco",
                        "estimate": math.log(cfg.alpha) - mean_loss[n_mi + i]})
    log(f"[mi_toy] K={k} done in {time.perf_counter() - start:.1f}s: " + ", ".join(
        f"{r['loss']}@{r['mi']:g}={r['estimate']:.3f}" for r in records))
    return records


def run_grid(cfg: MIToyConfig, log: Callable[[str], None] = print) -> List[dict]:
    """All (true MI, K, loss) estimates, ordered by MI, then K, then loss."""
    cfg.validate()
    records: List[dict] = []
    for k in sorted(set(int(k) for k in cfg.k)):
        records.extend(run_for_k(cfg, k, log))
    order = {name: i for i, name in enumerate(LOSS_NAMES)}
    return sorted(records, key=lambda r: (r["mi"], r["k"], order[r["loss"]]))
