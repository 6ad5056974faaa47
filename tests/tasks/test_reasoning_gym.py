"""task=rg/<name>: reasoning-gym's procedural problems, made offline, checked by their generator's own score."""

import subprocess
import sys

import pytest

from opd_cli.config.validate import validate
from opd_cli.errors import UserError
from opd_cli.tasks import rg
from opd_cli.tasks.checking import make_checker
from opd_cli.tasks.problems import load_problems, task_config

from ..conftest import CLI_ENV, REPO, SHORT, compose_cfg, metrics
from ..models.tiny import save_model

PRESETS = sorted(p.stem for p in (REPO / "conf/task/rg").glob("*.yaml"))
# models that do not need task=arith (the demo models are built for it); validated offline via hub_answers
MODELS = ["model=qwen2.5-7b-instruct", "teacher=openthinker3"]


def task(*overrides):
    return compose_cfg(list(overrides)).task


def test_the_presets_are_there():
    assert PRESETS == [
        "basic_arithmetic",
        "chain_sum",
        "family_relationships",
        "gsm_symbolic",
        "leg_counting",
        "simple_equations",
    ]


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_validates_and_its_checker_accepts_the_generators_answer_only(preset, hub_answers):
    cfg = compose_cfg([f"task=rg/{preset}", *MODELS])
    validate(cfg)
    train, held = load_problems(cfg.task)
    assert len(held) == cfg.task.n_eval and len(train) > 1000
    check = make_checker(cfg.task)
    golds = sorted({p.answer for p in held})
    for p in held[:20]:
        assert check(f"Let me think.\n\\boxed{{{p.answer}}}", p.answer), (p.question, p.answer)
        assert check(f"\\boxed{{ {p.answer} }}", p.answer)  # the box's content is stripped
        wrong = next(g for g in golds if g.strip().lower() != p.answer.strip().lower())
        assert not check(f"\\boxed{{{wrong}}}", p.answer), (p.answer, wrong)
        assert not check(p.answer, p.answer)  # not in \boxed{}: the template asks for it there
        assert not check(f"\\boxed{{{p.answer}}} then \\boxed{{{wrong}}}", p.answer)  # the last box counts


def test_partial_credit_counts_as_wrong():
    """gsm_symbolic's scorer gives 0.01 to any number that is not the answer; chain_sum's base-style scorer
    gives a share to an answer that contains the gold one: both are wrong here."""
    cfg = task("task=rg/gsm_symbolic")
    data, entries = rg.rg_entries(cfg)
    entry = entries[0]
    wrong = str(int(float(entry["answer"])) + 1)
    assert 0 < data.score_answer(wrong, entry) < 1
    assert not make_checker(cfg)(f"\\boxed{{{wrong}}}", entry["answer"])
    cfg = task("task=rg/basic_arithmetic")  # the package's default scorer: len(gold) / len(answer) when contained
    data, entries = rg.rg_entries(cfg)
    entry = entries[0]
    assert 0 < data.score_answer(f"{entry['answer']} apples", entry) < 1
    assert not make_checker(cfg)(f"\\boxed{{{entry['answer']} apples}}", entry["answer"])


def test_problems_are_deterministic_per_seed_and_held_out_never_trains():
    cfg = task("task=rg/chain_sum")
    train, held = load_problems(cfg)
    rg._generated.cache_clear()  # made again, not read from the cache
    assert load_problems(cfg) == (train, held)
    assert not {p.question for p in train} & {p.question for p in held}
    assert len({p.question for p in train}) == len(train)  # a question made twice is kept once
    other_train, other_held = load_problems(task("task=rg/chain_sum", "task.seed=1"))
    assert [p.question for p in other_held] != [p.question for p in held]
    # a larger size adds training problems; the held-out ones stay
    more_train, more_held = load_problems(task("task=rg/chain_sum", "task.rg.size=3000"))
    assert more_held == held and len(more_train) > len(train)


