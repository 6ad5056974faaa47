"""task.mix: each step's prompts drawn from several sources with given weights, a function of (seed, step)."""

import math
import subprocess

import pytest

from opd_cli.config.validate import check_mix
from opd_cli.errors import UserError
from opd_cli.tasks.problems import mix_weights
from opd_cli.training.data import Mix, mix_counts, step_prompts

from ..conftest import CLI_ENV, REPO, cli_argv, compose_cfg, metrics

A = [f"a{i}" for i in range(50)]
B = [f"b{i}" for i in range(7)]
C = [f"c{i}" for i in range(3)]


def test_realised_shares_match_the_weights_within_a_binomial_bound():
    weights, per_step, steps = [0.5, 0.3, 0.2], 16, 400
    mix = Mix([A, B, C], weights, per_step, seed=42)
    totals = [0, 0, 0]
    for step in range(1, steps + 1):
        prompts, counts = mix.step(step)
        assert len(prompts) == per_step and sum(counts) == per_step
        assert [sum(p[0] == s for p in prompts) for s in "abc"] == counts
        totals = [t + c for t, c in zip(totals, counts, strict=True)]
    n = per_step * steps
    for total, w in zip(totals, weights, strict=True):
        assert abs(total / n - w) < 4 * math.sqrt(w * (1 - w) / n)  # 4 standard deviations


def test_a_step_depends_on_seed_and_step_alone_so_a_resume_sees_the_same_prompts():
    weights = [0.6, 0.4]
    full = Mix([A, B], weights, 8, seed=7)
    run = [full.step(s) for s in range(1, 21)]
    resumed = Mix([A, B], weights, 8, seed=7)  # a fresh process, asked from step 11 on
    assert [resumed.step(s) for s in range(11, 21)] == run[10:]
    assert Mix([A, B], weights, 8, seed=7).step(15) == run[14]  # any step, asked first
    assert Mix([A, B], weights, 8, seed=8).step(15) != run[14]
    assert mix_counts(weights, 8, 3, 7) == run[2][1]


def test_each_source_is_read_in_seeded_epochs_without_repeats_within_one():
    mix = Mix([A, B], [0.5, 0.5], 4, seed=0)
    seen_b = [q for s in range(1, 40) for q in mix.step(s)[0] if q.startswith("b")]
    for e in range(len(seen_b) // len(B)):
        assert sorted(seen_b[e * len(B) : (e + 1) * len(B)]) == sorted(B)


def test_the_task_alone_is_source_zero_with_its_own_seed():
    """A mix whose other sources are never drawn (weight ~0) gives the task's prompts as step_prompts does."""
    mix = Mix([A, B], [1.0, 0.0], 8, seed=3)
    for step in (1, 2, 9):
        assert mix.step(step)[0] == step_prompts(A, 8, step, 3)


def test_metrics_name_each_source():
    mix = Mix([A, B], [0.75, 0.25], 4, seed=0, names=["task", "aligned"])
    assert mix.metrics([3, 1]) == {"data/mix_task": 0.75, "data/mix_aligned": 0.25}


@pytest.fixture
def two_files(tmp_path):
    for name in ("aligned", "other"):
        (tmp_path / f"{name}.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n')
    return tmp_path


def test_hydra_list_syntax_composes_into_named_weighted_sources(two_files):
    a, o = two_files / "aligned.jsonl", two_files / "other.jsonl"
    cfg = compose_cfg([f"task.mix=[{{path: {a}, weight: 0.25}},{{path: {o}, weight: 0.5, name: ood}}]"])
    assert mix_weights(cfg.task) == (["task", "aligned", "ood"], [0.25, 0.25, 0.5])
    check_mix(cfg)


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ("[{{path: {a}, weight: 0}}]", r"^task\.mix\.0\.weight: must be in \(0, 1\)"),
        ("[{{path: {a}, weight: 0.6}},{{path: {a}, weight: 0.4, name: x}}]", r"^task\.mix: the weights add up to 1"),
        ("[{{path: {a}, weight: 0.2}},{{path: {a}, weight: 0.2}}]", r"^task\.mix\.1\.name: 'aligned'"),
        ("[{{path: {a}, weight: 0.2, name: task}}]", r"^task\.mix\.0\.name: 'task'"),
        ("[{{path: {d}/missing.jsonl, weight: 0.2}}]", r"^task\.mix\.0\.path: file not found"),
    ],
)
def test_bad_mixes_are_refused_naming_the_key(two_files, mix, message):
    cfg = compose_cfg(["task.mix=" + mix.format(a=two_files / "aligned.jsonl", d=two_files)])
    with pytest.raises(UserError, match=message):
        check_mix(cfg)


