"""Checkpoint directories (training/checkpoint.py): written under a temporary name, committed by one
rename, and the latest complete one found on resume.

A process killed in the middle of a save leaves a temporary directory (with or without its state
file); none of that may ever be taken for the latest checkpoint. The real kill, through the CLI, is
tests/training/test_distributed.py::test_killed_during_save_resumes_from_previous_checkpoint.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from opd_cli.training.checkpoint import STATE_FILE, checkpoint_dirs, commit, latest_checkpoint, remove_stale_saves


@pytest.fixture(autouse=True)
def _no_test_kill(monkeypatch):
    monkeypatch.delenv("OPD_TEST_KILL_BEFORE_COMMIT", raising=False)


def write(run: Path, step: int, tag: str = "", state: bool = True) -> Path:
    """Fill step's temporary directory as a trainer's save does: afresh (a killed save's leftovers
    go), the model, then the state file."""
    tmp, _ = checkpoint_dirs(run, step)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    (tmp / "model/config.json").write_text(json.dumps({"step": step, "tag": tag}))
    save_file({"w": torch.full((4,), float(step))}, tmp / "model/model.safetensors")
    if state:
        torch.save({"step": step, "tag": tag}, tmp / STATE_FILE)
    return tmp


def save(run: Path, step: int, tag: str = "") -> Path:
    return commit(write(run, step, tag), checkpoint_dirs(run, step)[1])


def test_names():
    tmp, final = checkpoint_dirs(Path("/r"), 12)
    assert (tmp, final) == (Path("/r/checkpoints/.tmp-step_000012"), Path("/r/checkpoints/step_000012"))


def test_latest_is_the_highest_committed_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None  # no checkpoints directory yet
    for step in (9, 10, 100, 2):
        save(tmp_path, step)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints/step_000100"  # 100 > 10 > 9, not as text


def test_a_half_written_save_is_never_the_latest(tmp_path):
    write(tmp_path, 1)  # the first save, killed after writing everything, before the commit
    assert latest_checkpoint(tmp_path) is None
    save(tmp_path, 1)
    save(tmp_path, 2)
    write(tmp_path, 3, state=False)  # killed while writing the model
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints/step_000002"
    write(tmp_path, 4)  # killed after writing everything, before the commit
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints/step_000002"
    # a step directory without its state file (not written by commit) does not count either
    (tmp_path / "checkpoints/step_000005/model").mkdir(parents=True)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints/step_000002"


def test_commit_is_one_rename_of_the_complete_directory(tmp_path, monkeypatch):
    """Until the rename the previous checkpoint is the latest; the rename moves the whole temporary
    directory into place, so the new checkpoint appears complete or not at all."""
    save(tmp_path, 1, "old")
    tmp = write(tmp_path, 2)
    final = checkpoint_dirs(tmp_path, 2)[1]
    renames = []
    rename = Path.rename

    def watched(self, target):
        renames.append((self, Path(target)))
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints/step_000001"
        assert not Path(target).exists() and (self / STATE_FILE).exists()
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", watched)
    assert commit(tmp, final) == final
    assert renames == [(tmp, final)]
    assert not tmp.exists()
    assert latest_checkpoint(tmp_path) == final
    assert json.loads((final / "model/config.json").read_text()) == {"step": 2, "tag": ""}


def test_older_checkpoints_survive_and_a_step_saved_again_is_replaced(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, "first")
    save(tmp_path, 3, "again")  # e.g. a resumed run's final save of the same step
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000002", "step_000003"]
    for step in (1, 2):
        assert torch.load(root / f"step_{step:06d}" / STATE_FILE) == {"step": step, "tag": "first"}
    assert torch.load(root / "step_000003" / STATE_FILE) == {"step": 3, "tag": "again"}
    assert latest_checkpoint(tmp_path) == root / "step_000003"


@pytest.mark.parametrize("damage", ["truncated weights", "truncated state", "no config"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
    save(tmp_path, 3)
    newest = save(tmp_path, 6)
    if damage == "truncated weights":
        path = newest / "model/model.safetensors"
        path.write_bytes(path.read_bytes()[:-8])
    elif damage == "truncated state":
        path = newest / STATE_FILE
        path.write_bytes(path.read_bytes()[:20])
    else:
        (newest / "model/config.json").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints/step_000003"
    assert "step_000006 is damaged" in caplog.text


def test_stale_temporary_saves_are_removed(tmp_path):
    save(tmp_path, 2)
    write(tmp_path, 4)  # a save killed before its commit
    remove_stale_saves(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002"]
