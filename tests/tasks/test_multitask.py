"""Multitask runs (tasks/multitask.py, training/build.py): the alternation of tasks, each task's config and
teacher, the routing of each task to its own teacher (each loaded once), and the bad inputs."""

import pytest
import torch

from opd_cli.config.validate import validate
from opd_cli.dist import this_rank
from opd_cli.errors import UserError
from opd_cli.models.loading import load_model, resolve_path
from opd_cli.tasks.multitask import Alternation, task_entries, task_teacher
from opd_cli.training.build import build, with_task
from opd_cli.training.loop import task_problems

from ..conftest import SHORT, TINY_DEMO, compose_cfg

TWO = ["+multitask.tasks.math={task: arith}", "+multitask.tasks.game={task: env_demo, overrides: {n_eval: 8}}"]


def test_equal_weights_alternate_and_each_task_counts_its_own_steps():
    a = Alternation([1.0, 1.0])
    assert [a.task(s) for s in range(1, 7)] == [(0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]


@pytest.mark.parametrize("weights", [[2.0, 1.0], [1.0, 3.0, 0.5], [0.7, 0.0, 0.3]])
def test_each_task_gets_its_weights_share_of_the_steps_spread_evenly(weights):
    a, steps = Alternation(weights), 600
    picks = [a.task(s)[0] for s in range(1, steps + 1)]
    for i, w in enumerate(weights):
        share = w / sum(weights)
        # a smooth weighted round-robin: after any prefix of n steps, each task is within one step of n * share
        for n in range(1, steps + 1, 37):
            assert abs(picks[:n].count(i) - n * share) <= 1.0 + 1e-9, (i, n)
        own = [c for t, c in (a.task(s) for s in range(1, steps + 1)) if t == i]
        assert own == list(range(1, len(own) + 1))  # a task's own step count is consecutive
    # a resumed run (a fresh schedule asked for a later step first) sees the same tasks
    assert [Alternation(weights).task(s) for s in (599, 17, 300)] == [a.task(599), a.task(17), a.task(300)]


def test_a_task_preset_with_overrides_and_each_tasks_teacher():
    cfg = compose_cfg([*TWO, "+multitask.teachers.game=demo:student"])
    (m, math), (g, game) = task_entries(cfg)
    assert (m, math.name, g, game.name, game.n_eval, game.env.name) == ("math", "arith", "game", "env", 8, "demo")
    assert task_teacher(cfg, "math") is cfg.teacher
    t = task_teacher(cfg, "game")
    assert t.name_or_path == "demo:student" and t.backend == cfg.teacher.backend
    assert task_teacher(compose_cfg([*TWO, "+multitask.teachers.game=openthinker3"]), "game").name_or_path != (
        "openthinker3"
    )  # a preset's model, not the preset's name


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (["+multitask.tasks.x={task: chess}"], r"^multitask\.tasks\.x\.task: unknown preset 'chess'; choose from: "),
        (["+multitask.tasks.x={task: arith, colour: red}"], r"^multitask\.tasks\.x: .*colour.* \(keys: task, weight"),
        (
            ["+multitask.tasks.x={task: arith, overrides: {n_evals: 3}}"],
            r"^multitask\.tasks\.x\.overrides: Key 'n_evals' not in 'TaskConfig'",
        ),
        (
            ["+multitask.tasks.x={task: arith, weight: 0}", "+multitask.tasks.y={task: env_demo, weight: 0}"],
            r"^multitask\.tasks: the weights must sum to a positive number",
        ),
        (["+multitask.tasks.x={task: arith, weight: -1}"], r"^multitask\.tasks\.x\.weight: must be a finite number"),
        (
            [*TWO, "+multitask.teachers.chess=demo:teacher"],
            r"^multitask\.teachers\.chess: no task 'chess' in multitask",
        ),
        (["+multitask.teachers.math=demo:teacher"], r"^multitask\.teachers: names teachers, but multitask\.tasks is"),
        ([*TWO, "multitask.mode=random"], r"^multitask\.mode: 'random' is not one of: alternate, mixed"),
        ([*TWO, "+multitask.teachers.game=demo:coach"], r"^multitask\.teachers\.game: 'demo:coach' is not a teacher"),
        ([*TWO, "+multitask.teachers.game=/no/such/model"], r"^multitask\.teachers\.game: '/no/such/model' is not"),
        (
            [*TWO, "+multitask.teachers.game=demo:student", "loss=full_rkl"],
            r"^loss: 'full_rkl' needs the teacher's head, which differs between the tasks' teachers",
        ),
        (
            ["+multitask.tasks.x={task: env_demo, overrides: {env: {max_turns: 0}}}"],
            r"^multitask\.tasks\.x: task\.env\.max_turns: must be an integer >= 1",
        ),
        (
            [
                "+multitask.tasks.a={task: arith}",
                "+multitask.tasks.b={task: arith, overrides: {seed: 1}}",
                "teacher.prompt.system=Hint.",
            ],
            r"^teacher\.prompt: a multitask run's teachers score",
        ),  # fmt: skip
        ([*TWO, "teacher.prompt.system=Hint."], r"^multitask\.tasks\.game: teacher\.prompt: the teacher scores an"),
        (
            [*TWO, "trainer=zero3"],
            r"^multitask\.tasks\.game: trainer: an environment task cannot sample with a ZeRO-3 student",
        ),
        (
            [
                "+multitask.tasks.a={task: arith}",
                "+multitask.tasks.b={task: arith, overrides: {seed: 1}}",
                "multitask.mode=mixed",
                "trainer=zero3",
                "teacher.shard=true",
            ],
            r"^teacher\.shard: multitask\.mode=mixed scores each rank's rows by task",
        ),  # fmt: skip
    ],
)
def test_bad_multitask_settings_are_one_line(overrides, error):
    with pytest.raises(UserError, match=error):
        validate(compose_cfg(overrides))


