"""Every preset composes and validates; validation names the key; every key is documented; the
training precision resolves as documented. The CLI's one-line errors are in tests/commands/test_train.py."""

import json
import re
import shutil
import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opd_cli.config.schema import register_configs
from opd_cli.config.validate import student_precision, validate, validate_evaluate
from opd_cli.errors import UserError

from ..conftest import REPO, compose_cfg
from ..models.tiny import other_vocabulary_model, save_model
from ..rollout.sft_data import write_sft_data
from ..tasks.bad_data import BAD_FILES, GOOD_ROW, write

CONF = REPO / "conf"
GROUPS = ["model", "teacher", "loss", "rollout", "task", "trainer", "logger", "experiment"]

from ..envs.conftest import alfworld_data, textworld_games  # noqa: F401, E402 - fixtures: ALFWorld data, TextWorld games


def presets(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


# presets that validate only together: SFT's objective and the engine that reads its data set
COMPANIONS = {
    ("loss", "sft"): "rollout=dataset",
    ("rollout", "dataset"): "loss=sft",
    ("experiment", "paper_b_cold_start"): "loss=sft",  # it has both; it needs a data set (rollout.path)
}


@pytest.mark.parametrize("group,preset", [(g, p) for g in GROUPS for p in presets(g)])
def test_every_preset_composes_and_validates(group, preset, hub_answers, tmp_path, request):
    extra = []
    if companion := COMPANIONS.get((group, preset)):
        extra = [companion, f"rollout.path={write_sft_data(tmp_path / 'data', 4)}"]
    if (group, preset) == ("experiment", "paper_b_aligned_prompts"):  # its aligned prompts: a file of the user's
        row = {"prompt": [{"content": "What is 1+1?"}], "reward_model": {"ground_truth": "2"}}
        (tmp_path / "aligned.jsonl").write_text(json.dumps(row) + "\n")
        extra = [f"task.mix.0.path={tmp_path / 'aligned.jsonl'}"]
    if (group, preset) in (("experiment", "paper_a_multitask"), ("task", "alfworld")):  # ALFWorld's data: one game
        games = request.getfixturevalue("alfworld_data") / "json_2.1.1" / "train"
        key = "multitask.tasks.alfworld.overrides." if group == "experiment" else "task."
        extra = [f"+{key}env.args.games={games}", f"{'+' if group == 'experiment' else ''}{key}n_eval=0"]
        if group == "experiment":  # the authors' ALFWorld teacher is a checkpoint of theirs
            extra.append("multitask.teachers.alfworld=Qwen/Qwen2.5-7B-Instruct")
    cfg = compose_cfg([f"{group}={preset}", *extra])
    if (group, preset) == ("task", "textworld"):  # the games are the user's: test_the_textworld_preset_validates
        return
    if not cfg.model.name_or_path.startswith("demo:") or cfg.task.name in ("arith", "env"):
        validate(cfg)


@pytest.mark.cli  # its fixture runs TextWorld's game compiler
def test_the_textworld_preset_validates(request):
    games = request.getfixturevalue("textworld_games")
    validate(compose_cfg(["task=textworld", f"task.env.args.games={games}"]))
    with pytest.raises(UserError, match=r"^task\.env\.args\.games: give a directory or a glob"):
        validate(compose_cfg(["task=textworld"]))


def test_real_world_presets(hub_answers):
    cfg = compose_cfg(["model=qwen2.5-7b-instruct", "teacher=openthinker3", "task=dapo_math"])
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.teacher.name_or_path == "open-thoughts/OpenThinker3-7B"
    assert cfg.task.dataset == "BytedTsinghua-SIA/DAPO-Math-17k"
    validate(cfg)


def test_an_unreachable_hub_is_refused_in_seconds(hub_down):
    """Without HF_HUB_OFFLINE, a hub id on a machine that cannot reach the hub: one line with the hint, at once
    (the hub client alone retries for about a minute)."""
    cfg = compose_cfg(["model=qwen2.5-7b-instruct", "teacher=openthinker3"])
    start = time.monotonic()
    with pytest.raises(UserError, match=r"^model\.name_or_path: cannot fetch 'Qwen/Qwen2\.5-7B-Instruct': "
                       r"http://127\.0\.0\.1:9 cannot be reached .*; set HF_HUB_OFFLINE=1 to use the local cache"):  # fmt: skip
        validate(cfg)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.k=0", "loss.k: must be an integer >= 1, got 0"),
        ("logger.diagnostics_every=-1", "logger.diagnostics_every: must be >= 0, got -1"),
        ("rollout.top_p=0", "rollout.top_p: must be in (0, 1], got 0.0"),
        ("rollout.top_p=1.5", "rollout.top_p: must be in (0, 1], got 1.5"),
        ("rollout.max_new_tokens=-3", "rollout.max_new_tokens: must be an integer >= 1, got -3"),
        (
            "loss.objective=nope",
            "loss.objective: 'nope' is not one of: sampled_token, sampled_token_is, support_divergence, sft",
        ),
        (
            "loss.support=most",
            "loss.support: 'most' is not one of: teacher, student, union, intersection, symdiff, full",
        ),
        ("loss.tail=true", "loss.tail: a tail bucket needs loss.renormalize=false and loss.support teacher or student"),
        ("loss.beta=1.5", "loss.beta: must be in [0, 1], got 1.5"),
        (
            "trainer.nproc_per_node=2",
            "trainer.engine: 2 processes need the deepspeed engine (trainer=zero1|zero2|zero3), not 'torch'",
        ),
        (
            "trainer=zero2 trainer.nproc_per_node=2 trainer.prompts_per_step=5",
            "trainer.prompts_per_step: 5 prompts cannot be split evenly over 2 processes",
        ),
        ("trainer.node_rank=1", "trainer.node_rank: must be in [0, 1), got 1"),
        ("trainer.lr=inf", "trainer.lr: must be a finite number > 0, got inf"),
        ("rollout.temperature=0", "rollout.temperature: must be a finite number > 0, got 0.0"),
        ("rollout.temperature=inf", "rollout.temperature: must be a finite number > 0, got inf"),
        ("trainer.weight_decay=-1", "trainer.weight_decay: must be a finite number >= 0, got -1.0"),
        ("trainer.betas=[0.9]", "trainer.betas: must be two numbers in [0, 1) (AdamW's beta1, beta2), got [0.9]"),
        (
            "trainer.betas=[2.0,3.0]",
            "trainer.betas: must be two numbers in [0, 1) (AdamW's beta1, beta2), got [2.0, 3.0]",
        ),
        ("teacher.url=http://t:8000", "teacher.url: a teacher server needs teacher.backend=vllm"),
        (
            "teacher.backend=vllm teacher.url=ftp://t",
            "teacher.url: must start with http:// or https://, got ftp://t",
        ),
        ("rollout=vllm rollout.gpu_memory_utilization=0", "rollout.gpu_memory_utilization: must be in (0, 1], got 0.0"),
        ("model.name_or_path=/no/such/model", "model.name_or_path: local model path not found: /no/such/model"),
        ("loss.gamma=2", "loss.gamma: must be in [0, 1], got 2.0"),
        ("trainer.cpu_linear=mkl", "trainer.cpu_linear: 'mkl' is not one of: auto, onednn, blas"),
        (
            "task.question_regex='(a'",
            "task.question_regex: not a regular expression (missing ), unterminated subpattern at position 0)",
        ),
        ("task.question_regex='a.*'", "task.question_regex: needs a named group (?P<question>...)"),
        ("loss.tail_floor=0", "loss.tail_floor: must be in (0, 1), got 0.0"),
        (
            "eval.benchmarks=[aime42]",
            "eval.benchmarks: unknown benchmark 'aime42'; choose from: aime24, aime25, amc23, arith, dapo_math, math500, "
            "rg/basic_arithmetic, rg/chain_sum, rg/family_relationships, rg/gsm_symbolic, rg/leg_counting, "
            "rg/simple_equations",
        ),
        (
            "eval.benchmarks=[aime24] eval.benchmark_paths.aime24=/no.jsonl",
            "eval.benchmark_paths.aime24: file not found: /no.jsonl",
        ),
        (
            "teacher.backend=vllm teacher.temperature=2",
            "teacher.temperature: vLLM's prompt_logprobs are temperature-1 values; use teacher.backend=hf",
        ),
        ("loss.log_ratio_clip=0", "loss.log_ratio_clip: must be > 0 or null, got 0.0"),
        (
            "loss.agg=seq-mean",
            "loss.agg: 'seq-mean' is not one of: token-mean, seq-mean-token-mean, seq-mean-token-sum, "
            "seq-mean-token-sum-norm",
        ),
        (
            "trainer=zero2 +trainer.deepspeed.bf16.enabled=true",
            "trainer.deepspeed.bf16: set trainer.precision instead (fp32, bf16-mixed or bf16-pure); "
            "opd-train writes DeepSpeed's mixed-precision keys from it",
        ),
        (
            "trainer=zero2 trainer.precision=bf16-pure",
            "trainer.precision: bf16-pure (no float32 master weights) is for trainer.engine=torch; "
            "DeepSpeed trains bf16 with float32 master weights: use bf16-mixed",
        ),
    ],
)
def test_validate_names_the_key(override, message):
    with pytest.raises(UserError) as err:
        validate(compose_cfg(override.split()))
    assert str(err.value) == message