def test_a_benchmark_preset_and_a_mix_answer():
    """rg/<name> is also a benchmark name (eval.benchmarks, opd-eval tasks); a gold answer the generator did
    not make (a task.mix row's) is compared exactly."""
    cfg = task_config("rg/leg_counting", None, "eval.benchmarks", "eval.benchmark_paths.rg/leg_counting")
    assert cfg.rg.dataset == "leg_counting" and cfg.checker == "reasoning_gym"
    check = make_checker(task("task=rg/family_relationships"))
    assert check("\\boxed{Paris}", "Paris") and not check("\\boxed{paris}", "Paris")
    with pytest.raises(UserError, match=r"^eval\.benchmarks: unknown benchmark 'rg/nope'; choose from: .*rg/chain_sum"):
        task_config("rg/nope", None, "eval.benchmarks", "eval.benchmark_paths.rg/nope")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["task.rg.dataset=chain_summ"],
            "task.rg.dataset: 'chain_summ' is not a reasoning-gym generator; did you mean chain_sum, "
            "decimal_chain_sum? e.g. basic_arithmetic, chain_sum, simple_equations, leg_counting, gsm_symbolic, "
            "family_relationships (106 in all: reasoning_gym.factory.DATASETS)",
        ),
        (
            ["+task.rg.config.max_term=3"],
            "task.rg.config: chain_sum has no option 'max_term'; its options: min_terms, max_terms, min_digits, "
            "max_digits, allow_negation",
        ),
        (
            ["task.rg.config.min_terms=0"],
            "task.rg.config: chain_sum refuses its config (AssertionError: min_terms must be positive)",
        ),
        (["+task.rg.config.seed=3"], "task.rg.config: 'seed' is set by task.seed, not in task.rg.config"),
        (["task.rg.size=0"], "task.rg.size: must be an integer >= 1 (problems to make), got 0"),
        (
            ["task.rg.size=260"],
            "task.rg.size: chain_sum made 255 distinct problems of 260, need more than task.n_eval=256 "
            "(held out; the rest are trained on)",
        ),
        (
            ["task.rg.size=256", "task.n_eval=251"],
            "task.rg.size: chain_sum made 251 distinct problems of 256, need more than task.n_eval=251 "
            "(held out; the rest are trained on)",
        ),
        (
            ["task=arith", "task.name=reasoning_gym", "task.rg.dataset=propositional_logic"],
            "task.rg.dataset: propositional_logic makes problems without one gold answer (problem 0); choose a "
            "generator with one, e.g. basic_arithmetic, chain_sum, simple_equations",
        ),
        (["task.path=rows.jsonl"], "task.path: a reasoning_gym task makes its problems (task.rg); set task.path=null"),
    ],
)
def test_bad_input_is_one_line_naming_the_key(overrides, message, hub_answers):
    """Each on task=rg/chain_sum (a later task=... replaces it)."""
    with pytest.raises(UserError) as err:
        validate(compose_cfg(["task=rg/chain_sum", *MODELS, *overrides]))
    assert str(err.value) == message


def test_the_reasoning_gym_checker_needs_a_reasoning_gym_task():
    with pytest.raises(UserError) as err:
        validate(compose_cfg(["task.checker=reasoning_gym"]))
    assert str(err.value) == (
        "task.checker: reasoning_gym scores with the generator of a task.name=reasoning_gym task (task=rg/<name>); "
        "this task is 'arith': use exact, math_verify or your own function"
    )


@pytest.mark.cli
def test_opd_train_refuses_a_bad_generator_before_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "opd_cli.commands.train", "task=rg/chain_sum", "task.rg.config.min_digits=0",
         f"hydra.run.dir={run_dir}", "logger=none"],
        capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: task.rg.config: chain_sum refuses its config (AssertionError: min_digits must be positive)"
    ]
    assert not run_dir.exists()


@pytest.mark.cli
@pytest.mark.integration
def test_opd_train_one_step_on_a_reasoning_gym_task(tmp_path, tiny_model, tiny_tokenizer):
    """One step and an evaluation of task=rg/chain_sum with a small local model as student and teacher."""
    model = save_model(tmp_path / "model", tiny_model, tiny_tokenizer)
    run_dir = tmp_path / "run"
    args = [f"model.name_or_path={model}", f"teacher.name_or_path={model}", "task=rg/chain_sum"]
    args += ["task.chat_template=false", "trainer.max_steps=1", *SHORT, "eval.every=1", "logger=none"]
    out = subprocess.run(
        [sys.executable, "-m", "opd_cli.commands.train", *args, f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = metrics(run_dir)
    assert any("loss" in r for r in rows) and any("eval/acc" in r for r in rows), rows
