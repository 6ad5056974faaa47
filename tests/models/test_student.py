"""The student set up for training (models/student.py): activation checkpointing and LoRA adapters.

Checkpointing must not change a gradient: the same loss, through the packed and the padded
scoring pass, in float64, with and without it. LoRA must train the adapters only, sample and
score with them, and export (checkpoints, vLLM) the model its adapters make.
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from opd_cli.config.schema import LoraConfig
from opd_cli.models.checks import choose_decoder
from opd_cli.models.decoding import LeanDecoder
from opd_cli.models.demo import build_model
from opd_cli.models.loading import lm_head_weight, load_model
from opd_cli.models.student import (
    ADAPTER_DIR,
    add_lora,
    enable_checkpointing,
    export_state_dict,
    lora_modules,
    lora_of,
)
from opd_cli.objectives.inputs import token_inputs
from opd_cli.objectives.registry import make_objective
from opd_cli.rollout.hf import HFRollout
from opd_cli.teacher.hf import HFTeacher
from opd_cli.training.checkpoint import latest_checkpoint
from opd_cli.training.trainers import StudentLoss, TorchTrainer

from ..conftest import REPO, perturbed_copy
from ..rollout.test_hf import PROMPTS, unpadded_logprobs

TCFG = SimpleNamespace(
    lr=1e-2, betas=[0.9, 0.999], weight_decay=0.0, warmup_steps=0, lr_schedule="constant", max_steps=10,
    max_grad_norm=1.0,
)  # fmt: skip


def lora_cfg(**kw) -> LoraConfig:
    return LoraConfig(enabled=True, r=4, alpha=8.0, **kw)


def scoring_data(model, tokenizer):
    """A rollout batch of ``model``, a perturbed copy's scores of it, and the default objective."""
    batch = HFRollout(model, tokenizer).generate(PROMPTS, 2, 1.0, 1.0, 12, seed=3)
    loss_cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/loss/_base.yaml"), {"k": 8})
    support = HFTeacher(perturbed_copy(model), 8, 1024).score(batch, loss_cfg.k)
    x, _ = token_inputs(batch, support, [], loss_cfg)
    return batch, x, make_objective(loss_cfg)


@pytest.fixture(scope="module")
def deep(tiny_tokenizer):
    """A 3-layer demo Qwen2 in float64, and a batch to train it on."""
    model = build_model(tiny_tokenizer, SimpleNamespace(hidden_size=64, num_layers=3, seed=2)).double()
    return model, scoring_data(model, tiny_tokenizer)


def gradients(model, data, padded: bool) -> tuple[torch.Tensor, int]:
    """The gradient of the student's loss, and how many times the first decoder layer ran for it."""
    batch, x, objective = data
    if padded:
        model._opd_packing_fails = True  # the plain padded forward (models/packed.py padded_hidden)
    runs = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda *_: runs.append(1))
    model.train()
    loss, _ = StudentLoss(model)(batch, x, objective, 1024, 1024)
    loss.backward()
    hook.remove()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]), len(runs)


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpointing_gives_the_same_gradients(deep, lora, padded):
    model, data = deep

    plain = copy.deepcopy(model)
    if lora:
        plain = add_lora(plain, lora_cfg())
        with torch.no_grad():  # B = 0 would give the adapters' A no gradient
            for p in plain.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    ckpt = copy.deepcopy(plain)
    enable_checkpointing(ckpt)
    want, runs_plain = gradients(plain, data, padded)
    got, runs_ckpt = gradients(ckpt, data, padded)
    assert (runs_plain, runs_ckpt) == (1, 2)  # the layer ran again in the backward: it was checkpointed
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def trained_lora(tiny_model, tiny_tokenizer, steps: int = 4, probe: bool = False, precision: str = "fp32", **kw):
    """A LoRA student of the tiny model after a few optimizer steps, its trainer, and the weights it started from.

    ``probe``: choose its decoder first, as the start-up checks do (while the adapters are still zero).
    """
    start = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    model = add_lora(copy.deepcopy(tiny_model), lora_cfg(**kw))
    if probe:
        assert choose_decoder(model) == "buffered"
    batch, x, objective = scoring_data(tiny_model, tiny_tokenizer)
    trainer = TorchTrainer(model, TCFG, precision)
    for _ in range(steps):
        loss, _ = trainer.loss(batch, x, objective, 1024, 1024)
        trainer.backward(loss / x.weight.sum())
        trainer.optimizer_step()
    return model, trainer, start


@pytest.fixture(scope="module")
def trained(tiny_model, tiny_tokenizer):
    return trained_lora(tiny_model, tiny_tokenizer)


def test_lora_trains_the_adapters_only(trained):
    model, trainer, start = trained
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert {id(p) for p in trainer.params} == {id(p) for p in adapters}  # the optimizer sees the adapters only
    assert len(lora_modules(model)) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    base = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert base.keys() == start.keys()
    assert all(torch.equal(base[k], start[k]) for k in start)  # every base weight as it was
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().max() > 0 for p in lora_b)  # B starts at 0: the adapters moved


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 12, 250]])


