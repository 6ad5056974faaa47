"""Every command the README shows runs as written, in short form.

The commands are read from the README's ``bash`` blocks; each has an entry in ``PLAN`` (a README
command without one fails the test, so a new example cannot go untested):
- ``run``: run as written, with the short-form settings appended (the tiny demo, one step, a tiny
  evaluation; later overrides win) and paths that exist here put in for placeholders; exit 0;
- ``refused``: needs what this machine has not (the hub): exit 2 and one line matching the pattern;
- ``covered``: run as written by the named test (vLLM, many ranks, SLURM, make bench, the whole suite);
- ``gpu``: needs GPUs this machine has not.
"""

import re
import subprocess
import sys

import pytest

from .conftest import CLI_ENV, REPO, SHORT, TINY_DEMO

pytestmark = pytest.mark.integration

HUB_OFFLINE = (
    r"^error: model\.name_or_path: cannot load 'Qwen/Qwen2\.5-7B-Instruct': it is not in the local Hugging Face cache"
)
TEACHER_HUB_OFFLINE = (
    r"^error: teacher\.name_or_path: cannot load 'Qwen/Qwen3-8B': it is not in the local Hugging Face cache"
)
PLAN = {
    "make multitask-demo": ("covered", "tests/commands/test_multitask.py::test_the_demo_multitask_experiment_runs"),
    "opd-train task=env_demo rollout.max_new_tokens=128 eval.max_new_tokens=128": (
        "covered", "tests/commands/test_env_task.py::test_hf_episodes_train_and_log_per_episode_metrics"),
    "opd-train '+multitask.tasks.math={task: arith}' '+multitask.tasks.game={task: env_demo}' '+multitask.teachers.game=demo:student'": (
        "covered", "tests/commands/test_multitask.py::test_two_tasks_alternate_with_their_own_metrics_and_evaluation"),
    "make run": ("covered", "tests/commands/test_readme.py::test_every_readme_command_runs_as_written (opd-train)"),
    "make test": ("covered", ".ci/run"),
    "opd-train loss=sampled_token trainer.max_steps=20": ("run", "base"),
    "opd-train loss=topk_lsm loss.k=4 rollout.top_p=0.9": ("run", "new"),
    "opd-train -m loss=topk_lsm loss.k=1,4,16,64": ("run", "sweep"),
    "opd-train --cfg job loss=topk_lsm loss.k=16": ("run", "cfg"),
    "opd-train model=qwen2.5-7b-instruct teacher=openthinker3 task=dapo_math": ("refused", HUB_OFFLINE),
    "opd-train experiment=paper_a_lsm": ("refused", HUB_OFFLINE),
    "opd-train trainer.precision=bf16-mixed loss.agg=seq-mean-token-mean": ("run", None),
    "opd-train trainer.resume=true hydra.run.dir=outputs/runs/2026-11-22/10-00-00": ("run", "resume"),
    "opd-train task.checker=my_checks:lenient": ("run", "checker"),
    "opd-eval model.name_or_path=outputs/runs/<date>/<time>/checkpoints/step_000600/model tasks=[arith]": ("run", "eval"),
    "opd-eval model=qwen2.5-7b-instruct rollout=vllm tasks=[aime24,aime25,amc23,math500] eval.k=16 eval.temperature=0.7 "
    "eval.top_p=0.95 eval.max_new_tokens=16384 'pass_k=[1,16]'": ("refused", HUB_OFFLINE),
    "opd-eval model=qwen2.5-7b-instruct tasks=[aime24] task_paths.aime24=data/aime24.jsonl": ("refused", HUB_OFFLINE),
    "make sweep-k && make report": (
        "covered", "tests/commands/test_report.py::test_report_of_a_real_sweep (make report) and the -m sweep above"),
    "opd-report outputs/sweeps/sweep-k smooth=0.6 'formats=[png,pdf,svg]'": ("run", "report"),
    "opd-report runs/base runs/new 'metrics=[loss,eval/acc]' band=std out=paper/fig3": ("run", "report"),
    "make study-variance": ("covered", "tests/commands/test_study.py::test_tiny_study_writes_every_output"),
    "opd-study variance horizon=40 'gammas=[0,1]' iterations=1000": ("run", "study"),
    "opd-train loss=sft rollout=dataset rollout.path=outputs/data/<date>/<time>/data trainer.max_steps=100": (
        "covered", "tests/commands/test_sft.py::test_sft_trains_without_a_teacher_then_opd_starts_from_its_checkpoint"),
    "opd-train model.name_or_path=outputs/runs/<date>/<time>/checkpoints/step_000100/model": (
        "covered", "tests/commands/test_sft.py::test_sft_trains_without_a_teacher_then_opd_starts_from_its_checkpoint"),
    "make cold-start COLD_START_NAME=demo": (
        "covered", "tests/commands/test_cold_start.py::test_the_three_stages_chain_under_one_directory"),
    "opd-study auroc 'teachers=[demo:teacher,demo:student]' n=16": (
        "covered", "tests/commands/test_reward_studies.py::test_auroc_study_writes_every_output"),
    "opd-study reward-depth 'depths=[4,8,16]' continuations=8": (
        "covered", "tests/commands/test_reward_studies.py::test_reward_depth_study_writes_every_output"),
    "opd-train rollout=vllm teacher.backend=vllm": ("covered", "tests/models/test_vllm.py::test_cli_with_vllm_rollouts_and_teacher"),
    "opd-train rollout=vllm teacher.backend=vllm trainer=zero2 trainer.nproc_per_node=2": (
        "covered", "tests/models/test_vllm.py::test_cli_with_vllm_on_two_ranks"),
    "make bench": ("covered", "tests/scripts/test_bench.py::test_bench_times_opd_cli_and_trl_steps_and_writes_the_tables"),
    'make bench ARGS="--steps 20 --losses topk_lsm"': ("covered", "tests/scripts/test_bench.py"),
    "make bench-scale": ("covered", "tests/scripts/test_bench.py (bench_scale.py at its smallest point, TRL included)"),
    "make bench-scale-gpu": ("gpu", "one GPU with 80 GB free"),
    "python scripts/bench_engines.py --threads 1": (
        "covered", "tests/scripts/test_bench.py::test_bench_engines_times_each_phase_per_engine"),
    "opd-train trainer=zero3 trainer.nproc_per_node=8": ("gpu", "8 GPUs"),
    "opd-train model.lora.enabled=true": ("run", "lora"),
    "opd-train model=qwen2.5-7b-instruct model.lora.enabled=true model.lora.r=64 model.lora.merge_on_save=true "
    "trainer.gradient_checkpointing=true trainer=zero2 trainer.nproc_per_node=8": ("gpu", "8 GPUs and the hub model"),
    "opd-train trainer=zero2 trainer.nproc_per_node=2": ("covered", "tests/training/test_distributed.py::test_two_ranks_equal_one_process_with_accumulation"),
    "opd-train hydra/launcher=slurm hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=8 hydra.launcher.timeout_min=1440 "
    "trainer=zero3 trainer.nnodes=4 trainer.nproc_per_node=8 experiment=paper_a_lsm": ("gpu", "a SLURM cluster of 4 x 8 GPUs"),
    "opd-train -m hydra/launcher=slurm trainer=zero2 trainer.nproc_per_node=8 loss=topk_lsm loss.k=1,4,16,64": (
        "covered", "tests/training/test_slurm.py::test_sweep_through_slurm (the same on the local SLURM)"),
    'make train-slurm ARGS="..." make sweep-slurm ARGS="..."': ("covered", "tests/training/test_slurm.py"),
    "opd-data teacher-rollouts data.n=4 data.max_new_tokens=64": ("run", "data"),
    "opd-data teacher-rollouts teacher=qwen3-8b task=dapo_math rollout=vllm data.n=4 data.max_new_tokens=7168 "
    "data.drop_incorrect=true": ("refused", TEACHER_HUB_OFFLINE),
    "opd-data aligned-prompts reference.path=teacher_prompts.jsonl select.fraction=0.3": (
        "covered", "tests/tasks/test_alignment.py::test_aligned_prompts_keeps_the_math_problems_and_writes_every_output"),
    "opd-train 'task.mix=[{path: outputs/data/<date>/<time>/problems.jsonl, weight: 0.5}]'": (
        "covered", "tests/training/test_mix.py::test_two_steps_on_the_demo_with_a_mix_log_the_realised_shares"),
    'opd-train teacher=self teacher.prompt.system="Add the tens first."': (
        "covered", "tests/commands/test_self_teacher.py::test_live_and_initial_self_teachers_take_the_same_first_step"),
    "opd-train teacher=self teacher.self_weights=live 'teacher.prompt.question=\"{question} The answer is {answer}.\"'": (
        "covered", "tests/models/test_vllm.py::test_cli_self_teacher_on_the_rollout_engine (the same on vLLM)"),
    "opd-train task.chat_template=true task.chat_template_from=teacher": (
        "covered", "tests/tasks/test_chat_template_from.py::test_a_run_trains_and_evaluates_on_the_teacher_template"),
    "opd-train experiment=paper_b_aligned_prompts task.mix.0.path=aligned/problems.jsonl": (
        "refused", r"^error: task\.mix\.0\.path: file not found: aligned/problems\.jsonl"),
    "make opsd-rule": ("covered", "tests/commands/test_opsd_demo.py::test_the_rule_preset_trains_and_measures_the_rule"),
    "make opsd-answer": ("covered", "tests/commands/test_opsd_demo.py::test_the_answer_preset_trains_with_the_hinted_teacher"),
}  # fmt: skip