def test_each_task_is_scored_by_its_own_teacher_each_loaded_once(models_dir):
    """build(): the game task's teacher is demo:student's weights, the math task and a third task that names no
    teacher share the run's teacher (one object: loaded once), and each task has its own prompts and checker."""
    three = [*TWO, "+multitask.tasks.more={task: arith, overrides: {seed: 1}}"]
    cfg = compose_cfg(
        [f"paths.models={models_dir}", *TINY_DEMO, *SHORT, *three, "+multitask.teachers.game=demo:student"]
    )
    entries = task_entries(cfg)
    more = [(n, t, task_teacher(cfg, n), *task_problems(t, 8)) for n, t in entries[1:]]
    first = with_task(cfg, entries[0][1], task_teacher(cfg, "math"))
    p = build(first, this_rank(), torch.device("cpu"), None, *task_problems(first.task, 8), more, "math")
    math, game, other = p.tasks["math"], p.tasks["game"], p.tasks["more"]
    assert math is p and other.teacher is p.teacher and game.teacher is not p.teacher
    student = load_model(resolve_path("demo:student", cfg), "x", "float32", torch.device("cpu"), False, "blas")
    teacher = load_model(resolve_path("demo:teacher", cfg), "x", "float32", torch.device("cpu"), False, "blas")
    for t, want in ((game.teacher, student), (p.teacher, teacher)):
        got = dict(t.model.named_parameters())
        assert all(torch.equal(got[k], v) for k, v in want.named_parameters())
    assert game.episodes is not None and math.episodes is None and other.episodes is None
    assert game.train_prompts[0] == "8" and set(other.train_prompts) != set(math.train_prompts)
    assert game.checker is not math.checker or game.eval_prompts != math.eval_prompts


def test_mixed_batches_score_each_row_with_its_own_tasks_teacher(tiny_model, tiny_tokenizer):
    """multitask.mode=mixed: the routed support equals, row by row, the support of the whole batch scored by
    the teacher of that row's task (two different teachers, rows of the two tasks interleaved)."""
    import copy
    from types import SimpleNamespace

    from opd_cli.rollout.hf import HFRollout
    from opd_cli.teacher.hf import HFTeacher
    from opd_cli.training.loop import teacher_scores

    from ..conftest import perturbed_copy

    a, b = HFTeacher(copy.deepcopy(tiny_model), 4, 16), HFTeacher(perturbed_copy(tiny_model, 0.2), 4, 16)
    prompts = ["Question: 12+30?\nAnswer:", "Q: 7 + 8\nA:", "Question: 45+21?\nAnswer:", "Q: 1 + 1\nA:"]
    routes = {prompts[0]: "math", prompts[1]: "sums", prompts[2]: "math", prompts[3]: "sums"}
    p = SimpleNamespace(routes=routes, tasks={"math": SimpleNamespace(teacher=a), "sums": SimpleNamespace(teacher=b)})
    batch = HFRollout(tiny_model, tiny_tokenizer).generate(prompts, 2, 1.0, 1.0, 10, seed=0)
    got = teacher_scores(p, batch, prompts, 4, False)
    whole = {"math": a.score(batch, 4), "sums": b.score(batch, 4)}
    lengths = batch.response_mask.sum(1).tolist()
    start = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for row, i in enumerate(batch.prompt_index.tolist()):
        want, rows = whole[routes[prompts[i]]], slice(start[row], start[row + 1])
        for field in ("topk_ids", "topk_logprobs", "sampled_logprob", "entropy"):
            torch.testing.assert_close(getattr(got, field)[rows], getattr(want, field)[rows], atol=1e-5, rtol=0)
    assert not torch.allclose(whole["math"].sampled_logprob, whole["sums"].sampled_logprob)  # the teachers differ


def test_merged_supports_must_cover_every_row_once():
    from opd_cli.batch import TeacherSupport, merge_supports

    def support(values):
        t = torch.tensor(values, dtype=torch.float)
        return TeacherSupport(t[:, None].long(), t[:, None], t, t)

    merged = merge_supports([([1], support([5, 6])), ([0, 2], support([1, 2, 3]))], [2, 2, 1])
    assert merged.sampled_logprob.tolist() == [1, 2, 5, 6, 3] and merged.hidden is None
    with pytest.raises(ValueError, match="every row of the batch once"):
        merge_supports([([0], support([1, 2]))], [2, 2])
