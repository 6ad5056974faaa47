"""Tiny model directories on disk, as a user would point model.name_or_path / teacher.name_or_path at them:
the shared tiny student (tests/conftest.py ``tiny_model``, ``tiny_tokenizer``) saved with its tokenizer, and a
teacher whose tokenizer is another vocabulary (the same text, 280 tokens instead of 300), built the same way."""

from pathlib import Path
from types import SimpleNamespace

from opd_cli.models.demo import build_model, train_tokenizer
from opd_cli.tasks.problems import arith_problems


def save_model(directory: Path, model, tokenizer) -> Path:
    """``model`` and ``tokenizer`` saved in ``directory`` (config.json, model.safetensors, tokenizer files)."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def other_vocabulary_model(directory: Path) -> Path:
    """A 1-layer Qwen2 in ``directory`` whose tokenizer and embedding differ from the tiny student's."""
    texts = [f"Question: {p.question}\nAnswer: {p.solution}" for p in arith_problems(0, "train", 256)[:2000]]
    tokenizer = train_tokenizer(texts, 280)
    model = build_model(tokenizer, SimpleNamespace(hidden_size=64, num_layers=1, seed=2))
    return save_model(directory, model, tokenizer)
