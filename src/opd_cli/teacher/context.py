"""The teacher's own prompt for each example (``teacher.prompt``), and the student as its own teacher (``teacher=self``).

The student samples after its prompt; the teacher scores the very same response tokens after
another prompt: one that carries privileged information the student does not see (on-policy
self-distillation, OPSD: a system prompt, the answer, the worked solution), or the student's
prompt in the teacher's chat template. ``reprompt`` swaps the prompt columns of a rollout batch
and keeps its response columns, so every teacher backend scores the new batch unchanged and its
flat per-token output lines up with the student's.
"""

from __future__ import annotations

import torch

from opd_cli.batch import RolloutBatch, left_pad
from opd_cli.errors import UserError
from opd_cli.tasks.problems import Problem
from opd_cli.tasks.prompts import CHAT_TEMPLATE_FROM, chat_prompt, check_template, problem_question

# teacher.name_or_path: the student is its own teacher
SELF = "self"

# teacher.self_weights: a frozen copy of the student's starting weights, or its current ones
SELF_WEIGHTS = ("initial", "live")

# the names teacher.prompt.question and teacher.prompt.template may use
QUESTION_FIELDS = ("question", "answer", "solution")


def is_self(tc) -> bool:
    return tc.name_or_path == SELF


def is_live(tc) -> bool:
    """The teacher is the student's current weights (``teacher=self teacher.self_weights=live``)."""
    return is_self(tc) and tc.self_weights == "live"


def teacher_model_name(cfg) -> str:
    """The model the teacher is loaded from: the student's starting model for ``teacher=self``."""
    return cfg.model.name_or_path if is_self(cfg.teacher) else cfg.teacher.name_or_path


def differs(tc) -> bool:
    """The teacher's prompt differs from the student's (``teacher.prompt`` sets something)."""
    pc = tc.prompt
    return any(v is not None for v in (pc.system, pc.question, pc.template)) or pc.chat_template_from == "teacher"


def check_teacher_prompt(tc, task_cfg, has_solutions: bool) -> None:
    """``teacher.prompt``'s values: a question template of known placeholders (``{solution}`` only where the
    task's problems have worked solutions), a chat template that exists in the run."""
    pc = tc.prompt
    if pc.chat_template_from not in CHAT_TEMPLATE_FROM:
        raise UserError(
            f"teacher.prompt.chat_template_from: '{pc.chat_template_from}' is not one of: {', '.join(CHAT_TEMPLATE_FROM)}"
        )
    if pc.chat_template_from == "teacher" and not task_cfg.chat_template:
        raise UserError(
            "teacher.prompt.chat_template_from: the teacher's chat template is used only with task.chat_template=true"
        )
    if pc.system is not None and not str(pc.system).strip():
        raise UserError("teacher.prompt.system: is empty; give the system prompt's text or null")
    for key in ("question", "template"):
        template = getattr(pc, key)
        if template is None:
            continue
        check_template(str(template), f"teacher.prompt.{key}", QUESTION_FIELDS, required=None)
        if "{solution}" in template and not has_solutions:
            data = task_cfg.path or task_cfg.dataset or task_cfg.name
            raise UserError(
                f"teacher.prompt.{key}: '{{solution}}' needs worked solutions, which the task's data ({data}) does "
                "not have; name its field with task.solution_key (task=arith has them), or use {question} and {answer}"
            )


def fields(problem: Problem, task_cfg, pc) -> dict[str, str]:
    """The values of the placeholders of ``teacher.prompt``'s templates for ``problem``."""
    out = {
        "question": problem_question(problem, task_cfg),
        "answer": problem.answer,
        "solution": problem.solution or "",
    }
    if pc.question is not None:  # the teacher's question in place of the problem's
        out["question"] = pc.question.format(**out)
    return out


def teacher_prompt(problem: Problem, task_cfg, pc, tokenizer) -> str:
    """The teacher's prompt text for ``problem``: ``teacher.prompt.template`` (else ``task.template``) filled in,
    after ``teacher.prompt.system``, in the chat template when the task uses one (``tokenizer``'s: the teacher's
    under ``teacher.prompt.chat_template_from=teacher``)."""
    text = (pc.template or task_cfg.template).format(**fields(problem, task_cfg, pc))
    return chat_prompt(text, task_cfg, tokenizer, system=pc.system)


def reprompt(batch: RolloutBatch, prompt_ids: torch.Tensor, prompt_attn: torch.Tensor) -> RolloutBatch:
    """The batch's responses after other prompts: ``prompt_ids``/``prompt_attn`` ``[B, Q]``, left-padded, one
    row per sequence. The response columns, their masks and their order are kept as they are."""
    P, (B, Q) = batch.prompt_len, prompt_ids.shape
    zeros = torch.zeros((B, Q))
    tail = {name: getattr(batch, name)[:, P:] for name in ("input_ids", "attention_mask", "response_mask")}
    return RolloutBatch(
        input_ids=torch.cat([prompt_ids, tail["input_ids"]], 1),
        attention_mask=torch.cat([prompt_attn.to(batch.attention_mask.dtype), tail["attention_mask"]], 1),
        response_mask=torch.cat([zeros.bool(), tail["response_mask"]], 1),
        old_logprobs=torch.cat([zeros, batch.old_logprobs[:, P:]], 1),
        truncated=batch.truncated,
        prompt_index=batch.prompt_index,
        prompt_len=Q,
        entropy=None if batch.entropy is None else torch.cat([zeros, batch.entropy[:, P:]], 1),
    )


class TeacherPrompts:
    """Each student prompt's teacher prompt, as token ids; ``view`` is a batch as the teacher scores it."""

    def __init__(self, pairs: dict[str, str], tokenizer) -> None:
        texts = list(pairs.values())
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        self.ids = dict(zip(pairs, ids, strict=True))
        self.texts = pairs
        self.pad = tokenizer.pad_token_id

    def longest(self) -> int:
        return max((len(v) for v in self.ids.values()), default=0)

    def view(self, batch: RolloutBatch, prompts: list[str]) -> RolloutBatch:
        """``batch`` (responses to ``prompts``, indexed by ``prompt_index``) after the teacher's prompts."""
        rows = [self.ids[prompts[int(i)]] for i in batch.prompt_index]
        return reprompt(batch, *left_pad(rows, self.pad))
