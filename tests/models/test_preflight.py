"""Checks of a model's files before the run directory exists (opd_cli.models.preflight), on the tiny
student saved to disk and broken one way at a time: each is one UserError naming the key and the file.
Hub ids are looked up in a Hugging Face cache laid out in a temporary directory."""

import json
import shutil

import pytest
from huggingface_hub import constants

from opd_cli.errors import UserError
from opd_cli.models.loading import check_same_vocabulary
from opd_cli.models.preflight import preflight

from .tiny import other_vocabulary_model, save_model

KEY = "model.name_or_path"


@pytest.fixture(scope="module")
def saved_student(tiny_model, tiny_tokenizer, tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("student"), tiny_model, tiny_tokenizer)


@pytest.fixture
def student(saved_student, tmp_path):
    """A copy of the saved student that a test may break."""
    return shutil.copytree(saved_student, tmp_path / "student")


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def shard_index(directory):
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}})
    )


BROKEN = {
    "corrupt config.json": (
        lambda d: (d / "config.json").write_text("{not json"),
        r"^model\.name_or_path: \S+/config\.json is not a model config transformers can read: .*not a valid JSON",
    ),
    "config.json without model_type": (
        lambda d: (d / "config.json").write_text("{}"),
        r"^model\.name_or_path: \S+/config\.json is not a model config transformers can read: Unrecognized model",
    ),
    "no config.json": (
        lambda d: (d / "config.json").unlink(),
        r"^model\.name_or_path: \S+/student has no config\.json; give a Hugging Face model directory or hub id$",
    ),
    "no tokenizer files": (
        lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
        r"^model\.name_or_path: \S+/student has no tokenizer files \(tokenizer\.json, ",
    ),
    "corrupt tokenizer.json": (
        lambda d: (d / "tokenizer.json").write_text("{garbage"),
        r"^model\.name_or_path: cannot load the tokenizer in \S+/student: ",
    ),
    "no weight files": (
        lambda d: (d / "model.safetensors").unlink(),
        r"^model\.name_or_path: \S+/student has no weight files \(\*\.safetensors, \*\.bin or a \*\.index\.json\)$",
    ),
    "garbage model.safetensors": (
        lambda d: (d / "model.safetensors").write_bytes(b"\x93garbage, not a safetensors file" * 40),
        r"^model\.name_or_path: \S+/model\.safetensors is not a valid safetensors file \(.*header",
    ),
    "truncated model.safetensors": (
        lambda d: truncate(d / "model.safetensors"),
        r"^model\.name_or_path: \S+/model\.safetensors is not a valid safetensors file \(.*not fully covered",
    ),
    "index naming a missing shard": (
        shard_index,
        r"^model\.name_or_path: \S+/model\.safetensors\.index\.json names 1 shard\(s\) that are missing, "
        r"e\.g\. model-00001-of-00002\.safetensors$",
    ),
}


def test_a_saved_model_passes_with_its_tokenizer_and_rows(saved_student, tiny_tokenizer):
    found = preflight(str(saved_student), KEY, trust_remote_code=False)
    assert found.directory == saved_student
    assert found.rows == len(tiny_tokenizer) == 300
    assert found.tokenizer.get_vocab() == tiny_tokenizer.get_vocab()


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_model_directory_is_one_line_naming_the_key_and_file(name, student):
    breaks, pattern = BROKEN[name]
    breaks(student)
    with pytest.raises(UserError, match=pattern) as e:
        preflight(str(student), KEY, trust_remote_code=False)
    assert "\n" not in str(e.value)


def test_a_file_instead_of_a_directory(student):
    with pytest.raises(UserError, match=r"^model\.name_or_path: \S+/config\.json is not a directory; give a model"):
        preflight(str(student / "config.json"), KEY, trust_remote_code=False)


def test_a_teacher_behind_a_server_needs_no_weights_here(student):
    (student / "model.safetensors").unlink()
    assert preflight(str(student), "teacher.name_or_path", trust_remote_code=False, weights=False).rows == 300


def test_the_vocabulary_check_compares_tokenizers_and_config_rows(saved_student, tmp_path):
    """The comparison build makes on loaded models, made from the files: another vocabulary, and the same
    tokenizer over an embedding of other size (config.json's vocab_size)."""
    student = preflight(str(saved_student), KEY, trust_remote_code=False)
    other = preflight(str(other_vocabulary_model(tmp_path / "other")), "teacher.name_or_path", trust_remote_code=False)
    with pytest.raises(
        UserError, match=r"^teacher\.name_or_path: the teacher's vocabulary does not match the student's \(280 vs 300"
    ):
        check_same_vocabulary(student.tokenizer, other.tokenizer, student.rows, other.rows)
    wide = shutil.copytree(saved_student, tmp_path / "wide")
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "vocab_size": 320}))
    wide_rows = preflight(str(wide), "teacher.name_or_path", trust_remote_code=False).rows
    with pytest.raises(
        UserError, match=r"^teacher\.name_or_path: the teacher's LM head has 320 rows, the student's 300$"
    ):
        check_same_vocabulary(student.tokenizer, student.tokenizer, student.rows, wide_rows)
    check_same_vocabulary(student.tokenizer, student.tokenizer, student.rows, None)  # rows unknown: not compared


# ----------------------------------------------------------------------------- hub ids


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in ``tmp_path/hub``, used by huggingface_hub from here on."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_model(cache, repo_id, source, files=None):
    """``source``'s files (or only ``files``) as the cached ``main`` snapshot of ``repo_id``, laid out as
    huggingface_hub lays out a download (refs/main names the snapshot)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        if files is None or f.name in files:
            shutil.copy(f, snapshot / f.name)
    return snapshot


def test_a_hub_id_not_in_the_cache_offline_is_one_line(hub_cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as e:
        preflight("org/tiny", KEY, trust_remote_code=False)
    assert str(e.value) == (
        "model.name_or_path: cannot load 'org/tiny': it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1, "
        "so it cannot be fetched; download it first or unset HF_HUB_OFFLINE"
    )


def test_a_cached_hub_id_offline_is_checked_in_its_snapshot(hub_cache, saved_student, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = cache_model(hub_cache, "org/tiny", saved_student)
    assert preflight("org/tiny", KEY, trust_remote_code=False).directory == snapshot
    (snapshot / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(UserError, match=r"^model\.name_or_path: \S+/0123abcd/model\.safetensors is not a valid"):
        preflight("org/tiny", KEY, trust_remote_code=False)


def test_online_a_hub_id_is_left_to_the_download(hub_cache, saved_student, monkeypatch, hub_answers):
    """Online, what the cache lacks is fetched at load time: nothing cached is fine, and so is a cached config
    and tokenizer without weights (checked as far as they go)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert preflight("org/absent", KEY, trust_remote_code=False) is None
    cache_model(hub_cache, "org/config-only", saved_student, files={"config.json"})
    assert preflight("org/config-only", KEY, trust_remote_code=False) is None
    cache_model(hub_cache, "org/no-weights", saved_student, files={"config.json", "tokenizer.json"})
    assert preflight("org/no-weights", KEY, trust_remote_code=False).rows == 300
