"""``rollout=dataset`` (rollout/dataset.py): the batches of a data set's rows, which rows each step takes
(training/loop.py ``step_batch``), and the one-line refusals of a bad data set or a bad pairing with the loss."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from opd_cli.batch import encode_prompts
from opd_cli.config.validate import validate, validate_evaluate
from opd_cli.dist import Rank
from opd_cli.errors import UserError
from opd_cli.models.packed import response_hidden
from opd_cli.objectives.inputs import token_inputs
from opd_cli.objectives.registry import make_objective
from opd_cli.objectives.student_pass import student_loss_and_metrics
from opd_cli.rollout.dataset import DatasetRollout, open_dataset
from opd_cli.rollout.hf import HFRollout
from opd_cli.tasks.problems import arith_problems
from opd_cli.tasks.prompts import format_prompt
from opd_cli.training.loop import step_batch

from ..config.test_validate import compose_evaluate
from ..conftest import compose_cfg
from .sft_data import write_sft_data

SFT = ["loss=sft", "rollout=dataset"]


def sft_cfg(path, *overrides):
    return compose_cfg([*SFT, f"rollout.path={path}", *overrides])


def engine_of(cfg, model, tokenizer) -> DatasetRollout:
    return DatasetRollout(open_dataset(cfg.rollout), cfg.rollout, cfg.task, tokenizer, HFRollout(model, tokenizer))


def test_rows_are_the_students_prompts_and_the_responses_with_eos(tmp_path, tiny_model, tiny_tokenizer):
    path = write_sft_data(tmp_path / "data", 6)
    cfg = sft_cfg(path, "rollout.max_new_tokens=38")
    engine = engine_of(cfg, tiny_model, tiny_tokenizer)
    problems = arith_problems(0, "train", 256)[:6]
    indices = [2, 0, 5]
    prompts, batch = engine.batch_of(indices)
    # the prompt of a training step: task.template (and the chat template if asked), as format_prompt makes it
    assert prompts == [format_prompt(problems[i], cfg.task, tiny_tokenizer) for i in indices]
    ids, attn = encode_prompts(tiny_tokenizer, prompts)
    P = batch.prompt_len
    assert batch.input_ids[:, :P].equal(ids) and batch.attention_mask[:, :P].equal(attn)
    assert batch.prompt_index.tolist() == [0, 1, 2]
    eos = tiny_tokenizer.eos_token_id
    for row, i in enumerate(indices):
        want = tiny_tokenizer(problems[i].solution, add_special_tokens=False)["input_ids"] + [eos]
        want, cut = want[:38], len(want) > 38
        got = batch.input_ids[row][batch.response_mask[row]].tolist()
        assert got == want
        assert bool(batch.truncated[row]) == cut
        assert batch.attention_mask[row, P:].sum() == len(want)  # the padding after the response is masked
        # nothing sampled these tokens: no sampler log-probs (NaN), 0 outside the response
        assert batch.old_logprobs[row][batch.response_mask[row]].isnan().all()
        assert (batch.old_logprobs[row][~batch.response_mask[row]] == 0).all()
    assert not batch.response_mask[:, :P].any()
    assert batch.truncated.any() and not batch.truncated.all()  # 38 tokens cut some solutions (39 with EOS), not all
    assert engine.decode_responses(batch)[1] == problems[0].solution  # without the EOS


def test_a_cut_response_fills_max_new_tokens_without_eos(tmp_path, tiny_model, tiny_tokenizer):
    cfg = sft_cfg(write_sft_data(tmp_path / "data", 3), "rollout.max_new_tokens=5")
    _, batch = engine_of(cfg, tiny_model, tiny_tokenizer).batch_of([0, 1, 2])
    assert batch.truncated.all()
    assert batch.response_mask.sum(1).tolist() == [5, 5, 5]
    assert not (batch.input_ids[batch.response_mask] == tiny_tokenizer.eos_token_id).any()


def test_rows_with_too_long_prompts_are_left_out(tmp_path, tiny_model, tiny_tokenizer):
    long = "Ann has " + "very " * 200 + "many pens. How many?"
    path = write_sft_data(tmp_path / "data", 3, question=["Q one?", long, "Q three?"])
    engine = engine_of(sft_cfg(path, "rollout.max_prompt_tokens=64"), tiny_model, tiny_tokenizer)
    assert engine.num_rows == 2
    prompts, _ = engine.batch_of([0, 1])
    assert prompts == ["Question: Q one?\nAnswer:", "Question: Q three?\nAnswer:"]


def _rows(prompts: list[str]) -> list[str]:
    return [p.removeprefix("Question: ").removesuffix("\nAnswer:") for p in prompts]


def test_step_rows_are_seeded_epochs_the_same_on_resume_and_split_over_ranks(tmp_path, tiny_model, tiny_tokenizer):
    """``trainer.prompts_per_step * rollout.n`` rows a step (here 3 x 2 = 6 of 10): every row once per epoch,
    a step's rows from the step alone, and two ranks' shares are the one process's batch in halves."""
    n = 10
    questions = [f"q{i}" for i in range(n)]
    path = write_sft_data(tmp_path / "data", n, question=questions)
    cfg = sft_cfg(path, "trainer.prompts_per_step=3", "rollout.n=2", "trainer.seed=7")
    p = SimpleNamespace(rollout=engine_of(cfg, tiny_model, tiny_tokenizer))
    steps = [_rows(step_batch(s, [], p, cfg, Rank())[0]) for s in range(1, 11)]  # 60 rows: 6 epochs
    assert all(len(rows) == 6 for rows in steps)
    order = [q for rows in steps for q in rows]
    epochs = [order[e * n : (e + 1) * n] for e in range(6)]
    assert all(sorted(e) == sorted(questions) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 6 and tuple(questions) not in {tuple(e) for e in epochs}
    assert _rows(step_batch(7, [], p, cfg, Rank())[0]) == steps[6]  # a resumed run sees the same rows
    halves = [step_batch(4, [], p, cfg, Rank(r, 2))[1] for r in (0, 1)]
    whole = step_batch(4, [], p, cfg, Rank())[1]
    got = [h.input_ids[i][h.attention_mask[i].bool()].tolist() for h in halves for i in range(3)]
    assert got == [whole.input_ids[i][whole.attention_mask[i].bool()].tolist() for i in range(6)]
    other_seed = sft_cfg(path, "trainer.prompts_per_step=3", "rollout.n=2", "trainer.seed=8")
    assert _rows(step_batch(1, [], p, other_seed, Rank())[0]) != steps[0]


def test_sft_loss_of_a_batch_is_the_mean_nll_of_its_response_tokens(tmp_path, tiny_model, tiny_tokenizer):
    """From a data set's batch to the loss: token_inputs without a teacher, the sft objective and the student
    pass give the token mean of -log p(y) that one unpadded float64 forward per row gives; diagnostics are
    the student's only (no NaN from the teacher that is not there)."""
    cfg = sft_cfg(write_sft_data(tmp_path / "data", 4), "rollout.max_new_tokens=40")
    _, batch = engine_of(cfg, tiny_model, tiny_tokenizer).batch_of([0, 1, 2, 3])
    x, _ = token_inputs(batch, None, [], cfg.loss)
    model = copy.deepcopy(tiny_model).double()
    with torch.no_grad():
        hidden, _ = response_hidden(model, batch)
        loss, sums = student_loss_and_metrics(hidden, model.lm_head.weight, x, make_objective(cfg.loss), 16)
        nll = []
        for row in range(batch.input_ids.shape[0]):
            real = batch.attention_mask[row].bool()
            ids = batch.input_ids[row][real]
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0], -1)[:-1]
            resp = batch.response_mask[row][real][1:]
            nll += (-logp[resp].gather(-1, ids[1:][resp][:, None]).squeeze(-1)).tolist()
    assert loss.item() == pytest.approx(sum(nll), rel=1e-9)  # loss_weight None: the sum; the loop divides
    means = sums.means()
    assert means["nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-9)
    assert set(means) == {"entropy", "nll", "pg_clipfrac", "pg_clipfrac_lower"}
    assert all(math.isfinite(v) for v in means.values())


# ----------------------------------------------------------------------------- refusals, one line each


def _refused(cfg, check=validate) -> str:
    with pytest.raises(UserError) as e:
        check(cfg)
    return str(e.value)


def test_a_good_pairing_validates(tmp_path):
    validate(sft_cfg(write_sft_data(tmp_path / "data", 4)))


def test_the_data_set_is_refused_in_one_line_naming_the_key(tmp_path):
    assert _refused(compose_cfg(SFT)).startswith("rollout.path: rollout=dataset trains on a data set")
    assert _refused(sft_cfg("''")).startswith("rollout.path: rollout=dataset trains on a data set")
    missing = tmp_path / "nope"
    assert _refused(sft_cfg(missing)) == f"rollout.path: not found: {missing}"
    (tmp_path / "plain").mkdir()
    assert _refused(sft_cfg(tmp_path / "plain")).startswith(
        f"rollout.path: {tmp_path / 'plain'} is not a data set saved with save_to_disk ("
    )
    import datasets

    one = datasets.Dataset.from_dict({"question": ["q"], "response": ["r"]})
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "dict"))
    assert _refused(sft_cfg(tmp_path / "dict")) == (
        f"rollout.path: {tmp_path / 'dict'} holds several splits (train, test); give one split's directory, "
        f"e.g. {tmp_path / 'dict' / 'train'}"
    )
    datasets.Dataset.from_dict({"question": [], "response": []}).save_to_disk(str(tmp_path / "empty"))
    assert _refused(sft_cfg(tmp_path / "empty")) == f"rollout.path: the data set at {tmp_path / 'empty'} has no rows"
    path = write_sft_data(tmp_path / "data", 4)
    assert _refused(sft_cfg(path, "rollout.response_key=completion")) == (
        f"rollout.response_key: the data set at {path} has no column 'completion' (its columns: question, answer, "
        "response, response_tokens, correct, problem, sample)"
    )
    assert _refused(sft_cfg(path, "rollout.question_key=problem")) == (
        f"rollout.question_key: column 'problem' of the data set at {path} holds Value('int64'), not text"
    )
    validate(sft_cfg(path, "rollout.question_key=answer"))  # any text column will do


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["loss=topk_lsm", "rollout=dataset"],
            "loss: 'topk_lsm' distills on the student's own samples, which rollout=dataset does not make (it trains "
            "on a data set's fixed responses); use loss=sft with rollout=dataset, or rollout=hf|vllm",
        ),
        (
            ["loss=sampled_token", "rollout=dataset"],
            "loss: 'sampled_token' distills on the student's own samples",
        ),
        (
            ["loss=sft"],
            "rollout.engine: loss=sft fine-tunes on a data set's responses, not on the student's samples; "
            "use rollout=dataset rollout.path=<dir>",
        ),
        (["loss=sft", "rollout=vllm"], "rollout.engine: loss=sft fine-tunes on a data set's responses"),
        (["rollout.path=data"], "rollout.path: only rollout=dataset reads a data set (rollout.engine is 'hf')"),
        (["rollout.response_key=r"], "rollout.response_key: only rollout=dataset reads a data set"),
        (
            [*SFT, "loss.outcome_weight=1"],
            "loss.outcome_weight: loss=sft has no outcome term; set loss.outcome_weight=0",
        ),
    ],
)
def test_sft_and_the_data_set_engine_go_together(overrides, message, tmp_path):
    path = write_sft_data(tmp_path / "data", 4)
    extra = [f"rollout.path={path}"] if "rollout=dataset" in overrides else []
    assert _refused(compose_cfg([*overrides, *extra])).startswith(message)


def test_sft_needs_no_teacher_model(tmp_path):
    """No teacher is loaded for sft, so its path is not checked."""
    validate(sft_cfg(write_sft_data(tmp_path / "data", 4), f"teacher.name_or_path={tmp_path / 'no_teacher'}"))


def test_opd_eval_refuses_the_data_set_engine():
    got = _refused(compose_evaluate(["rollout=dataset"]), validate_evaluate)
    assert got == "rollout.engine: 'dataset' is not one of: hf, vllm"
