"""opd-data teacher-rollouts end to end on the tiny demo teacher (HF and vLLM), its one-line errors, and the
data set it writes: the columns of the contract, each response as the teacher sampled it, counts that add up."""

import json
import subprocess
import sys

import pytest

from opd_cli.models.checks import choose_decoder
from opd_cli.models.loading import load_model, load_tokenizer, resolve_path
from opd_cli.rollout.hf import HFRollout
from opd_cli.tasks.checking import check_exact
from opd_cli.tasks.problems import load_problems
from opd_cli.tasks.prompts import format_prompt

from ..training.test_teacher_rollouts import data_cfg
from .conftest import CLI_ENV, REPO, TINY_DEMO

COLUMNS = ["question", "answer", "response", "response_tokens", "correct", "problem", "sample"]
# 8 prompts x 4 samples in one call of the engine; most responses of the tiny teacher are cut off at 64 tokens,
# a few finish
SMALL = ["data.n_problems=8", "data.n=4", "data.batch_size=32", "data.max_new_tokens=64"]


def opd_data(out_dir, models_dir, *args):
    argv = [sys.executable, "-m", "opd_cli.commands.data", "teacher-rollouts", f"hydra.run.dir={out_dir}"]
    # one thread, as in the test process: the regenerated samples are computed alike
    env = {**CLI_ENV, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*argv, f"paths.models={models_dir}", *TINY_DEMO, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )


def written(out_dir):
    import datasets

    return datasets.load_from_disk(str(out_dir / "data")), json.loads((out_dir / "stats.json").read_text())


def check_counts(data, stats, n_prompts, n):
    """The data set's rows and the counts of stats.json agree and add up."""
    assert data.column_names == COLUMNS
    assert stats["prompts"] == n_prompts and stats["sampled"] == n_prompts * n
    assert stats["kept"] == len(data) > 0
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["sampled"]
    assert set(stats["dropped"]) == {"truncated", "repetitive", "incorrect"}
    lengths = data["response_tokens"]
    assert stats["response_tokens"] == {"mean": pytest.approx(sum(lengths) / len(lengths)), "max": max(lengths)}
    assert len({(r["problem"], r["sample"]) for r in data}) == len(data)


@pytest.mark.integration
def test_hf_rollouts_write_the_teacher_samples(tmp_path, models_dir):
    out = opd_data(tmp_path / "run", models_dir, *SMALL, "data.max_repeat_fraction=0.3")
    assert out.returncode == 0, out.stderr[-3000:]
    data, stats = written(tmp_path / "run")
    check_counts(data, stats, 8, 4)
    assert stats["settings"]["engine"] == "hf" and stats["settings"]["max_repeat_fraction"] == 0.3
    assert stats["settings"]["n"] == 4 and stats["settings"]["seed"] == 0
    # the same call of the same teacher, here: each kept response is the decoded sample, before its EOS
    cfg = data_cfg([f"paths.models={models_dir}", *TINY_DEMO, *SMALL])
    path = resolve_path(cfg.teacher.name_or_path, cfg)  # the demo teacher the command built
    tok = load_tokenizer(path, "teacher.name_or_path")
    model = load_model(path, "teacher.name_or_path", "float32", "cpu")
    choose_decoder(model)
    problems = load_problems(cfg.task)[0][:8]
    batch = HFRollout(model, tok).generate([format_prompt(p, cfg.task, tok) for p in problems], 4, 1.0, 1.0, 64, 0)
    texts = tok.batch_decode(
        [
            row[batch.prompt_len :][m[batch.prompt_len :]]
            for row, m in zip(batch.input_ids, batch.response_mask, strict=True)
        ],
        skip_special_tokens=True,
    )
    eos = tok.eos_token_id
    for r in data:
        i = r["problem"] * 4 + r["sample"]
        assert not batch.truncated[i]  # every kept response finished with EOS
        assert r["response"] == texts[i]
        assert r["response_tokens"] == int(batch.response_mask[i].sum()) - 1  # the EOS not counted
        assert (r["question"], r["answer"]) == (problems[r["problem"]].question, problems[r["problem"]].answer)
        assert r["correct"] == check_exact(texts[i], problems[r["problem"]].answer)
        assert eos not in tok(r["response"], add_special_tokens=False)["input_ids"]
    assert stats["dropped"]["truncated"] == int(batch.truncated.sum())
    assert stats["accuracy"] == sum(check_exact(t, problems[i // 4].answer) for i, t in enumerate(texts)) / 32


@pytest.mark.integration
def test_vllm_rollouts_write_the_data_set(tmp_path, models_dir):
    out = opd_data(tmp_path / "run", models_dir, "rollout=vllm", *SMALL, "data.max_repeat_fraction=1")
    assert out.returncode == 0, out.stderr[-3000:]
    data, stats = written(tmp_path / "run")
    check_counts(data, stats, 8, 4)
    assert stats["settings"]["engine"] == "vllm" and stats["dropped"]["repetitive"] == 0


@pytest.mark.integration
def test_every_response_dropped_is_one_line_and_writes_nothing(tmp_path, models_dir):
    """One token at most: a kept response would be an empty one, which is wrong."""
    out = opd_data(
        tmp_path / "run", models_dir, "data.n_problems=2", "data.max_new_tokens=1", "data.drop_incorrect=true"
    )
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]  # after the loading's progress
    assert last.startswith("error: data: every sampled response was dropped (truncated "), out.stderr
    assert last.endswith("): raise data.max_new_tokens") and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "data").exists() and not (tmp_path / "run" / "stats.json").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["data.n=0"], "error: data.n: must be an integer >= 1, got 0"),
        (["data.max_repeat_fraction=0"], "error: data.max_repeat_fraction: must be in (0, 1], got 0.0"),
        (["rollout.temperature=0.5"], "error: rollout.temperature: opd-data teacher-rollouts samples with the data.*"),
        (["teacher.name_or_path=/no/model"], "error: teacher.name_or_path: local model path not found: /no/model"),
    ],
)
def test_bad_input_is_one_line_before_the_output_directory(args, message, tmp_path, models_dir):
    out = opd_data(tmp_path / "run", models_dir, *args)
    assert out.returncode == 2
    assert out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "run").exists()


def test_an_output_directory_that_holds_something_is_refused(tmp_path, models_dir):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / "stats.json").write_text("{}")
    out = opd_data(tmp_path / "run", models_dir)
    assert out.returncode == 2
    assert out.stderr == (
        f"error: hydra.run.dir: {tmp_path / 'run'} is not empty (it holds stats.json); give a new hydra.run.dir\n"
    )
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".hydra", "stats.json"]


def test_an_unknown_data_set_is_a_usage_line():
    out = subprocess.run(
        [sys.executable, "-m", "opd_cli.commands.data", "nope"], capture_output=True, text=True, cwd=REPO, env=CLI_ENV
    )
    assert (
        out.returncode == 2 and out.stderr == "error: usage: opd-data {teacher-rollouts,aligned-prompts} [overrides]\n"
    )
