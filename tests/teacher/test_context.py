"""The teacher's own prompts (teacher/context.py): scoring after another prompt equals a plain forward of that
prompt and the same response tokens; the live self-teacher gets no gradient and keeps no copy; bad values."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from opd_cli.config.validate import validate
from opd_cli.errors import UserError
from opd_cli.rollout.hf import HFRollout
from opd_cli.tasks.problems import Problem, read_problems
from opd_cli.teacher.context import TeacherPrompts, check_teacher_prompt, reprompt, teacher_prompt
from opd_cli.teacher.hf import HFTeacher

from ..conftest import compose_cfg

# prompts of different lengths (left padding), and teacher prompts of other lengths than theirs
PROMPTS = ["Question: Ann has 12 pens and gets 30 more.\nAnswer:", "Question: 5+7?\nAnswer:"]
TEACHER = {
    PROMPTS[0]: "Add the tens first.\nQuestion: Ann has 12 pens and gets 30 more.\nAnswer:",
    PROMPTS[1]: "Question: 5+7? The answer is 12.\nAnswer:",
}


def plain_logprobs(model, tokenizer, prompt: str, response: list[int]) -> torch.Tensor:
    """log q(. | prompt, response[:t]) at each response token, float64, over the full vocabulary: one
    unpadded sequence, no batching, no position ids given."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + response
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[len(ids) - len(response) - 1 : -1]


def responses(batch) -> list[list[int]]:
    return [row[m].tolist() for row, m in zip(batch.input_ids, batch.response_mask, strict=True)]


@pytest.fixture(scope="module")
def sampled(tiny_model, tiny_tokenizer):
    """3 samples per prompt (some end early: right padding) and the batch as the teacher sees it."""
    batch = HFRollout(tiny_model, tiny_tokenizer).generate(PROMPTS, n=3, temperature=1.0, top_p=1.0,
                                                          max_new_tokens=8, seed=3)  # fmt: skip
    return batch, TeacherPrompts(TEACHER, tiny_tokenizer).view(batch, PROMPTS)


def test_the_teachers_batch_keeps_the_responses_after_its_prompts(sampled, tiny_tokenizer):
    batch, view = sampled
    assert responses(view) == responses(batch)
    assert view.prompt_len != batch.prompt_len
    for row in range(batch.input_ids.shape[0]):
        real = view.input_ids[row][view.attention_mask[row].bool()].tolist()
        prompt = TEACHER[PROMPTS[int(batch.prompt_index[row])]]
        assert tiny_tokenizer.decode(real[: len(real) - len(responses(batch)[row])]) == prompt
    assert torch.equal(view.old_logprobs[view.response_mask], batch.old_logprobs[batch.response_mask])


def test_hf_teacher_after_its_prompts_equals_a_plain_forward(sampled, tiny_model, tiny_tokenizer):
    batch, view = sampled
    support = HFTeacher(copy.deepcopy(tiny_model), micro_batch_size=4, chunk_tokens=5).score(view, 4)
    flat = 0
    for row, response in enumerate(responses(batch)):
        ref = plain_logprobs(tiny_model, tiny_tokenizer, TEACHER[PROMPTS[int(batch.prompt_index[row])]], response)
        n = len(response)
        got = support.sampled_logprob[flat : flat + n].double()
        torch.testing.assert_close(got, ref.gather(-1, torch.tensor(response)[:, None])[:, 0], atol=1e-4, rtol=0)
        torch.testing.assert_close(
            support.topk_logprobs[flat : flat + n].double(), ref.topk(4).values, atol=1e-4, rtol=0
        )
        flat += n
    assert flat == support.sampled_logprob.shape[0]
    # and it is not what the student's prompt gives (the test can fail)
    plain = HFTeacher(copy.deepcopy(tiny_model), micro_batch_size=4, chunk_tokens=5).score(batch, 4)
    assert not torch.allclose(plain.sampled_logprob, support.sampled_logprob, atol=1e-3)


def test_reprompt_keeps_entropy_and_truncation(sampled):
    batch, _ = sampled
    batch.entropy = torch.rand(batch.input_ids.shape) * batch.response_mask
    ids, attn = (
        torch.tensor([[0, 5, 6]] * batch.input_ids.shape[0]),
        torch.tensor([[0, 1, 1]] * batch.input_ids.shape[0]),
    )
    view = reprompt(batch, ids, attn)
    assert torch.equal(view.entropy[view.response_mask], batch.entropy[batch.response_mask])
    assert torch.equal(view.truncated, batch.truncated) and view.prompt_len == 3
    batch.entropy = None


