"""Rollout samples (training/samples.py) through the real rollout engine and teacher on a tiny model:
the text is the engine's decoding, the log-probs are the batch's and the teacher's, the verdict is the
checker's; and samples.jsonl on resume keeps only the steps up to the checkpoint."""

import json

import pytest
import torch

from opd_cli.rollout.hf import HFRollout
from opd_cli.tasks.checking import make_checker
from opd_cli.tasks.problems import arith_problems
from opd_cli.tasks.prompts import format_prompt
from opd_cli.teacher.hf import HFTeacher
from opd_cli.training.evaluation import evaluate
from opd_cli.training.logger import MetricsLogger
from opd_cli.training.samples import Recording, SampleLog, pick_rows

from ..conftest import compose_cfg, perturbed_copy


@pytest.fixture(scope="module")
def cfg():
    return compose_cfg(["logger=none", "logger.samples_per_step=3", "logger.samples_tokens=5"])


def read(run_dir):
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_pick_rows_spreads_over_the_prompts():
    index = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert pick_rows(index, 2) == [0, 3]
    assert pick_rows(index, 4) == [0, 1, 3, 6]  # each prompt's first, then the first prompt's second
    assert pick_rows(index, 20) == list(range(9))
    assert pick_rows(torch.tensor([0, 1]), 0) == []


def test_training_samples_are_the_decoded_rollout(tmp_path, cfg, tiny_model, tiny_tokenizer):
    problems = arith_problems(0, "train", 64)[:3]
    prompts = [format_prompt(q, cfg.task, tiny_tokenizer) for q in problems]
    answers = {q: p.answer for q, p in zip(prompts, problems, strict=True)}
    checker = make_checker(cfg.task)
    engine = HFRollout(tiny_model, tiny_tokenizer)
    batch = engine.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=3)
    support = HFTeacher(perturbed_copy(tiny_model), micro_batch_size=4, chunk_tokens=64).score(batch, 4)
    logger = MetricsLogger(tmp_path, cfg.logger, {}, None)
    samples = SampleLog(cfg.logger, logger, checker, lambda: answers)
    assert samples.due(10) and not samples.due(7)  # logger.samples_every: 10
    samples.train(10, prompts, batch, support, engine)
    logger.close()

    texts = engine.decode_responses(batch)  # what outcome_scores hands the checker
    rows = read(tmp_path)
    assert [r["prompt"] for r in rows] == prompts  # 3 samples: one response of each prompt
    flat = torch.cat([torch.zeros(1, dtype=torch.long), batch.response_mask.sum(1).cumsum(0)])
    for r, row in zip((0, 2, 4), rows, strict=True):
        assert row["step"] == 10 and row["phase"] == "train"
        assert row["response"] == texts[r] and row["answer"] == problems[r // 2].answer
        assert row["correct"] == checker(texts[r], row["answer"])
        mask = batch.response_mask[r]
        assert row["length"] == int(mask.sum()) and row["truncated"] == bool(batch.truncated[r])
        student = batch.old_logprobs[r][mask].double()
        teacher = support.sampled_logprob[flat[r] : flat[r + 1]].double()
        assert row["student_logprob_mean"] == pytest.approx(student.mean().item())
        assert row["teacher_logprob_mean"] == pytest.approx(teacher.mean().item())
        assert row["teacher_logprob_mean"] != pytest.approx(row["student_logprob_mean"])  # another model
        assert row["token_ids"] == batch.input_ids[r][mask][:5].tolist()  # logger.samples_tokens: 5
        assert row["student_logprobs"] == pytest.approx(student[:5].tolist())
        assert row["teacher_logprobs"] == pytest.approx(teacher[:5].tolist())
        assert tiny_tokenizer.decode(batch.input_ids[r][mask], skip_special_tokens=True) == row["response"]


def test_evaluation_samples_come_from_the_evaluation(tmp_path, cfg, tiny_model, tiny_tokenizer):
    """The evaluation samples through a Recording: the same accuracy as the engine itself, and its first
    responses become eval rows (no teacher scores there)."""
    problems = arith_problems(0, "train", 64)[-4:]
    prompts = [format_prompt(q, cfg.task, tiny_tokenizer) for q in problems]
    checker = make_checker(cfg.task)
    engine = HFRollout(tiny_model, tiny_tokenizer)
    recording = Recording(engine)
    acc = evaluate(recording, problems, prompts, checker, cfg.eval, 5)
    assert acc == evaluate(engine, problems, prompts, checker, cfg.eval, 5)
    assert recording.prompts == prompts and len(recording.texts) == len(prompts) * cfg.eval.k
    logger = MetricsLogger(tmp_path, cfg.logger, {}, None)
    answers = {q: p.answer for q, p in zip(prompts, problems, strict=True)}
    SampleLog(cfg.logger, logger, checker, dict).eval(0, recording, answers)
    logger.close()
    rows = read(tmp_path)
    k = cfg.eval.k
    assert [r["response"] for r in rows] == [recording.texts[i * k] for i in range(3)]
    assert all(r["phase"] == "eval" and r["step"] == 0 and r["teacher_logprob_mean"] is None for r in rows)
    assert [r["answer"] for r in rows] == [p.answer for p in problems[:3]]


def test_the_teachers_evaluation_samples_carry_the_teachers_logprobs(tmp_path, cfg, tiny_model, tiny_tokenizer):
    """At ``eval_teacher`` the teacher samples: its recorded log-probs are the teacher's, the student's are null."""
    problems = arith_problems(0, "train", 64)[-2:]
    prompts = [format_prompt(q, cfg.task, tiny_tokenizer) for q in problems]
    checker = make_checker(cfg.task)
    recording = Recording(HFRollout(perturbed_copy(tiny_model), tiny_tokenizer))
    evaluate(recording, problems, prompts, checker, cfg.eval, 5)
    logger = MetricsLogger(tmp_path, cfg.logger, {}, None)
    answers = {q: p.answer for q, p in zip(prompts, problems, strict=True)}
    SampleLog(cfg.logger, logger, checker, dict).eval(0, recording, answers, "eval_teacher", by_teacher=True)
    logger.close()
    rows = read(tmp_path)
    _, batch, _ = recording.first
    first = batch.old_logprobs[0][batch.response_mask[0]].double()
    assert rows[0]["phase"] == "eval_teacher" and rows[0]["student_logprob_mean"] is None
    assert rows[0]["teacher_logprob_mean"] == pytest.approx(first.mean().item())
    assert rows[0]["teacher_logprobs"] == pytest.approx(first[:5].tolist()) and rows[0]["student_logprobs"] is None


def test_resume_drops_the_samples_after_the_checkpoint(tmp_path, cfg):
    old = [{"step": s, "phase": "train", "response": str(s)} for s in (0, 2, 4, 6)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old) + '{"step": 8, "resp')
    logger = MetricsLogger(tmp_path, cfg.logger, {}, 4)
    assert read(tmp_path) == old[:3]  # steps 5 on are redone; the half-written line goes too
    logger.samples(6, [{"step": 6, "phase": "train", "response": "new"}])
    logger.close()
    assert read(tmp_path) == [*old[:3], {"step": 6, "phase": "train", "response": "new"}]


def test_no_samples_file_when_samples_are_off(tmp_path):
    logger = MetricsLogger(tmp_path, compose_cfg(["logger=none", "logger.samples_every=0"]).logger, {}, None)
    logger.samples(1, [{"step": 1}])
    logger.close()
    assert not (tmp_path / "samples.jsonl").exists()