def test_export_is_the_adapted_model_and_leaves_it_alone(trained, tiny_model):
    model, _, start = trained
    state = export_state_dict(model)
    assert not any("lora_" in k or "base_layer" in k for k in state)
    plain = copy.deepcopy(tiny_model)
    plain.load_state_dict(state)
    torch.testing.assert_close(logits(plain, IDS), logits(model, IDS), rtol=0, atol=1e-5)
    assert not torch.equal(logits(plain, IDS), logits(tiny_model, IDS))  # the adapters change the outputs
    w = model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(w, start["model.layers.0.self_attn.q_proj.weight"])  # merged into a copy only
    assert all(v.data_ptr() != p.data_ptr() for v in state.values() for p in model.parameters())


def test_export_without_lora_is_the_state_dict_copied(tiny_model):
    state = export_state_dict(tiny_model)
    ref = tiny_model.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    assert all(state[k].data_ptr() != ref[k].data_ptr() for k in ref)


def test_a_lora_student_samples_with_its_adapters(tiny_model, tiny_tokenizer):
    """The lean decoding step reads the projections' weights directly, which would leave the adapters
    out (and the start-up probe cannot tell while they are zero): a LoRA student decodes through its
    own layers, and its rollout log-probs after training are its own."""
    model, _, _ = trained_lora(tiny_model, tiny_tokenizer, probe=True)
    assert not LeanDecoder.fits(model)
    batch = HFRollout(model, tiny_tokenizer).generate(PROMPTS, 2, 1.0, 1.0, 12, seed=0)
    for row in range(batch.input_ids.shape[0]):
        real = batch.attention_mask[row].bool()
        ids = batch.input_ids[row][real].tolist()
        resp = batch.response_mask[row][real][1:]
        ref = unpadded_logprobs(model, ids)[resp].gather(-1, torch.tensor(ids[1:])[resp][:, None]).squeeze(-1)
        torch.testing.assert_close(batch.old_logprobs[row][batch.response_mask[row]].double(), ref, atol=1e-4, rtol=0)
    assert lm_head_weight(lora_of(model).peft) is model.lm_head.weight  # found through the peft wrapper


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_lora_checkpoint_loads_with_peft_and_transformers(merge, tiny_model, tiny_tokenizer, tmp_path):
    from peft import PeftModel

    base_dir = tmp_path / "base"
    tiny_model.save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)  # the path the adapter records as its base
    model, trainer, _ = trained_lora(base, tiny_tokenizer, steps=2, merge_on_save=merge)
    ckpt = trainer.save(tmp_path / "run", 2, tiny_tokenizer, {})
    want = logits(model, IDS)
    assert latest_checkpoint(tmp_path / "run") == ckpt  # complete and readable
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), ckpt / ADAPTER_DIR)
    torch.testing.assert_close(logits(peft_model, IDS), want, rtol=0, atol=1e-5)
    if merge:
        merged = AutoModelForCausalLM.from_pretrained(ckpt / "model")
        torch.testing.assert_close(logits(merged, IDS), want, rtol=0, atol=1e-5)
    else:
        assert (ckpt / "model" / "adapter_config.json").is_file()
    # what opd-eval loads from model/: merged either way
    loaded = load_model(str(ckpt / "model"), "model.name_or_path", "float32", torch.device("cpu"))
    assert lora_of(loaded) is None and not lora_modules(loaded)
    torch.testing.assert_close(logits(loaded, IDS), want, rtol=0, atol=1e-5)


def test_a_lora_resume_starts_from_the_saved_adapter(trained, tiny_model, tiny_tokenizer, tmp_path):
    model, trainer, _ = trained
    ckpt = trainer.save(tmp_path, 4, tiny_tokenizer, {})
    resumed = add_lora(copy.deepcopy(tiny_model), lora_cfg(), ckpt / ADAPTER_DIR)
    fresh = TorchTrainer(resumed, TCFG)
    fresh.load(ckpt)
    assert all(a.equal(b) for a, b in zip(trainer.params, fresh.params, strict=True))
    assert all(p.requires_grad for p in fresh.params)  # trainable again, not frozen by the load
    assert fresh.optimizer.state_dict()["state"].keys() == trainer.optimizer.state_dict()["state"].keys()


def test_lora_under_bf16_mixed_keeps_float32_adapters_and_resumes(tiny_model, tiny_tokenizer, tmp_path):
    model, trainer, start = trained_lora(tiny_model, tiny_tokenizer, precision="bf16-mixed")
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(trainer.params) == len(adapters) and all(m.dtype == torch.float32 for m in trainer.params)
    for key, value in model.state_dict().items():
        if "lora_" not in key:  # the base, in bfloat16 and not trained
            assert torch.equal(value, start[key.replace(".base_layer", "")].to(torch.bfloat16)), key
    ckpt = trainer.save(tmp_path, 4, tiny_tokenizer, {})
    fresh = TorchTrainer(add_lora(copy.deepcopy(tiny_model), lora_cfg(), ckpt / ADAPTER_DIR), TCFG, "bf16-mixed")
    fresh.load(ckpt)
    assert all(a.equal(b) for a, b in zip(trainer.params, fresh.params, strict=True))  # the float32 masters