def _documented_keys(path):
    """Keys in a YAML file that lack a comment line directly above them (or above their block)."""
    lines = path.read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][\w.-]*):", line)
        if not m or m.group(2) in ("defaults", "hydra"):
            continue
        prev = lines[i - 1].strip() if i else ""
        if not prev.startswith("#"):
            missing.append(m.group(2))
    return missing


def test_every_base_key_has_a_comment():
    """Each group's _base.yaml and train.yaml document every key (presets only override them)."""
    files = [CONF / "train.yaml"] + sorted(CONF.glob("*/_base.yaml")) + [CONF / "rollout/hf.yaml"]
    files += [CONF / "logger/wandb.yaml"] + sorted(CONF.glob("trainer/zero*.yaml"))
    files += [CONF / "evaluate.yaml", CONF / "demo/default.yaml", CONF / "paths/default.yaml"]
    files += [CONF / "data_teacher_rollouts.yaml", CONF / "data_aligned_prompts.yaml"]
    undocumented = {str(f.relative_to(CONF)): _documented_keys(f) for f in files}
    # structural keys of the hydra section are grouped under a commented parent
    undocumented = {
        k: [x for x in v if x not in ("run", "sweep", "callbacks", "validate", "eval", "demo", "paths")]
        for k, v in undocumented.items()
    }
    assert not any(undocumented.values()), undocumented


