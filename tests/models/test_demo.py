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


def test_the_tens_first_teacher_is_cached_apart_and_the_default_cache_is_unchanged():
    """demo.teacher_style=tens_first names its own teacher directory beside the shared tokenizer; the default
    demo keeps the cache directory (and so the models) it had before the key existed."""
    from opd_cli.models.demo import demo_dir, demo_model_dir

    from ..conftest import compose_cfg

    default, other = compose_cfg(), compose_cfg(["demo.teacher_style=tens_first"])
    assert demo_dir("m", default.demo, default.task).name == "arith-demo-db5c649b96"
    assert demo_dir("m", other.demo, other.task) == demo_dir("m", default.demo, default.task)
    assert demo_model_dir("m", default.demo, default.task, "teacher").name == "teacher-800"
    assert demo_model_dir("m", other.demo, other.task, "teacher").name == "teacher-tens_first-800"
    assert demo_model_dir("m", other.demo, other.task, "student").name == "student-300"


def test_tens_first_solutions_differ_from_the_first_word_and_end_in_the_sum():
    """The mismatched teacher's SFT data: another wording from its first token on, the right boxed sum."""
    from opd_cli.models.demo import sft_pairs
    from opd_cli.tasks.checking import check_exact

    from ..conftest import compose_cfg

    task = compose_cfg().task
    columns, tens = sft_pairs(task), sft_pairs(task, style="tens_first")
    answers = [p.answer for p in arith_problems(task.seed, "train", task.n_eval)]
    assert [p for p, _ in columns] == [p for p, _ in tens]
    for (_, c), (_, t), answer in zip(columns, tens, answers, strict=True):
        assert t.startswith(" Tens first: ") and not c.startswith(" Tens")
        assert t.endswith(f"\\boxed{{{answer}}}.") and check_exact(t, answer)
