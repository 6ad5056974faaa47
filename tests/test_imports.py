"""A plain-torch run never imports DeepSpeed (its import takes time and logs an accelerator warning).

The run is the real CLI under ``PYTHONPROFILEIMPORTTIME`` (``python -X importtime``), so its whole
import graph is on stderr: the demo build (SFT, saving the models), training, evaluation and the
checkpoint (transformers' ``save_pretrained`` unwraps through accelerate, which imported DeepSpeed;
``opd_cli.dist.save_pretrained`` keeps it out).
"""

import re

import pytest

from .conftest import opd_train

pytestmark = pytest.mark.cli


def imported(stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines (``import time: self | cumulative | name``)."""
    return {m.group(1) for m in re.finditer(r"^import time:[^|]*\|[^|]*\| *([\w.]+)\s*$", stderr, re.M)}


def test_a_default_run_does_not_import_deepspeed(tmp_path):
    out = opd_train(tmp_path / "run", tmp_path / "models", "trainer.max_steps=1", env={"PYTHONPROFILEIMPORTTIME": "1"})
    modules = imported(out.stderr)
    assert {"torch", "transformers", "opd_cli.training.loop"} <= modules  # the premise: the graph was recorded
    assert (tmp_path / "run" / "checkpoints").is_dir()  # and a checkpoint was saved
    assert not {m for m in modules if m == "deepspeed" or m.startswith("deepspeed.")}
    assert "Setting accelerator to CPU" not in out.stderr