def test_schema_keys_are_all_in_the_documented_yaml():
    """A key added to the schema must get a documented default in the YAML tree too."""
    cfg = compose_cfg()
    base = {
        "model": CONF / "model/_base.yaml",
        "teacher": CONF / "teacher/_base.yaml",
        "loss": CONF / "loss/_base.yaml",
        "rollout": CONF / "rollout/hf.yaml",
        "task": CONF / "task/_base.yaml",
        "trainer": CONF / "trainer/_base.yaml",
        "logger": CONF / "logger/wandb.yaml",
        "demo": CONF / "demo/default.yaml",
        "paths": CONF / "paths/default.yaml",
    }
    for group, path in base.items():
        documented = set(OmegaConf.load(path).keys()) - {"defaults"}
        assert set(cfg[group].keys()) == documented, group


def papers_doc_rows():
    """(preset, key, value) for each row of docs/papers.md whose key is one dotted key and whose value
    is one number or one backticked literal; a baseline's table changes its parent's values."""
    import yaml

    rows, preset = [], None
    for line in (REPO / "docs/papers.md").read_text().splitlines():
        if m := re.match(r"^(?:## Paper \w+: )?`(paper_\w+)`", line):
            preset = m.group(1)
        cells = [c.strip() for c in line.split("|")[1:-1]] if line.startswith("|") else []
        if len(cells) < 3 or not (key := re.fullmatch(r"`([a-z_]+\.[a-z_.]+)`", cells[1])):
            continue
        value = cells[2]
        if lit := re.fullmatch(r"`([^`\"]*)`", value):  # a quoted prompt is shown as rendered: not compared
            value = lit.group(1)
        elif re.fullmatch(r"-?[\d.]+(e-?\d+)?", value):
            value = float(value)
        else:
            continue
        rows.append((preset, key.group(1), yaml.safe_load(value) if isinstance(value, str) else value))
    return rows


