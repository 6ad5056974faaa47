"""The models' memory bound (models/footprint.py) and the refusal of a run it does not fit."""

import pytest
from transformers import AutoModelForCausalLM, Qwen2Config

from opd_cli.config.validate import check_lora_targets, check_memory
from opd_cli.errors import UserError
from opd_cli.models.footprint import GIB, meta_model, parameter_count, training_footprint

from ..conftest import compose_cfg
from .tiny import save_model

# Qwen2.5-7B-Instruct's config.json (the hub model card gives 7.61B parameters)
QWEN25_7B = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, torch_dtype="bfloat16",
)  # fmt: skip


@pytest.fixture(scope="module")
def qwen7b_config(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen7b")
    Qwen2Config(**QWEN25_7B).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def qwen7b(qwen7b_config):
    return meta_model(qwen7b_config)


def test_parameter_count_equals_the_loaded_models(tmp_path, tiny_model, tiny_tokenizer):
    directory = save_model(tmp_path / "m", tiny_model, tiny_tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    distinct = {p.data_ptr(): p.numel() for p in loaded.parameters()}
    assert parameter_count(meta_model(directory)) == sum(distinct.values())


def test_parameter_count_of_a_7b_config_without_weights(qwen7b):
    # embeddings 2 x 152064 x 3584, 28 layers of attention (q, k, v with biases, o) and SwiGLU MLP, norms
    h, f, kv, v, n = 3584, 18944, 512, 152064, 28
    layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * f + 2 * h
    assert parameter_count(qwen7b) == 2 * v * h + n * layer + h == 7_615_616_512


@pytest.mark.parametrize(
    ("precision", "engine", "stage", "world", "lora", "expected"),
    [
        ("fp32", "torch", 0, 1, False, (4000, 4000, 8000)),
        ("bf16-mixed", "torch", 0, 1, False, (2000, 4000, 12000)),
        ("bf16-pure", "torch", 0, 1, False, (2000, 2000, 4000)),
        ("bf16-mixed", "deepspeed", 1, 4, False, (2000, 2000, 3000)),
        ("bf16-mixed", "deepspeed", 2, 4, False, (2000, 500, 3000)),
        ("bf16-mixed", "deepspeed", 3, 4, False, (500, 500, 3000)),
        ("fp32", "torch", 3, 4, False, (4000, 4000, 8000)),  # a stage means nothing without DeepSpeed
        ("bf16-mixed", "torch", 0, 1, True, (2000, 0, 0)),
    ],
)
def test_training_footprint_by_precision_and_stage(precision, engine, stage, world, lora, expected):
    f = training_footprint(1000, precision, engine, stage, world, lora)
    assert (f.weights, f.gradients, f.optimizer, f.teacher) == (*expected, 0)
    assert f.total == sum(expected)


def test_teacher_weights_count_once_per_process_unless_sharded():
    assert (
        training_footprint(10, "fp32", "deepspeed", 3, 4, teacher_params=1000, teacher_dtype="bfloat16").teacher == 2000
    )
    sharded = training_footprint(10, "fp32", "deepspeed", 3, 4, teacher_params=1000, teacher_dtype="bfloat16",
                                 teacher_sharded=True)  # fmt: skip
    assert sharded.teacher == 500


def test_a_7b_student_in_one_process_is_refused_on_an_80_gib_gpu(qwen7b):
    gpu = (80 * GIB, "the GPU (80 GiB)")
    cfg = compose_cfg(["model.dtype=bfloat16"])
    with pytest.raises(UserError) as e:
        check_memory(cfg, qwen7b, None, gpu)
    msg = str(e.value)
    # 7.6e9 x 18 bytes (bf16 weights, float32 master gradients, masters and moments) = 128 GiB
    assert msg.startswith(
        "trainer.nproc_per_node: a 7.6B-parameter student (bf16-mixed, one process) needs at least 128 GiB"
    )
    assert "trainer=zero3" in msg and "model.lora.enabled=true" in msg and "\n" not in msg
    # the fixes it names fit: 8-way ZeRO-3 (2 bytes a parameter), or LoRA (the bf16 weights alone)
    check_memory(compose_cfg(["model.dtype=bfloat16", "trainer=zero3", "trainer.nproc_per_node=8"]), qwen7b, None, gpu)
    check_memory(compose_cfg(["model.dtype=bfloat16", "model.lora.enabled=true"]), qwen7b, None, gpu)


def test_the_in_process_teacher_counts(qwen7b, qwen7b_config):
    cfg = compose_cfg(["model.dtype=bfloat16", "trainer=zero3", "trainer.nproc_per_node=8", "teacher.dtype=bfloat16"])
    check_memory(cfg, qwen7b, None, (24 * GIB, "a 24 GiB GPU"))  # student alone: 14 GiB
    with pytest.raises(
        UserError, match=r"needs at least 14 GiB .* and 14 GiB of teacher weights, more than the 24 GiB"
    ):
        check_memory(cfg, qwen7b, qwen7b_config, (24 * GIB, "a 24 GiB GPU"))


def test_lora_targets_must_name_linear_layers_of_the_student(qwen7b):
    check_lora_targets(qwen7b, ["q_proj", "self_attn.v_proj", "down_proj"])  # a name's end after a dot
    with pytest.raises(UserError) as e:
        check_lora_targets(qwen7b, ["q_proj", "c_attn", "proj"])
    assert str(e.value) == (
        "model.lora.target_modules: c_attn, proj names no linear layer of the student; its linear layers are: "
        "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    )
