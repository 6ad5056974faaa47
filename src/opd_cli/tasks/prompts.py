"""A problem as the prompt string the student sees (template, optional chat template)."""

from __future__ import annotations

import re
import string

from opd_cli.errors import UserError
from opd_cli.tasks.problems import Problem

# the names ``task.template`` may use: what ``format_prompt`` fills in
TEMPLATE_FIELDS = ("question",)


def check_template(
    template: str,
    key: str = "task.template",
    fields: tuple[str, ...] = TEMPLATE_FIELDS,
    required: str | None = "question",
) -> None:
    """``template`` is a ``str.format`` string whose placeholders are among ``fields`` (``required``, if
    given, at least once); a literal brace is written twice (``\\boxed{{}}``)."""
    allowed = ", ".join(f"{{{name}}}" for name in fields)
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:  # a single '{' or '}'
        raise UserError(
            f"{key}: a stray brace ({e}); the template may use {allowed}, and a literal brace is written {{{{ or }}}}"
        ) from None
    for name in names:
        if name not in fields:
            raise UserError(
                f"{key}: unknown placeholder '{{{name}}}'; the template may use {allowed} "
                "(a literal brace is written {{ or }})"
            )
    if required is not None and required not in names:
        raise UserError(f"{key}: must contain '{{{required}}}'")
    try:  # a conversion or format spec that cannot fill in a string, e.g. {question:d}
        template.format(**dict.fromkeys(fields, ""))
    except (IndexError, KeyError, ValueError, AttributeError, TypeError) as e:
        what = f"{{{required}}}" if required else "its placeholders"
        raise UserError(f"{key}: cannot fill in {what} ({e}); the template may use {allowed}") from None


def problem_question(problem: Problem, task_cfg) -> str:
    """The problem's question: ``task.question_regex``'s group ``question`` takes the problem out of a row
    that wraps it in its own instructions; a row it does not match keeps its whole text."""
    if task_cfg.question_regex and (match := re.search(task_cfg.question_regex, problem.question)):
        return match.group("question")
    return problem.question


def format_prompt(
    problem: Problem, task_cfg, tokenizer, chat_template_key: str = "task.chat_template", system: str | None = None
) -> str:
    """The prompt text: ``task.template`` filled in with the problem's question, in the chat template if asked.

    ``chat_template_key`` is the key that asks for the chat template in the running command
    (opd-eval's is the top-level ``chat_template``), for the error message. ``system`` is a system
    prompt (``chat_prompt``).
    """
    try:
        text = task_cfg.template.format(question=problem_question(problem, task_cfg))
    except (IndexError, KeyError, ValueError, AttributeError, TypeError):
        check_template(task_cfg.template)  # one line saying what is wrong
        raise
    return chat_prompt(text, task_cfg, tokenizer, chat_template_key, system)


def chat_prompt(
    text: str, task_cfg, tokenizer, chat_template_key: str = "task.chat_template", system: str | None = None
) -> str:
    """``text`` as the user's message in the chat template, if ``task.chat_template`` asks for it.

    ``system`` is a system prompt: a system message in the chat template, or its own line before
    ``text`` without one (the teacher's privileged context, ``teacher.prompt.system``).
    """
    if not task_cfg.chat_template:
        return text if system is None else f"{system}\n{text}"
    if tokenizer.chat_template is None:
        raise UserError(
            f"{chat_template_key}: the model's tokenizer has no chat template; set {chat_template_key}=false "
            "or use a model that has one"
        )
    kwargs = dict(task_cfg.chat_template_kwargs or {})
    messages = [] if system is None else [{"role": "system", "content": system}]
    return tokenizer.apply_chat_template(
        [*messages, {"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, **kwargs
    )


# task.chat_template_from: whose tokenizer's chat template wraps the student's prompts
CHAT_TEMPLATE_FROM = ("student", "teacher")


def with_chat_template(tokenizer, other):
    """``tokenizer`` with ``other``'s chat template (``task.chat_template_from=teacher``): the student's
    tokenizer, which tokenizes and decodes as before, formatting prompts the way the teacher was trained.
    The checkpoints then save the student's tokenizer with that template."""
    if other.chat_template is None:
        raise UserError(
            "task.chat_template_from: the teacher's tokenizer has no chat template; set task.chat_template_from=student"
        )
    tokenizer.chat_template = other.chat_template
    return tokenizer