def test_papers_doc_matches_the_presets():
    """Every value docs/papers.md gives for a preset is what --cfg job composes (baselines inherit)."""
    rows = papers_doc_rows()
    parents = {"paper_a_baseline": "paper_a_lsm", "paper_b_aligned_prompts": "paper_b_topk"}
    checked, composed = {}, {}
    for preset, key, value in rows:
        if preset not in composed:  # one composition per preset, not per row (0.12 s each)
            composed[preset] = compose_cfg([f"experiment={preset}"])
        cfg = composed[preset]
        got = OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}))["v"]
        if isinstance(value, float | int) and not isinstance(value, bool):
            assert got == pytest.approx(value), (preset, key)
        else:
            assert got == value, (preset, key)
        checked[preset] = checked.get(preset, 0) + 1
    for preset in presets("experiment"):
        if preset.startswith("paper_"):  # a paper's setting (the demo presets, demo_*, follow no paper)
            assert checked.get(preset, 0) >= (2 if preset in parents else 15), (preset, checked)


@pytest.mark.parametrize(
    ("overrides", "resolved"),
    [
        ([], "fp32"),
        (["model.dtype=bfloat16"], "bf16-mixed"),
        (["model.dtype=bfloat16", "trainer.precision=bf16-pure"], "bf16-pure"),
        (["trainer.precision=bf16-mixed"], "bf16-mixed"),
    ],
)
def test_auto_never_steps_bfloat16_weights_without_masters(overrides, resolved):
    assert student_precision(compose_cfg(overrides)) == resolved


def test_float16_training_is_refused():
    with pytest.raises(UserError, match="model.dtype: float16"):
        student_precision(compose_cfg(["model.dtype=float16"]))


# ----------------------------------------------------------------------------- model files (models/preflight.py)


@pytest.fixture
def student_dir(tiny_model, tiny_tokenizer, tmp_path):
    return save_model(tmp_path / "student", tiny_model, tiny_tokenizer)


def models(student, teacher, *more):
    return compose_cfg([f"model.name_or_path={student}", f"teacher.name_or_path={teacher}", "logger=none", *more])


def test_validate_refuses_a_teacher_of_another_vocabulary(student_dir, tmp_path):
    teacher = other_vocabulary_model(tmp_path / "teacher")
    with pytest.raises(UserError) as err:
        validate(models(student_dir, teacher))
    assert str(err.value) == (
        "teacher.name_or_path: the teacher's vocabulary does not match the student's "
        "(280 vs 300 tokens, 20 token-id pairs differ)"
    )
    validate(models(student_dir, student_dir))  # the same vocabulary passes


def test_validate_names_the_teacher_key_and_its_broken_file(student_dir, tiny_model, tiny_tokenizer, tmp_path):
    teacher = save_model(tmp_path / "teacher", tiny_model, tiny_tokenizer)
    (teacher / "model.safetensors").write_bytes(b"not safetensors" * 10)
    with pytest.raises(UserError, match=r"^teacher\.name_or_path: \S+/teacher/model\.safetensors is not a valid"):
        validate(models(student_dir, teacher))
    # a teacher behind a vLLM server is loaded there: its weights are not needed here
    validate(models(student_dir, teacher, "teacher.backend=vllm", "teacher.url=http://teacher:8000"))


def test_a_resumed_student_is_not_required_to_have_weights(student_dir):
    """On resume the student comes from the run's checkpoint (found later, in build), not from its directory."""
    teacher = shutil.copytree(student_dir, student_dir.parent / "teacher")
    (student_dir / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"^model\.name_or_path: \S+/student has no weight files"):
        validate(models(student_dir, teacher))
    validate(models(student_dir, teacher, "trainer.resume=true"))


