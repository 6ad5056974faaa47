"""The demo models (models/demo.py): the tokenizer round trip and the model shape."""

from transformers import AutoTokenizer

from opd_cli.models.demo import build_model
from opd_cli.tasks.problems import arith_problems


def test_tokenizer_reload_keeps_ids(tiny_tokenizer, tiny_model, tmp_path):
    """Saved beside a Qwen2 config, AutoTokenizer (and vLLM) rebuild it as Qwen2's tokenizer."""
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [p.question + " " + p.solution for p in arith_problems(1, "test", 500)]
    texts += ["37 + 48 = 85", "  spaces\tand\nnewlines  ", "Ünïcödé 12345 <|im_end|>"]
    for text in texts:
        assert reloaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"], text


def test_demo_model_has_head_size_64(tiny_tokenizer):
    from types import SimpleNamespace

    model = build_model(tiny_tokenizer, SimpleNamespace(hidden_size=128, num_layers=1, seed=0))
    assert model.config.hidden_size // model.config.num_attention_heads == 64
