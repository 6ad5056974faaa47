"""Shared fixtures: a tiny tokenizer and tiny random Qwen2 models built from a config."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from opd_cli.config.schema import register_configs
from opd_cli.models.demo import build_model, train_tokenizer
from opd_cli.tasks.problems import arith_problems

REPO = Path(__file__).resolve().parents[1]

# A demo small enough to build in seconds: the integration tests exercise the real
# build path (tokenizer training, SFT, caching) without waiting for a useful model.
TINY_DEMO = [
    "demo.hidden_size=64",
    "demo.num_layers=1",
    "demo.teacher_steps=20",
    "demo.student_steps=5",
    "demo.vocab_size=300",
]


# A few small steps: enough to exercise every phase of the loop.
SHORT = [
    "eval.n_problems=16",
    "eval.k=2",
    "eval.every=0",
    "trainer.prompts_per_step=4",
    "rollout.n=2",
    "rollout.max_new_tokens=24",
    "eval.max_new_tokens=24",
]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


CLI_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def cli_argv(run_dir, models_dir, *args) -> list[str]:
    """``opd-train`` on the tiny demo, short settings, in ``run_dir``."""
    demo = [f"hydra.run.dir={run_dir}", f"paths.models={models_dir}", *TINY_DEMO, *SHORT]
    return [sys.executable, "-m", "opd_cli.commands.train", *demo, *args]


def opd_train(run_dir, models_dir, *args, env=None):
    out = subprocess.run(
        cli_argv(run_dir, models_dir, *args),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**CLI_ENV, **(env or {})},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def compose_cfg(overrides=()):
    """The config ``opd-train`` would run with these overrides (Hydra's compose API)."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    texts = [f"Question: {p.question}\nAnswer: {p.solution}" for p in arith_problems(0, "train", 256)[:2000]]
    return train_tokenizer(texts, 300)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    """A 2-layer demo Qwen2, shared by the whole session: hand anything that changes a model a copy
    (``HFTeacher`` freezes its model, which would break a later test that trains this one)."""
    cfg = SimpleNamespace(hidden_size=64, num_layers=2, seed=1)
    torch.manual_seed(1)
    return build_model(tiny_tokenizer, cfg).eval()


def perturbed_copy(model, scale: float = 0.05, seed: int = 0):
    """A copy of ``model`` with seeded Gaussian noise on every weight: a teacher close to the student."""
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return other