def test_validate_evaluate_checks_the_model_files(student_dir):
    (student_dir / "config.json").write_text("{not json")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"model.name_or_path={student_dir}"])
    with pytest.raises(UserError, match=r"^model\.name_or_path: \S+/student/config\.json is not a model config"):
        validate_evaluate(cfg)


# ----------------------------------------------------------------------------- task data and template

# a training task on a local file, with models that do not need task=arith
HUB_TASK = ["task.name=hub", "task.n_eval=1", "model=qwen2.5-7b-instruct", "teacher=openthinker3"]


def compose_evaluate(overrides=()):
    """The config ``opd-eval`` would run with these overrides."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


def _refused(check, cfg) -> str:
    with pytest.raises(UserError) as err:
        check(cfg)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("case,name,content,end", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_data_files_are_refused_naming_the_key(case, name, content, end, tmp_path):
    """The training task's file, a benchmark's file during training, and an opd-eval benchmark's file."""
    path = write(tmp_path, name, content)
    got = _refused(validate, compose_cfg([*HUB_TASK, f"task.path={path}"]))
    assert got.startswith(f"task.path: {path}{end}"), got
    cfg = compose_cfg(["eval.benchmarks=[amc23]", f"eval.benchmark_paths.amc23={path}"])
    got = _refused(validate, cfg)
    assert got.startswith(f"eval.benchmark_paths.amc23: {path}{end}"), got
    got = _refused(validate_evaluate, compose_evaluate(["tasks=[amc23]", f"task_paths.amc23={path}"]))
    assert got.startswith(f"task_paths.amc23: {path}{end}"), got


def test_a_good_file_validates_and_a_directory_is_refused(tmp_path, hub_answers):
    path = write(tmp_path, "ok.jsonl", GOOD_ROW * 2)
    validate(compose_cfg([*HUB_TASK, f"task.path={path}"]))
    validate(compose_cfg(["eval.benchmarks=[amc23]", f"eval.benchmark_paths.amc23={path}"]))
    validate_evaluate(compose_evaluate(["tasks=[amc23]", f"task_paths.amc23={path}"]))
    got = _refused(validate, compose_cfg([*HUB_TASK, f"task.path={tmp_path}"]))
    assert got == f"task.path: {tmp_path} is a directory; give a jsonl or parquet file"


@pytest.mark.parametrize("n_eval", [3, 5])
def test_n_eval_beyond_the_data_is_refused(n_eval, tmp_path, hub_answers):
    path = write(tmp_path, "three.jsonl", GOOD_ROW * 3)
    validate(compose_cfg([*HUB_TASK, f"task.path={path}", "task.n_eval=2"]))
    got = _refused(validate, compose_cfg([*HUB_TASK, f"task.path={path}", f"task.n_eval={n_eval}"]))
    assert (
        got
        == f"task.n_eval: {path} has 3 rows, need more than task.n_eval={n_eval} (held out; the rest are trained on)"
    )


def test_n_eval_beyond_the_arith_task_is_refused():
    validate(compose_cfg(["task.n_eval=8099"]))
    got = _refused(validate, compose_cfg(["task.n_eval=8100"]))
    assert (
        got
        == "task.n_eval: the arith task has 8100 rows, need more than task.n_eval=8100 (held out; the rest are trained on)"
    )


@pytest.mark.parametrize(
    "template,message",
    [
        ("Q: {questoin}", "task.template: unknown placeholder '{questoin}'; the template may use {question}"),
        ("{question} {foo}", "task.template: unknown placeholder '{foo}'; the template may use {question}"),
        ("{question} }", "task.template: a stray brace (Single '}' encountered in format string)"),
        ("Answer:", "task.template: must contain '{question}'"),
    ],
)
def test_bad_templates_are_refused(template, message):
    cfg = compose_cfg()
    cfg.task.template = template
    assert _refused(validate, cfg).startswith(message)


def test_an_unknown_demo_teacher_style_is_refused():
    with pytest.raises(UserError, match=r"^demo\.teacher_style: 'rows' is not one of: columns, tens_first$"):
        validate(compose_cfg(["demo.teacher_style=rows"]))