def test_live_teacher_gets_no_gradient_and_keeps_no_copy(tiny_model, tiny_tokenizer, sampled):
    batch, view = sampled
    student = copy.deepcopy(tiny_model).train()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher = HFTeacher(student, micro_batch_size=4, chunk_tokens=5, live=True)
    support = teacher.score(view, 4, keep_hidden=True)
    assert teacher.model is student and student.training  # the same module, back in training mode
    assert all(p.requires_grad for p in student.parameters())  # still trained
    assert not any(t.requires_grad for t in (support.topk_logprobs, support.sampled_logprob, support.hidden))
    head = teacher.head  # the full q's head: a copy, detached, of the head that scored
    assert not head.requires_grad and head.data_ptr() != student.lm_head.weight.data_ptr()
    loss = (student(input_ids=view.input_ids).logits.mean() + (support.hidden @ head.T).mean()).sum()
    loss.backward()  # the student's own pass has a gradient; the teacher's values add none
    assert student.lm_head.weight.grad is not None
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())  # scoring changed nothing
    with torch.no_grad():
        student.lm_head.weight.add_(1.0)  # an optimizer step moves the head ...
    teacher.score(view, 4, keep_hidden=True)
    torch.testing.assert_close(teacher.head, student.lm_head.weight.detach())  # ... the next scoring's copy follows


def test_teacher_prompt_fills_in_the_privileged_information(tiny_tokenizer):
    task = SimpleNamespace(template="Question: {question}\nAnswer:", chat_template=False, question_regex=None,
                           chat_template_kwargs={})  # fmt: skip
    q = Problem(question="5+7?", answer="12", solution="5+7=12")
    pc = SimpleNamespace(system="Add the tens first.", question="{question} Hint: {solution} ({answer})", template=None)
    assert (
        teacher_prompt(q, task, pc, tiny_tokenizer) == "Add the tens first.\nQuestion: 5+7? Hint: 5+7=12 (12)\nAnswer:"
    )
    pc = SimpleNamespace(system=None, question=None, template="{question}\nThe answer is {answer}. Now solve:")
    assert teacher_prompt(q, task, pc, tiny_tokenizer) == "5+7?\nThe answer is 12. Now solve:"
    pc = SimpleNamespace(system=None, question=None, template=None)
    assert teacher_prompt(q, task, pc, tiny_tokenizer) == "Question: 5+7?\nAnswer:"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["teacher=self", "teacher.prompt.question='{question} {hint}'"],
         r"^teacher\.prompt\.question: unknown placeholder '\{hint\}'; the template may use \{question\}, \{answer\}, \{solution\}"),
        (["teacher.prompt.question='{question} {solution}'", "task=dapo_math", "task.path=tests/fixtures/dapo_math.parquet", "task.n_eval=2"],
         r"^teacher\.prompt\.question: '\{solution\}' needs worked solutions, which the task's data \(tests/fixtures/dapo_math\.parquet\) does not have"),
        (["teacher.self_weights=live"], r"^teacher\.self_weights: live weights are the student's own"),
        (["teacher=self", "teacher.self_weights=live", "teacher.backend=vllm"],
         r"^teacher\.backend: a live self-teacher on vllm scores with the rollout's vLLM engine; set rollout=vllm"),
        (["teacher=self", "teacher.self_weights=live", "teacher.backend=vllm", "rollout=vllm",
          "teacher.url=http://localhost:1"], r"^teacher\.url: a teacher server holds its own weights"),
        (["teacher=self", "teacher.self_weights=now"], r"^teacher\.self_weights: 'now' is not one of: initial, live"),
        (["teacher.prompt.chat_template_from=teacher"], r"^teacher\.prompt\.chat_template_from: the teacher's chat template is used only with task\.chat_template=true"),
        (["teacher=self", "teacher.prompt.system=' '"], r"^teacher\.prompt\.system: is empty"),
        (["teacher=self", "teacher.prompt.template='{question'"], r"^teacher\.prompt\.template: a stray brace"),
    ],
)  # fmt: skip
def test_bad_teacher_prompts_are_named(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(compose_cfg(overrides))


def test_a_data_files_worked_solutions_are_read_with_task_solution_key(tmp_path):
    rows = [{"q": "1+1?", "a": 2, "sol": "1+1=2"}, {"q": "2+2?", "a": 4, "sol": "2+2=4"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    problems = read_problems(path, "q", "a", solution_key="sol")
    assert [p.solution for p in problems] == ["1+1=2", "2+2=4"]
    assert read_problems(path, "q", "a")[0].solution is None
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"q": "3?", "a": 3}) + "\n")
    with pytest.raises(UserError, match=r"^task\.path: .*rows\.jsonl line 2: no field 'sol' \(task\.solution_key\)"):
        read_problems(path, "q", "a", solution_key="sol")
    cfg = compose_cfg(["teacher.prompt.question='{question} {solution}'", f"task.path={tmp_path / 'ok.jsonl'}",
                       "task=dapo_math", "task.question_key=q", "task.answer_key=a", "task.solution_key=sol",
                       "task.n_eval=1"])  # fmt: skip
    (tmp_path / "ok.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    check_teacher_prompt(cfg.teacher, cfg.task, has_solutions=bool(cfg.task.solution_key))  # accepted
