"""Teacher-aligned prompt selection: the ranking (embeddings -> order), the real embedding model on texts
whose order is obvious, and the refusals of opd-data aligned-prompts."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from opd_cli.errors import UserError
from opd_cli.tasks.alignment import (
    BUNDLED_MODEL,
    keep_count,
    load_embedder,
    model_path,
    nested_row,
    ranking,
    read_texts,
    similarity_scores,
)
from opd_cli.tasks.problems import read_problems

from ..conftest import CLI_ENV, REPO


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_candidates_are_ranked_by_their_nearest_reference_vector():
    reference = torch.tensor([unit(0), unit(90)])
    # angles to the nearest reference vector: 10, 40, 5 (to 90), 45 (a tie), 90 (to 90)
    candidates = torch.tensor([unit(10), unit(40), unit(95), unit(45), unit(180)])
    scores = similarity_scores(candidates, reference)
    assert scores.tolist() == pytest.approx([math.cos(math.radians(a)) for a in (10, 40, 5, 45, 90)], abs=1e-6)
    assert ranking(scores) == [2, 0, 1, 3, 4]


def test_top_m_averages_the_m_nearest_and_length_does_not_matter():
    reference = torch.tensor([unit(0), unit(20), unit(180)])
    candidates = torch.tensor([[3 * x for x in unit(10)], unit(0)])  # not normalized
    top1, top2 = similarity_scores(candidates, reference, 1), similarity_scores(candidates, reference, 2)
    assert top1.tolist() == pytest.approx([math.cos(math.radians(10)), 1.0], abs=1e-6)
    assert top2.tolist() == pytest.approx([math.cos(math.radians(10)), (1 + math.cos(math.radians(20))) / 2], abs=1e-6)
    assert ranking(top1) == [1, 0] and ranking(top2) == [0, 1]  # m changes the order
    assert similarity_scores(candidates, reference, 10).shape == (2,)  # m above the reference's size: all of it


def test_ties_keep_the_candidates_order_and_the_kept_count_rounds_up():
    assert ranking(torch.tensor([0.5, 0.9, 0.5, 0.9])) == [1, 3, 0, 2]
    assert keep_count(10, 0.25, None) == 3 and keep_count(10, 1.0, None) == 10 and keep_count(10, 0.3, None) == 3
    assert keep_count(10, 0.5, 4) == 4 and keep_count(10, None, 40) == 10


@pytest.mark.parametrize(
    ("question_key", "answer_key"), [("question", "answer"), ("prompt.0.content", "reward_model.ground_truth")]
)
def test_kept_rows_read_back_with_the_task_keys(tmp_path, question_key, answer_key):
    file = tmp_path / "kept.jsonl"
    file.write_text(json.dumps(nested_row(question_key, answer_key, "What is 2+2?", "4")) + "\n")
    [problem] = read_problems(file, question_key, answer_key)
    assert (problem.question, problem.answer) == ("What is 2+2?", "4")


def test_reference_file_refusals(tmp_path):
    with pytest.raises(UserError, match=r"^reference\.path: file not found"):
        read_texts(str(tmp_path / "none.jsonl"), "question")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match=r"^reference\.path: .*empty\.jsonl has no prompts"):
        read_texts(str(tmp_path / "empty.jsonl"), "question")
    (tmp_path / "other.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(
        UserError, match=r"^reference\.path: .* line 1: no field 'question' \(reference\.question_key\)"
    ):
        read_texts(str(tmp_path / "other.jsonl"), "question")


def test_an_embedding_model_not_found_offline_is_refused(tmp_path):
    assert (model_path(BUNDLED_MODEL) + "/").endswith("/model/")
    with pytest.raises(UserError, match=r"^embedding\.model: 'no-such-org/no-such-model' is not a local directory"):
        model_path("no-such-org/no-such-model")


MATH = [
    "Solve for x: 3x + 5 = 20.",
    "What is the derivative of x^2 + 3x?",
    "Find the sum of the first 100 positive integers.",
]
CANDIDATES = [
    "How long should I bake a loaf of sourdough bread?",  # cooking
    "Compute the integral of 2x from 0 to 3.",  # math
    "Who won the football world cup in 2014?",  # sports
    "If 2y - 4 = 10, what is y?",  # math
    "What is the best way to season a cast iron pan?",  # cooking
]


def test_the_bundled_model_ranks_math_above_cooking_and_sports():
    model = load_embedder(BUNDLED_MODEL, "cpu")
    emb = model.encode(CANDIDATES + MATH, convert_to_tensor=True)
    scores = similarity_scores(emb[: len(CANDIDATES)], emb[len(CANDIDATES) :])
    assert set(ranking(scores)[:2]) == {1, 3}, scores.tolist()
    assert min(scores[1], scores[3]) > max(scores[0], scores[2], scores[4]) + 0.1


def aligned(tmp_path, *args):
    cmd = [sys.executable, "-m", "opd_cli.commands.data", "aligned-prompts", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=600)


@pytest.mark.cli
def test_aligned_prompts_keeps_the_math_problems_and_writes_every_output(tmp_path):
    rows = [{"question": q, "answer": str(i)} for i, q in enumerate(CANDIDATES * 2)]  # 10: 2 held out
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ref.jsonl").write_text("".join(json.dumps({"q": q}) + "\n" for q in MATH))
    common = ["task.name=hub", f"task.path={tmp_path / 'task.jsonl'}", "task.n_eval=2", "device=cpu"]
    out = aligned(tmp_path, *common, f"reference.path={tmp_path / 'ref.jsonl'}", "reference.question_key=q",
                  "select.fraction=0.25", f"hydra.run.dir={tmp_path / 'out'}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    kept = read_problems(tmp_path / "out" / "problems.jsonl", "question", "answer")
    assert len(kept) == 2 and {p.question for p in kept} <= {CANDIDATES[1], CANDIDATES[3]}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["candidates"] == 8 and stats["kept"] == 2
    assert stats["similarity_kept"]["min"] >= stats["similarity"]["median"]
    scores = [json.loads(line) for line in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    assert [s["rank"] for s in scores] == list(range(8)) and sum(s["kept"] for s in scores) == 2
    # refusals: one line, exit 2, before the output directory exists
    (tmp_path / "french.jsonl").write_text('{"q": "Translate good morning into French."}\n')
    for args, message in [
        ([f"reference.path={tmp_path / 'ref.jsonl'}", "select.fraction=1.5"], r"^error: select\.fraction: must be"),
        ([f"reference.path={tmp_path / 'ref.jsonl'}", "select.fraction=0"], r"^error: select\.fraction: must be"),
        (["reference.question_key=q"], r"^error: reference\.path: give the teacher's"),
        ([f"reference.path={tmp_path / 'ref.jsonl'}"], r"^error: reference\.path: .* no field 'question'"),
        ([f"reference.path={tmp_path / 'ref.jsonl'}", "reference.question_key=q", "embedding.model=/nonexistent"],
         r"^error: embedding\.model: '/nonexistent' is not a local directory"),
    ]:  # fmt: skip
        out = aligned(tmp_path, *common, *args, f"hydra.run.dir={tmp_path / 'refused'}")
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, (args, out.stderr[-2000:])
        assert re.search(message, lines[0]), lines[0]
        assert not (tmp_path / "refused").exists()
    # a reference set that does not overlap the task: refused in one line, with no output written
    out = aligned(tmp_path, *common, f"reference.path={tmp_path / 'french.jsonl'}", "reference.question_key=q",
                  "select.min_similarity=0.6", f"hydra.run.dir={tmp_path / 'none'}")  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: select.min_similarity:"), out.stderr
    assert not (tmp_path / "none" / "problems.jsonl").exists()
