"""Typed config schema, registered in Hydra's ConfigStore.

Types and unknown keys are checked by OmegaConf when Hydra composes the config; value
ranges by ``opd_cli.config.validate``. Every key is documented with a comment in its YAML
under ``conf/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class LoraConfig:
    """``model.lora``: low-rank adapters (peft) instead of training every weight (when ``enabled``)."""

    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    merge_on_save: bool = False


@dataclass
class ModelConfig:
    name_or_path: str = "demo:student"
    dtype: str = "float32"
    trust_remote_code: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TeacherPromptConfig:
    system: str | None = None
    question: str | None = None
    template: str | None = None
    chat_template_from: str = "student"


@dataclass
class TeacherConfig:
    name_or_path: str = "demo:teacher"
    self_weights: str = "initial"
    dtype: str = "float32"
    trust_remote_code: bool = False
    backend: str = "hf"
    micro_batch_size: int = 64
    shard: bool = False
    gpu_memory_utilization: float = 0.3
    url: str | None = None
    sleep: bool | None = None
    temperature: float = 1.0
    prompt: TeacherPromptConfig = field(default_factory=TeacherPromptConfig)


@dataclass
class LossConfig:
    name: str = "topk_lsm"
    objective: str = "support_divergence"
    k: int = 32
    support: str = "teacher"
    renormalize: bool = True
    tail: bool = False
    stop_grad: str = "none"
    direction: str = "reverse"
    beta: float = 0.5
    form: str = "direct"
    teacher_values: str = "exact"
    pg_weight: str = "student_p"
    tail_floor: float = 1e-8
    log_ratio_clip: float | None = None
    max_response_tokens: int | None = None
    entropy_top_ratio: float | None = None
    outcome_weight: float = 0.0
    diag_k: int | None = None
    gamma: float = 0.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    dual_clip: float | None = None
    agg: str = "token-mean"
    mask_tokens: list[str] = field(default_factory=list)
    mask_mode: str = "first"
    chunk_tokens: int = 1024
    gap_bucket_tokens: int = 1024


@dataclass
class RolloutConfig:
    engine: str = "hf"
    n: int = 4
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 64
    max_prompt_tokens: int = 256
    gpu_memory_utilization: float = 0.3
    sleep: bool | None = None
    path: str | None = None
    question_key: str = "question"
    response_key: str = "response"


@dataclass
class MixSourceConfig:
    """One entry of ``task.mix``: a local file of extra training prompts and its share of each step."""

    path: str = "???"
    weight: float = 0.5
    name: str | None = None


@dataclass
class EnvConfig:
    """``task.env``: the multi-turn environment of a ``task.name=env`` task (``opd_cli.envs``)."""

    name: str = "demo"
    args: dict[str, Any] = field(default_factory=dict)
    max_turns: int = 6
    turn_tokens: int = 16
    stop: list[str] = field(default_factory=lambda: ["\n"])
    format: str = "plain"
    cue: str = "\nAction:"
    system: str | None = None


@dataclass
class RGConfig:
    """``task.rg``: a ``task.name=reasoning_gym`` task's procedural generator (the reasoning-gym package)."""

    dataset: str = "chain_sum"
    size: int = 2000
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig:
    name: str = "arith"
    dataset: str | None = None
    path: str | None = None
    split: str = "train"
    question_key: str = "question"
    answer_key: str = "answer"
    solution_key: str | None = None
    template: str = "{question}"
    chat_template: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    question_regex: str | None = None
    checker: str = "exact"
    answer_timeout_s: int = 4
    eval_only: bool = False
    seed: int = 0
    n_eval: int = 256
    chat_template_from: str = "student"
    mix: list[MixSourceConfig] = field(default_factory=list)
    env: EnvConfig = field(default_factory=EnvConfig)
    rg: RGConfig = field(default_factory=RGConfig)


@dataclass
class TrainerConfig:
    engine: str = "torch"
    device: str = "auto"
    cpu_linear: str = "auto"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    rdzv_timeout: int = 300
    stop_timeout_s: int = 30
    deepspeed: dict[str, Any] = field(default_factory=dict)
    max_steps: int = 600
    prompts_per_step: int = 16
    mini_batches: int = 1
    micro_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    save_every: int = 0
    resume: bool = False
    seed: int = 42


@dataclass
class EvalConfig:
    k: int = 4
    n_problems: int = 256
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 64
    batch_size: int = 512


@dataclass
class TrainEvalConfig(EvalConfig):
    every: int = 100
    benchmarks: list[str] = field(default_factory=list)
    benchmark_paths: dict[str, str | None] = field(default_factory=dict)
    # name -> regular expression: the share of held-out responses it matches (re.search), eval/pattern/<name>
    patterns: dict[str, str] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    backend: str = "wandb"
    # null: the WANDB_* environment variable, else the default (training/logger.py, wandb_settings)
    mode: str | None = None
    project: str | None = None
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] | None = None
    samples_every: int = 10
    samples_per_step: int = 4
    samples_tokens: int = 0
    # the student's full-vocabulary diagnostics every this many steps (1: every step; 0: never)
    diagnostics_every: int = 1


