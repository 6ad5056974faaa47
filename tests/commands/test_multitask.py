"""``opd-train`` with ``multitask``: arithmetic and the demo environment in one run, a teacher each (integration)."""

import json

import pytest

from ..conftest import CLI_ENV, REPO, cli_argv, metrics, opd_train

pytestmark = pytest.mark.integration

TASKS = [
    "+multitask.tasks.math={task: arith}",
    "+multitask.tasks.game={task: env_demo, overrides: {n_eval: 8}}",
    "+multitask.teachers.game=demo:student",
    "rollout.max_new_tokens=64",
    "eval.max_new_tokens=64",
    "logger=none",
]


def test_two_tasks_alternate_with_their_own_metrics_and_evaluation(tmp_path, models_dir):
    opd_train(tmp_path, models_dir, *TASKS, "trainer.max_steps=4", "eval.every=2")
    rows = metrics(tmp_path)
    assert [r["data/task_math"] for r in rows[1:]] == [1.0, 0.0, 1.0, 0.0]
    for r in rows[1:]:
        name = "math" if r["data/task_math"] else "game"
        assert r[f"task/{name}/loss"] == r["loss"] and not any(
            k.startswith(f"task/{'game' if name == 'math' else 'math'}/") for k in r
        )
        assert ("env/success" in r) == (name == "game")
    for step in (0, 2, 4):
        assert {"eval/math/acc", "eval/game/acc"} <= set(rows[step])
        assert rows[step]["eval/math/acc"] == rows[step]["eval/acc"]
    assert {"eval/math/acc_teacher", "eval/game/acc_teacher"} <= set(rows[0])
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name in ("math", "game"):
        assert summary[f"{name}/acc_before"] == rows[0][f"eval/{name}/acc"]
        assert summary[f"{name}/acc_after"] == rows[4][f"eval/{name}/acc"]


def test_a_bad_mixture_is_one_line_and_makes_no_run_directory(tmp_path, models_dir):
    import subprocess

    run = tmp_path / "run"
    out = subprocess.run(
        cli_argv(run, models_dir, *TASKS, "+multitask.teachers.chess=demo:teacher"),
        capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2 and not run.exists()
    assert out.stderr.strip().splitlines()[-1].startswith("error: multitask.teachers.chess: no task 'chess'")


def test_mixed_batches_draw_every_task_by_weight(tmp_path, models_dir):
    """multitask.mode=mixed on two single-turn tasks (arithmetic and a reasoning-gym family), a teacher each."""
    opd_train(
        tmp_path, models_dir, "+multitask.tasks.math={task: arith, weight: 3}", "multitask.mode=mixed", "logger=none",
        "+multitask.tasks.sums={task: rg/chain_sum, overrides: {chat_template: false, n_eval: 8}}",
        "+multitask.teachers.sums=demo:student", "trainer.max_steps=2", "trainer.prompts_per_step=8",
    )  # fmt: skip
    rows = metrics(tmp_path)
    for r in rows[1:]:
        assert r["data/task_math"] + r["data/task_sums"] == pytest.approx(1.0) and r["grad_norm"] > 0
    assert {"eval/math/acc", "eval/sums/acc", "eval/sums/acc_teacher"} <= set(rows[0])


def test_the_demo_multitask_experiment_runs(tmp_path, models_dir):
    """experiment=demo_multitask (make multitask-demo) end to end, with short demo builds and 2 steps."""
    opd_train(
        tmp_path, models_dir, "experiment=demo_multitask", "demo.env_teacher_steps=10", "demo.env_student_steps=5",
        "trainer.max_steps=2", "eval.every=0", "eval.n_problems=4", "logger=none",
    )  # fmt: skip
    rows = metrics(tmp_path)
    assert [r["data/task_math"] for r in rows[1:]] == [1.0, 0.0] and "task/game/env/success" in rows[2]
    assert {"eval/math/acc", "eval/game/acc", "eval/math/acc_teacher", "eval/game/acc_teacher"} <= set(rows[0])
