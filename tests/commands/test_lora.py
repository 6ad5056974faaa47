"""LoRA students (model.lora) and activation checkpointing (trainer.gradient_checkpointing) through opd-train.

Unit: the LoRA keys' checks. CLI: a bad value is one line. Integration: LoRA trains on the tiny demo
(one process and two DeepSpeed ranks), its checkpoint loads with peft and transformers, the base
weights stay as they were, and a resume continues as the uninterrupted run does.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd_cli.config.validate import validate
from opd_cli.errors import UserError

from ..conftest import CLI_ENV, REPO, assert_resume_matches, compose_cfg, metrics, opd_train

LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "trainer.lr=1e-2", "logger=none"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ("model.lora.enabled=true model.lora.r=0", "model.lora.r: must be an integer >= 1, got 0"),
        ("model.lora.enabled=true model.lora.alpha=0", "model.lora.alpha: must be a finite number > 0, got 0.0"),
        ("model.lora.enabled=true model.lora.dropout=1", "model.lora.dropout: must be in [0, 1), got 1.0"),
        (
            "model.lora.enabled=true model.lora.target_modules=[]",
            "model.lora.target_modules: give the names of the linear layers that get adapters, e.g. "
            "[q_proj,v_proj]; got []",
        ),
        (
            "model.lora.enabled=true model.lora.target_modules=[q_proj,lm_head]",
            "model.lora.target_modules: lm_head cannot get an adapter (the objectives read its weight)",
        ),
        (
            "model.lora.enabled=true trainer=zero3",
            "model.lora.enabled: LoRA does not train under DeepSpeed ZeRO stage 3; use trainer=zero1 or trainer=zero2",
        ),
        (
            "model.lora.r=8",
            "model.lora.enabled: model.lora.r is set but LoRA is off; add model.lora.enabled=true",
        ),
    ],
)
def test_lora_keys_are_checked(overrides, message):
    with pytest.raises(UserError) as err:
        validate(compose_cfg(overrides.split()))
    assert str(err.value) == message


@pytest.mark.unit
def test_lora_and_checkpointing_are_off_by_default_and_pass_when_on():
    cfg = compose_cfg()
    assert cfg.model.lora.enabled is False and cfg.trainer.gradient_checkpointing is False
    validate(compose_cfg(["model.lora.enabled=true", "trainer.gradient_checkpointing=true", "trainer=zero2"]))


def test_a_bad_lora_value_is_one_line_before_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "opd_cli.commands.train", f"hydra.run.dir={run_dir}", "model.lora.enabled=true",
         "model.lora.dropout=1.5"],
        capture_output=True, text=True, cwd=REPO, env=CLI_ENV, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert re.fullmatch(r"error: model\.lora\.dropout: must be in \[0, 1\), got 1\.5", out.stderr.strip())
    assert not run_dir.exists()


def adapter_base(ckpt: Path) -> str:
    return json.loads((ckpt / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.integration
def test_lora_trains_on_the_demo_and_its_checkpoint_loads(tmp_path, models_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    args = [*LORA, "model.lora.merge_on_save=true", "trainer.gradient_checkpointing=true", "trainer.max_steps=2"]
    opd_train(tmp_path, models_dir, *args)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["grad_norm"] > 0 for r in rows[1:])
    ckpt = tmp_path / "checkpoints/step_000002"
    base_dir = Path(adapter_base(ckpt))
    assert base_dir.is_relative_to(models_dir)  # the demo student the run started from
    base = load_file(base_dir / "model.safetensors")
    merged = load_file(ckpt / "model" / "model.safetensors")
    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)  # the adapters only
    assert merged.keys() == base.keys()
    adapted = {k.split(".lora_")[0].removeprefix("base_model.model.") + ".weight" for k in adapter}
    for key, weight in base.items():
        if key in adapted:  # base + (alpha / r) B A: the base weight was not trained
            a, b = (adapter[f"base_model.model.{key.removesuffix('.weight')}.lora_{x}.weight"] for x in "AB")
            torch.testing.assert_close(merged[key], weight + 2.0 * b @ a, rtol=0, atol=1e-6)
            assert not torch.equal(merged[key], weight)
        else:
            assert torch.equal(merged[key], weight), key  # embeddings, norms, biases: untouched
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), ckpt / "adapter")
    plain = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    torch.testing.assert_close(logits(plain, ids), logits(with_peft, ids), rtol=0, atol=1e-5)


@pytest.mark.integration
def test_lora_resume_matches_uninterrupted_run(tmp_path, models_dir):
    """Saved without merging (model/ holds the adapter): the resume reads adapter/ onto the base."""
    full, part = tmp_path / "full", tmp_path / "part"
    common = [*LORA, "trainer.save_every=2"]
    opd_train(full, models_dir, "trainer.max_steps=4", *common)
    opd_train(part, models_dir, "trainer.max_steps=2", *common)
    assert (part / "checkpoints/step_000002/model/adapter_config.json").is_file()
    opd_train(part, models_dir, "trainer.max_steps=4", "trainer.resume=true", *common)
    assert_resume_matches(full, part)
    same = load_file(full / "checkpoints/step_000004/adapter/adapter_model.safetensors")
    resumed = load_file(part / "checkpoints/step_000004/adapter/adapter_model.safetensors")
    assert same.keys() == resumed.keys()
    for k in same:
        torch.testing.assert_close(resumed[k], same[k], rtol=1e-4, atol=1e-6)


@pytest.mark.integration
def test_lora_on_two_deepspeed_ranks(tmp_path, models_dir):
    from transformers import AutoModelForCausalLM

    args = [*LORA, "model.lora.merge_on_save=true", "trainer.gradient_checkpointing=true", "trainer=zero2"]
    opd_train(tmp_path, models_dir, *args, "trainer.nproc_per_node=2", "trainer.max_steps=2")
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["grad_norm"] > 0 for r in rows[1:])
    ckpt = tmp_path / "checkpoints/step_000002"
    base = load_file(Path(adapter_base(ckpt)) / "model.safetensors")
    merged = AutoModelForCausalLM.from_pretrained(ckpt / "model").state_dict()
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])  # frozen
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])  # adapted