@dataclass
class DemoConfig:
    hidden_size: int = 128
    num_layers: int = 2
    vocab_size: int = 400
    teacher_steps: int = 800
    teacher_style: str = "columns"
    student_steps: int = 300
    rule_system: str = "Add the tens first."
    hint_question: str = "{question} The answer is {answer}."
    env_teacher_steps: int = 1000
    env_student_steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


@dataclass
class PathsConfig:
    models: str = "outputs/models"


@dataclass
class RunConfig:
    """What every command that loads a model shares: the model, the task (where the demo models
    come from), the demo models' recipe and where they are cached."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class MultiTaskEntry:
    """One task of ``multitask.tasks``: a task preset, its share of the steps and keys over the preset."""

    task: str = "arith"
    weight: float = 1.0
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class MultiTaskConfig:
    """``multitask``: several tasks trained at once, each with its own teacher where ``teachers`` names one."""

    mode: str = "alternate"
    # name -> MultiTaskEntry; untyped here because Hydra cannot add a typed entry from the command line
    # (``tasks.multitask.entries`` types each one)
    tasks: dict[str, Any] = field(default_factory=dict)
    teachers: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainConfig(RunConfig):
    """``opd-train`` (conf/train.yaml and its groups document each key)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    multitask: MultiTaskConfig = field(default_factory=MultiTaskConfig)


@dataclass
class EvaluateConfig(RunConfig):
    """``opd-eval``: one model on several benchmarks (conf/evaluate.yaml documents each key)."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tasks: list[str] = field(default_factory=lambda: ["arith"])
    task_paths: dict[str, str | None] = field(default_factory=dict)
    pass_k: list[int] = field(default_factory=lambda: [1])
    teacher_acc: dict[str, float | None] = field(default_factory=dict)
    baseline_acc: dict[str, float | None] = field(default_factory=dict)
    chat_template: bool | None = None
    seed: int = 0
    device: str = "auto"


@dataclass
class VarianceStudyConfig:
    """``opd-study variance`` (conf/study_variance.yaml documents each key)."""

    gammas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    seeds: list[int] = field(default_factory=lambda: [42, 43, 2026])
    horizon: int = 20
    batch: int = 64
    micro_batches: int = 8
    iterations: int = 600
    width: int = 32
    teacher_iterations: int = 300
    teacher_lr: float = 1e-2
    student_lr: float = 3e-3
    state_bins: int = 40
    state_range: list[float] = field(default_factory=lambda: [-6.0, 6.0])
    visit_iterations: int = 100


@dataclass
class DataConfig:
    """``data``: how ``opd-data teacher-rollouts`` samples the teacher and filters its responses."""

    n_problems: int = 100000
    n: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 512
    repeat_ngram: int = 4
    max_repeat_fraction: float = 0.5
    drop_incorrect: bool = False


@dataclass
class TeacherRolloutsConfig:
    """``opd-data teacher-rollouts``: the teacher's responses to the training prompts as an SFT data set
    (conf/data_teacher_rollouts.yaml documents each key)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    device: str = "auto"


@dataclass
class ReferenceConfig:
    """``reference``: the teacher's post-training prompts, a local jsonl or parquet file."""

    path: str | None = None
    question_key: str = "question"


@dataclass
class EmbeddingConfig:
    """``embedding``: the sentence-embedding model that compares prompts."""

    model: str = "all-MiniLM-L6-v2"
    batch_size: int = 256


@dataclass
class SelectConfig:
    """``select``: which candidates ``opd-data aligned-prompts`` keeps."""

    fraction: float | None = 0.5
    n: int | None = None
    top_m: int = 1
    min_similarity: float = 0.2


@dataclass
class AlignedPromptsConfig:
    """``opd-data aligned-prompts``: the task's training prompts most like the teacher's post-training prompts
    (conf/data_aligned_prompts.yaml documents each key)."""

    task: TaskConfig = field(default_factory=TaskConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    device: str = "auto"


@dataclass
class RewardStudyConfig(RunConfig):
    """What ``opd-study auroc`` and ``opd-study reward-depth`` share: the student's sampled responses."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    split: str = "train"
    n_problems: int = 64
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 512
    bootstrap: int = 1000
    seed: int = 0
    device: str = "auto"


@dataclass
class AurocStudyConfig(RewardStudyConfig):
    """``opd-study auroc`` (conf/study_auroc.yaml documents each key)."""

    teachers: list[str] | None = None


@dataclass
class RewardDepthStudyConfig(RewardStudyConfig):
    """``opd-study reward-depth`` (conf/study_reward_depth.yaml documents each key)."""

    depths: list[int] = field(default_factory=lambda: [8, 16, 32])
    continuations: int = 4
    min_response_tokens: int = 0


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    ConfigStore.instance().store(name="study_variance_schema", node=VarianceStudyConfig)
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
    ConfigStore.instance().store(name="data_teacher_rollouts_schema", node=TeacherRolloutsConfig)
    ConfigStore.instance().store(name="data_aligned_prompts_schema", node=AlignedPromptsConfig)
    ConfigStore.instance().store(name="study_auroc_schema", node=AurocStudyConfig)
    ConfigStore.instance().store(name="study_reward_depth_schema", node=RewardDepthStudyConfig)