def readme_commands() -> list[str]:
    """Each command line of the README's bash blocks, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(re.sub(r"\s+", " ", line))
    return lines


def test_every_readme_command_has_a_plan():
    missing = [c for c in readme_commands() if c not in PLAN]
    assert not missing, f"README commands with no entry in PLAN: {missing}"
    for kind, where in PLAN.values():
        if kind == "covered" and "::" in where:
            path, name = where.split(" ")[0].split("::")
            assert f"def {name}(" in (REPO / path).read_text(), where


def run(argv: list[str], env=None, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, capture_output=True, text=True, cwd=REPO, env={**CLI_ENV, **(env or {})}, timeout=timeout
    )


COMMANDS = {
    "opd-train": "train",
    "opd-eval": "evaluate",
    "opd-report": "report",
    "opd-study": "study",
    "opd-data": "data",
}
MODULE = "def lenient(response, gold):\n    return gold in response\n"


def test_every_readme_command_runs_as_written(tmp_path, models_dir):
    short = [f"paths.models={models_dir}", *TINY_DEMO, *SHORT, "eval.n_problems=2", "eval.k=1", "logger=none"]
    short_train = [*short, "trainer.max_steps=1", "trainer.save_every=1"]
    made: dict[str, object] = {}
    (tmp_path / "my_checks.py").write_text(MODULE)
    for command in readme_commands():
        kind, detail = PLAN[command]
        if kind not in ("run", "refused"):
            continue
        tool, *args = command.split(" ")
        args = [a.strip("'") for a in args]  # the shell's quotes
        args = [a.replace("data/aime24.jsonl", str(REPO / "tests/fixtures/aime24.jsonl")) for a in args]
        argv = [sys.executable, "-m", f"opd_cli.commands.{COMMANDS[tool]}"]
        env = None
        if kind == "refused":
            out = run([*argv, *args, f"hydra.run.dir={tmp_path / 'refused'}"])
            lines = out.stderr.strip().splitlines()
            assert out.returncode == 2 and len(lines) == 1 and re.search(detail, lines[0]), (
                command,
                out.stderr[-2000:],
            )
            assert not (tmp_path / "refused").exists()
            continue
        if tool == "opd-train" and detail == "resume":
            args = [a for a in args if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={made['base']}"]
            args += ["trainer.max_steps=2"]  # one step further than the run it continues
            extra = []
        elif tool == "opd-train" and detail == "sweep":
            extra = [*short_train, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
        elif tool == "opd-train":
            extra = [*short_train, f"hydra.run.dir={tmp_path / (detail or 'run')}"]
            env = {"PYTHONPATH": str(tmp_path)} if detail == "checker" else None
        elif tool == "opd-eval":
            args = [
                a.replace(
                    "outputs/runs/<date>/<time>/checkpoints/step_000600", str(made["base"] / "checkpoints/step_000001")
                )
                for a in args
            ]
            extra = [f"paths.models={models_dir}", *TINY_DEMO, "eval.n_problems=2", "eval.k=1", "eval.max_new_tokens=8",
                     f"hydra.run.dir={tmp_path / 'eval' / str(len(made))}"]  # fmt: skip
        elif tool == "opd-report":
            args = [str(tmp_path / "sweep") if a == "outputs/sweeps/sweep-k" else a for a in args]
            args = [str(made[a.split("/")[1]]) if a in ("runs/base", "runs/new") else a for a in args]
            args = [f"out={tmp_path / 'fig3'}" if a == "out=paper/fig3" else a for a in args]
            extra = []
        elif tool == "opd-data":  # 8 prompts in one call: a few of the tiny teacher's responses finish
            extra = [f"paths.models={models_dir}", *TINY_DEMO, "data.n_problems=8", "data.batch_size=32",
                     f"hydra.run.dir={tmp_path / 'data'}"]  # fmt: skip
        else:  # opd-study
            extra = [
                "iterations=12",
                "seeds=[42]",
                "teacher_iterations=5",
                "visit_iterations=4",
                f"hydra.run.dir={tmp_path / 'study'}",
            ]
        out = run([*argv, *args, *extra], env=env)
        assert out.returncode == 0, (command, out.stderr[-3000:])
        if detail in ("base", "new"):
            made[detail] = tmp_path / detail
        if detail == "sweep":
            assert "loss.k=1 with loss.support=teacher renormalized" in out.stdout + out.stderr  # K=1 is warned about
        made[command] = True
    assert (tmp_path / "fig3").is_dir() and (tmp_path / "sweep" / "report").is_dir()
