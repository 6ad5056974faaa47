"""The student set up for training, and its export: activation checkpointing and LoRA adapters (peft).

Activation checkpointing (``trainer.gradient_checkpointing``) is transformers' own, per
decoder layer and non-reentrant: a layer keeps only its input in the forward and recomputes
the rest in the backward. The recomputation runs under the attention implementation the
forward ran under (``enable_checkpointing``): the packed scoring pass (``models.packed``)
switches the model's attention implementation only for the length of its forward, and the
backward comes after it.

LoRA (``model.lora``): peft puts low-rank adapters on the chosen linear layers and freezes
every other weight. The trainers, objectives and decoders keep working on the transformers
model itself (``PeftModel.get_base_model()``: its layers now hold the adapters), so ``model``,
``model.base_model`` and the LM head mean what they meant without LoRA. The ``PeftModel`` is
kept beside it (``lora_of``) to save the adapter in peft's format. Exports (checkpoints, the
weights pushed into a vLLM engine) merge the adapters into new tensors, ``W + scale * B A``;
the base weights are never changed.

A checkpoint of a LoRA student (``save_student``) holds ``adapter/`` (peft's
``save_pretrained``: ``PeftModel.from_pretrained(base, adapter)`` loads it, and a resume
reads it) and ``model/``: with ``model.lora.merge_on_save`` the merged model in HF format,
otherwise the adapter again beside the base's ``config.json`` (``loading.load_model`` merges
such a directory onto its base).
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opd_cli.dist import save_pretrained
from opd_cli.errors import UserError
from opd_cli.models.attention import attention_implementation

# the directory of a checkpoint that holds the LoRA adapter
ADAPTER_DIR = "adapter"
# where the peft wrapper of a LoRA student is kept, in the transformers model's __dict__ (not a submodule)
_LORA = "_opd_lora"


@dataclass
class Lora:
    """A LoRA student's peft wrapper and how its checkpoints are written."""

    peft: Any  # peft.PeftModel around the transformers model
    merge_on_save: bool


def lora_of(model) -> Lora | None:
    """The ``Lora`` of a student ``add_lora`` returned; None for a model without adapters."""
    return model.__dict__.get(_LORA)


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer of the transformers ``model`` (in training mode only).

    Each layer's recomputation in the backward runs under the attention implementation its
    forward ran under. No hook makes the embeddings' output require a gradient: non-reentrant
    checkpointing needs none, and sampling and probing stay as they were.
    """

    def recompute_like_forward():
        name = model.config._attn_implementation  # read in the forward, restored in the recomputation
        return nullcontext(), attention_implementation(model, name)

    if not model.supports_gradient_checkpointing:
        raise UserError(
            f"trainer.gradient_checkpointing: transformers has no gradient checkpointing for "
            f"{model.config.model_type} models; set it to false"
        )
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": recompute_like_forward}
    )
    model.disable_input_require_grads()


def add_lora(model, lcfg, adapter: Path | None = None):
    """``model`` with LoRA adapters of ``lcfg`` (``model.lora``), every other weight frozen.

    The adapters start as peft initialises them (``B = 0``: the model's outputs do not change),
    or from the saved ``adapter`` directory (a resume). They take the model's dtype. Returns
    the transformers model (``lora_of`` gives its peft wrapper).
    """
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        if adapter is None:
            config = peft.LoraConfig(
                r=lcfg.r,
                lora_alpha=lcfg.alpha,
                lora_dropout=lcfg.dropout,
                target_modules=list(lcfg.target_modules),
                bias="none",
                task_type="CAUSAL_LM",
            )
            wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
        else:
            wrapped = peft.PeftModel.from_pretrained(model, adapter, is_trainable=True, autocast_adapter_dtype=False)
    except ValueError as e:  # peft: none of the target modules is in the model
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"model.lora.target_modules: {first}") from None
    inner = wrapped.get_base_model()
    for what, module in (("input embedding", inner.get_input_embeddings()), ("LM head", inner.get_output_embeddings())):
        if isinstance(module, BaseTunerLayer):
            raise UserError(
                f"model.lora.target_modules: the {what} got an adapter; adapters go on the decoder layers' "
                "linear layers only (the objectives read the LM head's weight directly)"
            )
    inner.__dict__[_LORA] = Lora(wrapped, bool(lcfg.merge_on_save))
    return inner


def lora_modules(model) -> dict[str, Any]:
    """The modules of ``model`` that hold a LoRA adapter, by name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def export_state_dict(model, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The student's weights under the transformers model's own names, as new tensors.

    With LoRA, each adapted weight is merged (``W + scale * B A``, in ``W``'s dtype) and the
    adapters' own tensors are left out: what ``from_pretrained`` and a vLLM engine load.
    ``device``: where the tensors go (default: where the weights are).
    """
    state = model.state_dict()
    if lora_of(model) is None:
        return {k: v.detach().to(device, copy=True) for k, v in state.items()}
    deltas = {}
    for name, module in lora_modules(model).items():
        if not module.merged:
            for a in module.active_adapters:
                delta = module.get_delta_weight(a)
                deltas[name] = delta if name not in deltas else deltas[name] + delta
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue  # the adapters' A, B (and their dropout): merged below
        if "base_layer" in parts:
            i = parts.index("base_layer")
            owner, key = ".".join(parts[:i]), ".".join(parts[:i] + parts[i + 1 :])
            if parts[-1] == "weight" and owner in deltas:
                out[key] = (value.to(device) + deltas[owner].to(device)).to(value.dtype)
                continue
        out[key] = value.detach().to(device, copy=True)
    return out


def save_student(model, directory: Path, tokenizer) -> None:
    """The student in a checkpoint ``directory``: ``model/`` (HF format and tokenizer), with LoRA also ``adapter/``.

    See the module docstring for what ``model/`` holds with LoRA.
    """
    lora = lora_of(model)
    out = directory / "model"
    if lora is None:
        save_pretrained(model, out)  # no DeepSpeed import on the plain-torch path
    else:
        lora.peft.save_pretrained(directory / ADAPTER_DIR, safe_serialization=True)
        if lora.merge_on_save:
            state = export_state_dict(model, "cpu")
            for key in tied_copies(model):  # as save_pretrained leaves them out (tied embeddings)
                state.pop(key, None)
            save_pretrained(model, out, state_dict=state)
        else:
            shutil.copytree(directory / ADAPTER_DIR, out)
            model.config.save_pretrained(out)  # the base's config: the checkpoint says what model it is
    tokenizer.save_pretrained(out)


def tied_copies(model) -> set[str]:
    """Keys of ``model.state_dict()`` whose tensor an earlier key already holds (tied weights)."""
    seen, copies = set(), set()
    for key, value in model.state_dict().items():
        if value.data_ptr() in seen:
            copies.add(key)
        seen.add(value.data_ptr())
    return copies


def adapter_base(directory: Path) -> str | None:
    """The base model a directory holding a peft adapter was trained on; None for a directory without one."""
    config = Path(directory) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text())["base_model_name_or_path"]
