"""Paper A's estimator-variance study (methods.md, "Estimator variance study"), on CPU in minutes.

A 1-D control task: ``s_{t+1} = s_t + delta``, ``delta ~ N(mu, sigma)`` from a small MLP
policy that sees (task, s_t, t / T). Task 0 starts at +2 with target -3, task 1 starts at -2
with target +3. One teacher per task is trained with REINFORCE. Then both are distilled
into one student by on-policy distillation, alternating the tasks, with the sampled-token
reward ``log q - log pi_old`` and the discounted reward-to-go of ``objectives.discounted_returns``
(the code ``loss.gamma`` uses). For each gamma we measure the variance of the gradient
estimate: each batch of 64 trajectories is split into 8 micro-batches, and we take the
output layer's gradient per micro-batch and ``mean_m ||g_m - g_bar||^2``.

Choices where paper A is silent (documented here and in ``conf/study_variance.yaml``):
- Networks: 2 hidden layers of 32, tanh. Outputs mu and log sigma, with log sigma clamped
  to [-3, 1].
- Teacher reward: ``-|s_{t+1} - target|`` per step, as REINFORCE with a batch-mean
  baseline. Adam, lr 1e-2, 300 iterations.
- Student: Adam, lr 3e-3, one on-policy update per iteration (PPO ratio 1, clip inactive).
- Drift: the student's mean final distance to the target, and the KL(student || teacher)
  on the states it visits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from opd_cli.analysis.plots import draw_band
from opd_cli.objectives.advantages import discounted_returns
from opd_cli.objectives.math import ppo_token_loss
from opd_cli.progress import Progress

STARTS = (2.0, -2.0)


TARGETS = (-3.0, 3.0)


class Policy(nn.Module):
    """Gaussian policy over the step delta; input (task sign, s_t, t / T)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, 2)  # the "output layer" whose gradient variance is measured

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.body(x))
        return out[..., 0], out[..., 1].clamp(-3.0, 1.0)


