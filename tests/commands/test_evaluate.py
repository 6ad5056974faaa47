"""opd-eval end to end on the tiny demo student and local benchmark files (integration tier)."""

import json
import subprocess
import sys

import pytest

from .conftest import CLI_ENV, REPO, TINY_DEMO

FIXTURES = REPO / "tests/fixtures"


def opd_eval(out_dir, models_dir, *args):
    argv = [sys.executable, "-m", "opd_cli.commands.evaluate", f"hydra.run.dir={out_dir}", f"paths.models={models_dir}"]
    return subprocess.run(
        [*argv, *TINY_DEMO, *args], capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=600
    )


@pytest.mark.integration
def test_opd_eval_reports_every_benchmark(tmp_path, models_dir):
    out = opd_eval(
        tmp_path,
        models_dir,
        "tasks=[arith,aime24,math500]",
        f"task_paths.aime24={FIXTURES / 'aime24.jsonl'}",
        f"task_paths.math500={FIXTURES / 'math500.jsonl'}",
        "chat_template=false",
        "eval.k=2",
        "eval.n_problems=4",
        "eval.max_new_tokens=16",
        "pass_k=[1,2]",
        "teacher_acc.arith=0.9",
        "baseline_acc.arith=0.1",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert set(results) == {"arith", "aime24", "math500"}
    assert results["arith"]["n_problems"] == 4 and results["aime24"]["n_problems"] == 2
    for row in results.values():
        assert row["pass@1"] == pytest.approx(row["avg@2"])  # pass@1 is the mean correctness
        assert row["avg@2"] <= row["pass@2"] <= 1
    assert results["arith"]["gap_recovery"] == pytest.approx((results["arith"]["avg@2"] - 0.1) / 0.8)
    assert "| arith |" in (tmp_path / "eval.md").read_text()
    # the sampling settings, and every generation with its verdict
    settings = json.loads((tmp_path / "eval.json").read_text())["settings"]
    assert settings == {
        "model": "demo:student",
        "engine": "hf",
        "k": 2,
        "temperature": 1.0,
        "top_p": 0.9,
        "max_new_tokens": 16,
        "seed": 0,
    }
    assert (
        "Sampling: engine hf, k 2, temperature 1.0, top_p 0.9, max_new_tokens 16, seed 0."
        in (tmp_path / "eval.md").read_text()
    )
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    for name, row in results.items():
        mine = [r for r in rows if r["benchmark"] == name]
        assert [(r["problem"], r["sample"]) for r in mine] == [(i, j) for i in range(row["n_problems"]) for j in (0, 1)]
        assert sum(r["correct"] for r in mine) / len(mine) == pytest.approx(row["avg@2"])
    aime = [r for r in rows if r["benchmark"] == "aime24"]
    fixture = [json.loads(line) for line in (FIXTURES / "aime24.jsonl").read_text().splitlines()]
    assert [(r["question"], r["answer"]) for r in aime[::2]] == [(f["problem"], f["answer"]) for f in fixture]
    assert all(isinstance(r["response"], str) and isinstance(r["correct"], bool) for r in rows)


@pytest.mark.parametrize(
    "args,message",
    [
        (["tasks=[nope]"], "error: tasks: unknown benchmark 'nope'; choose from: "),
        (["eval.k=2", "pass_k=[5]"], "error: pass_k: 5 must be between 1 and eval.k (2)"),
        (["tasks=[aime24]", "task_paths.aime24=/no/file.jsonl"], "error: task_paths.aime24: file not found"),
        # opd-eval samples with eval.*: a rollout sampling key would be ignored, so it is refused
        (
            ["rollout.temperature=0.7"],
            "error: rollout.temperature: opd-eval samples with the eval.* keys; set eval.temperature",
        ),
        (["rollout.n=8"], "error: rollout.n: opd-eval samples with the eval.* keys; set eval.k"),
        (["rollout.max_prompt_tokens=8"], "error: rollout.max_prompt_tokens: opd-eval samples with the eval.* keys"),
        (["eval.every=5"], "error: eval.every: "),
        (["eval.top_p=0"], "error: eval.top_p: must be in (0, 1], got 0"),
        (["eval.temperature=0"], "error: eval.temperature: must be a finite number > 0, got 0"),
        (["model.name_or_path=demo:nope"], "error: model.name_or_path: 'demo:nope' is not one of: demo:student"),
        (["model.name_or_path=/no/model"], "error: model.name_or_path: local model path not found: /no/model"),
    ],
)
def test_opd_eval_bad_input(args, message, tmp_path, models_dir):
    """One line, exit code 2, and no evaluation directory made: the checks run before Hydra makes it."""
    out = opd_eval(tmp_path / "eval", models_dir, *args)
    assert out.returncode == 2
    assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "eval").exists()


@pytest.mark.integration
def test_opd_eval_with_vllm_sampling(tmp_path, models_dir):
    args = ["rollout=vllm", "tasks=[arith]", "eval.k=2", "eval.n_problems=4", "eval.max_new_tokens=16"]
    out = opd_eval(tmp_path, models_dir, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads((tmp_path / "eval.json").read_text())["results"]["arith"]
    assert row["n_problems"] == 4 and 0 <= row["avg@2"] <= 1
    assert json.loads((tmp_path / "eval.json").read_text())["settings"]["engine"] == "vllm"
    assert len((tmp_path / "generations.jsonl").read_text().splitlines()) == 8


@pytest.mark.unit
def test_opd_eval_names_its_own_chat_template_key(tiny_model, tiny_tokenizer, tmp_path):
    """A model without a chat template: opd-eval's key is the top-level chat_template (opd-train's
    task.chat_template does not exist here; its message is tested in tests/tasks/)."""
    from hydra import compose, initialize_config_dir

    from opd_cli.commands.evaluate import run
    from opd_cli.config.schema import register_configs
    from opd_cli.errors import UserError

    from ..models.tiny import save_model

    assert tiny_tokenizer.chat_template is None
    save_model(tmp_path / "model", tiny_model, tiny_tokenizer)
    overrides = [
        f"model.name_or_path={tmp_path / 'model'}",
        "tasks=[amc23]",
        f"task_paths.amc23={FIXTURES / 'amc23.jsonl'}",
    ]
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    with pytest.raises(UserError) as err:
        run(cfg, tmp_path)
    assert str(err.value) == (
        "chat_template: the model's tokenizer has no chat template; set chat_template=false or use a model that has one"
    )
    assert not (tmp_path / "eval.json").exists()
