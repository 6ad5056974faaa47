"""Loading the student and teacher: hub ids, local directories, or the demo models."""

from __future__ import annotations

from pathlib import Path

import torch

from opd_cli.cpu_linear import use_onednn
from opd_cli.errors import UserError
from opd_cli.models.demo import arith_task, ensure_demo_model
from opd_cli.models.student import adapter_base

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_path(name_or_path: str, cfg) -> str:
    """``demo:<role>`` -> the demo model (built on first use); anything else unchanged.

    The demo models are built on the arith task's data: a run of another task (an environment's, a
    reasoning-gym family's) gets the arith preset's models, so every task of a run shares one demo."""
    if name_or_path.startswith("demo:"):
        role = name_or_path.removeprefix("demo:")
        task = cfg.task if cfg.task.name == "arith" else arith_task()
        return str(ensure_demo_model(cfg.paths.models, cfg.demo, task, role))
    return str(Path(name_or_path).expanduser()) if looks_local(name_or_path) else name_or_path


def _load_error(key: str, path: str, err: Exception) -> UserError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    if looks_local(path):
        return UserError(f"{key}: cannot load a model from local directory {path}: {first}")
    return UserError(
        f"{key}: cannot load '{path}': not in the local Hugging Face cache and it cannot be fetched (offline?): {first}"
    )


def load_tokenizer(path: str, key: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(key, path, e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str, key: str, dtype: str, device: torch.device, trust_remote_code: bool = False, cpu_linear: str = "auto"
):
    """The model on ``device``, its linear layers on oneDNN where ``cpu_linear`` says so (see cpu_linear.py).

    A directory holding a LoRA adapter without merged weights (a checkpoint's ``model/`` saved with
    ``model.lora.merge_on_save=false``) is loaded as its base model with the adapter merged in.
    """
    from transformers import AutoModelForCausalLM

    base = adapter_base(Path(path)) if looks_local(path) else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base or path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
        if base is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path, autocast_adapter_dtype=False).merge_and_unload()
    except (OSError, ValueError) as e:
        raise _load_error(key, path, e) from None
    return use_onednn(model.to(device), cpu_linear)


def check_same_vocabulary(student_tok, teacher_tok, s_rows: int | None, t_rows: int | None) -> None:
    """OPD compares distributions id by id: both sides need one vocabulary.

    ``s_rows``, ``t_rows``: the rows of each LM head (the loaded weights', or config.json's
    ``vocab_size`` before loading); None where unknown, and then not compared.
    """
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        differ = len(set(s_vocab.items()) ^ set(t_vocab.items()))
        raise UserError(
            f"teacher.name_or_path: the teacher's vocabulary does not match the student's "
            f"({len(t_vocab)} vs {len(s_vocab)} tokens, {differ} token-id pairs differ)"
        )
    if None not in (s_rows, t_rows) and s_rows != t_rows:
        raise UserError(f"teacher.name_or_path: the teacher's LM head has {t_rows} rows, the student's {s_rows}")


def lm_head_weight(model) -> torch.Tensor:
    """The [V, d] output embedding; logits = hidden @ W.T (no bias, no soft-capping).

    A peft wrapper (``PeftModel``) is looked through to the transformers model it wraps; the
    head itself never holds an adapter (``models.student.add_lora``).
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.get_output_embeddings().weight


def looks_local(name_or_path: str) -> bool:
    """A local directory rather than a hub id ("org/name" or "name")."""
    return (
        name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1 or Path(name_or_path).exists()
    )
