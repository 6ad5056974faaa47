"""Shared fixtures (a tiny tokenizer and tiny random Qwen2 models built from a config), the CLI
helpers, and the test tiers.

Tiers (markers, pyproject.toml): ``unit`` runs in this process and starts no other (``make
test-fast``); ``cli`` starts the real CLI or another process; ``integration`` runs the real CLI
end to end on the demo models; ``gpu`` needs CUDA. A test carries the marker of its tier: one that
is neither ``cli`` nor ``integration`` nor ``gpu`` is made ``unit`` here, except under
tests/commands/, where a test without a tier is ``cli`` (the commands are the CLI). A unit test
that starts a process fails (``_unit_tests_start_no_process``), and ``gpu`` tests are skipped
where torch sees no CUDA device.
"""

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

# One intra-op thread for the torch work in this process (the CLI processes the tests start are
# not affected). The tests' tensors are tiny, so a second thread costs more in hand-offs than it
# saves, and where the cores are busy (the 2-core machine running something else) each op waits
# for one: the unit tier took 138-200 s with torch's default of 2 threads and 35-45 s with one.
# OMP_NUM_THREADS, when set, wins.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

# matplotlib builds its font cache on first import by running `fc-list`; on a fresh machine that
# would be the first plotting unit test, which may start no process. Build it here instead.
import matplotlib.font_manager  # noqa: E402, F401

# ----------------------------------------------------------------------------- tiers

NOT_UNIT = ("cli", "integration", "gpu")
CLI_DIRS = (REPO / "tests" / "commands",)  # a test here without a tier starts the CLI: cli


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device (gpu tier); torch sees none")
    for item in items:
        tiers = {m.name for m in item.iter_markers() if m.name in NOT_UNIT}
        if item.get_closest_marker("unit") and tiers:
            raise pytest.UsageError(f"{item.nodeid}: marked unit and {', '.join(sorted(tiers))}; pick one tier")
        if not tiers and not item.get_closest_marker("unit"):
            in_cli_dir = any(item.path.is_relative_to(d) for d in CLI_DIRS)
            item.add_marker(pytest.mark.cli if in_cli_dir else pytest.mark.unit)
        if "gpu" in tiers and not torch.cuda.is_available():
            item.add_marker(no_gpu)


class ProcessInUnitTest(BaseException):
    """A unit test started a process. A BaseException, so that code under test which turns an
    ``Exception`` into a verdict (``except Exception``) cannot swallow it: the test fails."""


class _NoProcess(subprocess.Popen):
    """``subprocess.Popen`` for unit tests: starting a process fails, naming the test."""

    nodeid = ""

    def __init__(self, args, *rest, **kwargs):
        raise ProcessInUnitTest(
            f"{self.nodeid} is a unit test (make test-fast) but starts a process ({args!r}); mark it cli or integration"
        )


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request, monkeypatch):
    """Keep the unit tier honest: in a unit test, subprocess.run/Popen (and os.system) raise."""
    if request.node.get_closest_marker("unit") is None:
        return
    refuse = type("NoProcess", (_NoProcess,), {"nodeid": request.node.nodeid})
    monkeypatch.setattr(subprocess, "Popen", refuse)

    def run(args, *rest, **kwargs):
        refuse(args)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(os, "system", run)


# ----------------------------------------------------------------------------- CLI helpers

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


def _endpoint(monkeypatch, url: str) -> None:
    """Point the Hugging Face hub client (and opd-cli's reachability probe) at ``url``."""
    from huggingface_hub import constants

    from opd_cli.models.preflight import hub_unreachable

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub_unreachable.cache_clear()


@pytest.fixture
def hub_answers(monkeypatch):
    """A hub endpoint that answers (a local HTTP server, 404 to everything): validation of hub presets sees a
    reachable hub where this machine has none, and leaves the download to load time, as online."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _endpoint(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()
    from opd_cli.models.preflight import hub_unreachable

    hub_unreachable.cache_clear()


@pytest.fixture
def hub_down(monkeypatch):
    """A hub endpoint nothing listens on (connection refused at once)."""
    _endpoint(monkeypatch, "http://127.0.0.1:9")
    yield
    from opd_cli.models.preflight import hub_unreachable

    hub_unreachable.cache_clear()


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


RESUMED_KEYS = ("loss", "grad_norm", "entropy", "logprob_gap", "response_length")


def assert_resume_matches(full, part, keys=RESUMED_KEYS):
    """A run stopped at step 2 and resumed to step 4 (``part``) logged what the uninterrupted run (``full``) did."""
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a[3:], b[3:], strict=True):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key


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
