"""opd-study auroc / reward-depth start-up checks (analysis/reward_checks.py): each bad value is refused in one
``UserError`` naming its key; the defaults pass; every key of the two configs is documented."""

import pytest
from hydra import compose, initialize_config_dir

from opd_cli.analysis.reward_checks import teacher_names, validate_study
from opd_cli.config.schema import register_configs
from opd_cli.errors import UserError

from ..config.test_validate import _documented_keys
from ..conftest import REPO

CONF = REPO / "conf"
CONFIGS = {"auroc": "study_auroc", "reward_depth": "study_reward_depth"}


def study_cfg(study: str, overrides=()):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=CONFIGS[study], overrides=list(overrides))


@pytest.mark.parametrize("study", CONFIGS)
def test_the_defaults_pass_and_every_key_is_documented(study):
    validate_study(study_cfg(study), study)
    undocumented = [k for k in _documented_keys(CONF / f"{CONFIGS[study]}.yaml") if k not in ("run", "sweep")]
    assert undocumented in ([], ["callbacks", "validate"]), undocumented


def test_teachers_default_to_the_configured_teacher():
    assert teacher_names(study_cfg("auroc")) == ["demo:teacher"]
    assert teacher_names(study_cfg("auroc", ["teachers=[demo:student,demo:teacher]"])) == [
        "demo:student",
        "demo:teacher",
    ]


BAD = [
    ("auroc", ["teachers=[demo:teacher,demo:teacher]"], "teachers: give each teacher once"),
    ("auroc", ["teachers=[]"], "teachers: give each teacher once, at least one"),
    ("auroc", ["teachers=[demo:teacher,./no/such/model]"], "teachers: './no/such/model': local model path not found"),
    ("auroc", ["teachers=[demo:tutor]"], "teachers: 'demo:tutor': 'demo:tutor' is not one of: demo:student"),
    ("auroc", ["model.name_or_path=./no/such/student"], "model.name_or_path: local model path not found"),
    ("auroc", ["teacher.backend=vllm"], "teacher.backend: not used by opd-study auroc (the teacher scores as a"),
    ("auroc", ["teacher.temperature=0.5"], "teacher.temperature: not used by opd-study auroc (the rewards are raw"),
    ("reward_depth", ["teacher.backend=vllm"], "teacher.backend: not used by opd-study reward-depth (the teacher "
     "samples in rollout.engine); leave it at hf"),
    ("reward_depth", ["teacher.url=http://x:8000"], "teacher.url: not used by opd-study reward-depth"),
    ("auroc", ["n=0"], "n: must be an integer >= 1, got 0"),
    ("auroc", ["bootstrap=0"], "bootstrap: must be an integer >= 1"),
    ("auroc", ["top_p=0"], "top_p: must be in (0, 1]"),
    ("auroc", ["temperature=0"], "temperature: must be a finite number > 0"),
    ("auroc", ["split=test"], "split: 'test' is not one of: train, held_out"),
    ("auroc", ["device=tpu"], "device: 'tpu' is not one of: auto, cpu, cuda"),
    ("auroc", ["rollout.engine=sglang"], "rollout.engine: 'sglang' is not one of: hf, vllm"),
    ("auroc", ["task=aime24"], "split: 'HuggingFaceH4/aime_2024' is an evaluation benchmark"),
    ("auroc", ["task.template='Q: {q}'"], "task.template: unknown placeholder '{q}'"),
    ("auroc", ["model.lora.enabled=true"], "model.lora.enabled: opd-study reads a model as saved"),
    ("reward_depth", ["depths=[]"], "depths: give at least one prefix length"),
    ("reward_depth", ["depths=[4,4]"], "depths: each prefix length once"),
    ("reward_depth", ["depths=[8,64]"], "depths: 64 is not in [1, max_new_tokens=64)"),
    ("reward_depth", ["depths=[0]"], "depths: 0 is not in [1, max_new_tokens=64)"),
    ("reward_depth", ["continuations=0"], "continuations: must be an integer >= 1"),
    ("reward_depth", ["min_response_tokens=-1"], "min_response_tokens: must be >= 0"),
]  # fmt: skip


@pytest.mark.parametrize("study, overrides, message", BAD)
def test_bad_values_are_refused_naming_the_key(study, overrides, message, hub_answers):
    with pytest.raises(UserError) as e:
        validate_study(study_cfg(study, overrides), study, overrides)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("override, message", [
    ("rollout.n=4", "rollout.n: opd-study samples with its own keys; set n (top level)"),
    ("rollout.max_prompt_tokens=9", "rollout.max_prompt_tokens: opd-study samples with its own keys; it has no effect"),
])  # fmt: skip
def test_rollout_sampling_keys_are_refused(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_study(study_cfg("auroc", [override]), "auroc", [override])
    validate_study(study_cfg("auroc", ["rollout.gpu_memory_utilization=0.5"]), "auroc", ["rollout.engine=hf"])
