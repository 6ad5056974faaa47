"""A problem as the prompt string the student sees (template, optional chat template)."""

from __future__ import annotations

import re

from opd_cli.errors import UserError
from opd_cli.tasks.problems import Problem


def format_prompt(problem: Problem, task_cfg, tokenizer) -> str:
    """The prompt text: ``task.template`` filled in, in the chat template if asked.

    ``task.question_regex`` first takes the problem out of a row that wraps it in its own
    instructions (its group ``question``); a row it does not match keeps its whole text.
    """
    question = problem.question
    if task_cfg.question_regex and (match := re.search(task_cfg.question_regex, question)):
        question = match.group("question")
    try:
        text = task_cfg.template.format(question=question)
    except (IndexError, KeyError, ValueError) as e:
        raise UserError(
            f"task.template: cannot fill in {{question}} ({e}); write literal braces as {{{{ }}}}"
        ) from None
    if not task_cfg.chat_template:
        return text
    if tokenizer.chat_template is None:
        raise UserError("task.chat_template: the student's tokenizer has no chat template")
    kwargs = dict(task_cfg.chat_template_kwargs or {})
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, **kwargs
    )