def log_prob(mu: torch.Tensor, log_sigma: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((a - mu) / log_sigma.exp()) ** 2 - log_sigma - 0.5 * math.log(2 * math.pi)


def gaussian_kl(mu_p, ls_p, mu_q, ls_q) -> torch.Tensor:
    """KL(N(mu_p, sigma_p) || N(mu_q, sigma_q))."""
    return ls_q - ls_p + ((2 * ls_p).exp() + (mu_p - mu_q) ** 2) / (2 * (2 * ls_q).exp()) - 0.5


@dataclass
class Rollout:
    inputs: torch.Tensor  # [B, T, 3]
    actions: torch.Tensor  # [B, T]
    states: torch.Tensor  # [B, T + 1]


def rollout(policy: Policy, task: int, batch: int, horizon: int, gen: torch.Generator) -> Rollout:
    s = torch.full((batch,), STARTS[task])
    inputs, actions, states = [], [], [s]
    sign = 1.0 if task == 0 else -1.0
    with torch.no_grad():
        for t in range(horizon):
            x = torch.stack([torch.full_like(s, sign), s, torch.full_like(s, t / horizon)], -1)
            mu, ls = policy(x)
            a = mu + ls.exp() * torch.randn(batch, generator=gen)
            s = s + a
            inputs.append(x)
            actions.append(a)
            states.append(s)
    return Rollout(torch.stack(inputs, 1), torch.stack(actions, 1), torch.stack(states, 1))


def train_teacher(task: int, cfg, seed: int) -> Policy:
    """REINFORCE with a batch-mean baseline on the reward -|s_{t+1} - target|."""
    torch.manual_seed(seed * 10 + task)
    gen = torch.Generator().manual_seed(seed * 10 + task)
    policy = Policy(cfg.width)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.teacher_lr)
    for _ in range(cfg.teacher_iterations):
        r = rollout(policy, task, cfg.batch, cfg.horizon, gen)
        rewards = -(r.states[:, 1:] - TARGETS[task]).abs()
        returns = discounted_returns(rewards, 1.0)
        adv = returns - returns.mean(0, keepdim=True)
        mu, ls = policy(r.inputs)
        loss = -(adv * log_prob(mu, ls, r.actions)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy.requires_grad_(False)


def head_grad(policy: Policy, loss: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(loss, [policy.head.weight, policy.head.bias], retain_graph=True)
    return torch.cat([g.flatten() for g in grads])


def distill(teachers: list[Policy], gamma: float, cfg, seed: int) -> dict[str, list[float]]:
    """OPD of both teachers into one student; per-iteration gradient variance and drift."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 7)
    student = Policy(cfg.width)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.student_lr)
    out: dict[str, list[float]] = {"variance": [], "distance": [], "kl": []}
    visits = torch.zeros(cfg.horizon + 1, cfg.state_bins)
    for it in range(cfg.iterations):
        task = it % 2  # alternate the tasks
        r = rollout(student, task, cfg.batch, cfg.horizon, gen)
        mu, ls = student(r.inputs)
        logp = log_prob(mu, ls, r.actions)
        with torch.no_grad():
            mu_q, ls_q = teachers[task](r.inputs)
            reward = log_prob(mu_q, ls_q, r.actions) - logp  # log q - log pi_old (on-policy: pi_old = p)
            adv = discounted_returns(reward, gamma)
        loss_tok, _ = ppo_token_loss(logp, logp.detach(), adv, 0.2, 0.2, None)
        per_traj = loss_tok.mean(1)  # [B]
        micro = per_traj.view(cfg.micro_batches, -1).mean(1)
        grads = torch.stack([head_grad(student, m) for m in micro])
        out["variance"].append(((grads - grads.mean(0)) ** 2).sum(1).mean().item())
        loss = per_traj.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            out["distance"].append((r.states[:, -1] - TARGETS[task]).abs().mean().item())
            out["kl"].append(gaussian_kl(mu, ls, mu_q, ls_q).mean().item())
            if it >= cfg.iterations - cfg.visit_iterations:
                lo, hi = cfg.state_range
                bins = ((r.states - lo) / (hi - lo) * cfg.state_bins).long().clamp(0, cfg.state_bins - 1)
                visits.scatter_add_(1, bins.T, torch.ones_like(bins.T, dtype=visits.dtype))
    out["visits"] = visits.tolist()
    return out


def run_study(cfg, out_dir: Path) -> dict:
    """Every gamma x seed; writes variance.json, plots and report.md into ``out_dir``."""
    torch.set_num_threads(1)  # tiny networks: threads cost more than they give
    results: dict = {str(g): {} for g in cfg.gammas}
    per_seed = 2 * cfg.teacher_iterations + len(cfg.gammas) * cfg.iterations
    with Progress(len(cfg.seeds) * per_seed, "opd-study variance", unit="iterations") as bar:
        for seed in cfg.seeds:
            teachers = []
            for task in (0, 1):
                teachers.append(train_teacher(task, cfg, seed))
                bar.update(cfg.teacher_iterations, seed=seed, done=f"teacher {task}")
            for gamma in cfg.gammas:
                results[str(gamma)][str(seed)] = distill(teachers, float(gamma), cfg, seed)
                bar.update(cfg.iterations, seed=seed, done=f"gamma {gamma}")
    (out_dir / "variance.json").write_text(json.dumps(results) + "\n")
    plot(results, cfg, out_dir)
    report = write_report(results, cfg, out_dir)
    return report


def median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def summarize(results: dict, cfg) -> dict:
    """Per gamma: median variance over iterations and seeds; final distance and KL (last 10%)."""
    tail = max(1, cfg.iterations // 10)
    out = {}
    for g, by_seed in results.items():
        runs = list(by_seed.values())
        out[g] = {
            "median_variance": median([v for r in runs for v in r["variance"]]),
            "final_distance": sum(sum(r["distance"][-tail:]) / tail for r in runs) / len(runs),
            "final_kl": sum(sum(r["kl"][-tail:]) / tail for r in runs) / len(runs),
        }
    return out


def write_report(results: dict, cfg, out_dir: Path) -> dict:
    s = summarize(results, cfg)
    gammas = list(s)
    med = [s[g]["median_variance"] for g in gammas]
    grows = all(b >= a for a, b in zip(med, med[1:], strict=False))
    ratio = med[-1] / med[0] if med[0] > 0 else float("inf")
    drifts = s[gammas[-1]]["final_distance"] > 1.5 * s[gammas[0]]["final_distance"]
    lines = [
        "# Estimator variance study (paper A)",
        "",
        f"Horizon {cfg.horizon}, batch {cfg.batch} in {cfg.micro_batches} micro-batches, "
        f"{cfg.iterations} iterations, seeds {list(cfg.seeds)}.",
        "",
        "| gamma | median gradient variance | final distance to target | final KL(student‖teacher) |",
        "|---|---|---|---|",
    ]
    for g in gammas:
        r = s[g]
        lines.append(f"| {g} | {r['median_variance']:.4g} | {r['final_distance']:.3f} | {r['final_kl']:.3f} |")
    lines += [
        "",
        f"- Median variance grows with gamma: **{'yes' if grows else 'no'}** (medians {', '.join(f'{m:.3g}' for m in med)}).",
        f"- Variance at gamma = {gammas[-1]} over gamma = {gammas[0]}: **{ratio:.3g}x** "
        f"(paper A: at least 10x): **{'agrees' if ratio >= 10 else 'does not agree'}**.",
        f"- gamma = {gammas[-1]} drifts (final distance more than 1.5x that of gamma = {gammas[0]}): "
        f"**{'yes' if drifts else 'no'}**.",
        "",
        "![variance](variance.png)",
        "![drift](drift.png)",
        "![visits](visits.png)",
    ]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return {"summary": s, "grows": grows, "ratio": ratio, "drifts": drifts}


def plot(results: dict, cfg, out_dir: Path) -> None:

    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for g, by_seed in results.items():
        runs = np.array([r["variance"] for r in by_seed.values()])
        draw_band(ax, range(runs.shape[1]), runs, f"gamma = {g}", center="median", band="minmax")
    ax.set_yscale("log")
    ax.set_title(
        "output-layer gradient variance over micro-batches\n(line: median over seeds, band: min-max)", fontsize=10
    )
    ax.set_xlabel("distillation iteration")
    ax.set_ylabel("mean ||g_m - g_bar||^2")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "variance.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for g, by_seed in results.items():
        for ax, key, label in ((axes[0], "distance", "|s_T - target|"), (axes[1], "kl", "KL(student || teacher)")):
            runs = torch.tensor([r[key] for r in by_seed.values()])
            ax.plot(runs.mean(0), label=f"gamma = {g}")
            ax.set_ylabel(label)
    for ax, title in zip(axes, ("final distance to the target", "student-teacher KL on visited states"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("distillation iteration")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "drift.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.4), squeeze=False)
    lo, hi = cfg.state_range
    for ax, (g, by_seed) in zip(axes[0], results.items(), strict=True):
        visits = torch.tensor([r["visits"] for r in by_seed.values()]).sum(0)
        ax.imshow(visits.T.log1p(), origin="lower", aspect="auto", extent=(0, cfg.horizon, lo, hi), cmap="viridis")
        ax.set_title(f"gamma = {g}")
        ax.set_xlabel("time step")
        ax.set_ylabel("state s")
    fig.suptitle(f"state visits, last {cfg.visit_iterations} iterations (log scale)")
    fig.tight_layout()
    fig.savefig(out_dir / "visits.png", dpi=110)
    plt.close(fig)