def test_a_mix_is_refused_with_a_data_set_rollout(two_files):
    cfg = compose_cfg([f"task.mix=[{{path: {two_files / 'aligned.jsonl'}, weight: 0.5}}]", "rollout=dataset"])
    with pytest.raises(UserError, match=r"^task\.mix: .*rollout=dataset"):
        check_mix(cfg)


@pytest.mark.cli
def test_two_steps_on_the_demo_with_a_mix_log_the_realised_shares(tmp_path, models_dir):
    rows = [f'{{"question": "Zed has {a} pens and gets {b} more. How many pens?", "answer": "{a + b}"}}' for a, b in
            [(11, 12), (23, 34), (45, 21), (30, 30)]]  # fmt: skip
    (tmp_path / "aligned.jsonl").write_text("\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    argv = cli_argv(run_dir, models_dir, "trainer.max_steps=2", "logger=none", "eval.n_problems=2", "eval.k=1")
    argv.append(f"task.mix=[{{path: {tmp_path / 'aligned.jsonl'}, weight: 0.5}}]")
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [m for m in metrics(run_dir) if m["step"] > 0]
    assert len(steps) == 2
    expected = [mix_counts([0.5, 0.5], 4, s, 42) for s in (1, 2)]
    for m, (task, aligned) in zip(steps, expected, strict=True):
        assert (m["data/mix_task"], m["data/mix_aligned"]) == (task / 4, aligned / 4)


def test_other_commands_refuse_the_training_only_task_keys(two_files):
    from hydra import compose, initialize_config_dir

    from opd_cli.config.schema import register_configs
    from opd_cli.config.validate import validate_aligned, validate_data

    register_configs()
    mix = f"task.mix=[{{path: {two_files / 'aligned.jsonl'}, weight: 0.5}}]"
    for name, check in (("data_teacher_rollouts", validate_data), ("data_aligned_prompts", validate_aligned)):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfgs = [compose(config_name=name, overrides=[o]) for o in (mix, "task.chat_template_from=teacher")]
        with pytest.raises(UserError, match=r"^task\.mix: only opd-train mixes"):
            check(cfgs[0])
        with pytest.raises(UserError, match=r"^task\.chat_template_from: only opd-train"):
            check(cfgs[1])


@pytest.mark.integration
def test_a_resumed_mixed_run_draws_what_the_uninterrupted_run_drew(tmp_path, models_dir):
    rows = [f'{{"question": "Zed has {a} pens and gets 11 more. How many pens?", "answer": "{a + 11}"}}' for a in
            range(10, 17)]  # fmt: skip
    (tmp_path / "aligned.jsonl").write_text("\n".join(rows) + "\n")
    mix = f"task.mix=[{{path: {tmp_path / 'aligned.jsonl'}, weight: 0.4}}]"
    short = ["logger=none", "eval.n_problems=2", "eval.k=1", "trainer.save_every=2", mix]
    full, part = tmp_path / "full", tmp_path / "part"
    for run_dir, steps in ((full, 4), (part, 2)):
        out = subprocess.run(cli_argv(run_dir, models_dir, f"trainer.max_steps={steps}", *short),
                             capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=600)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
    argv = [*cli_argv(part, models_dir, "trainer.max_steps=4", *short), "trainer.resume=true"]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    keys = ("data/mix_task", "data/mix_aligned", "loss", "entropy")
    a = [{k: m[k] for k in keys} for m in metrics(full) if m["step"] > 0]
    b = [{k: m[k] for k in keys} for m in metrics(part) if m["step"] > 2]
    assert b == [pytest.approx(x, rel=1e-4, abs=1e-6) for x in a[2:]]
