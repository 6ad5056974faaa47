"""Checks of a model's files before any run directory exists, without loading its weights.

``preflight`` finds the directory that holds a model (a local directory, or a hub id's snapshot
in the local Hugging Face cache) and refuses, in one line naming the config key and the file,
what would otherwise fail only after the run directory is made, or with a traceback: no
``config.json`` or one that does not parse, no tokenizer files or a tokenizer that does not load,
no weight files, a safetensors file whose header is garbage (only the header is read, never a
tensor). What it returns (the tokenizer and the config's ``vocab_size``) is what
``loading.check_same_vocabulary`` compares between student and teacher.

A hub id missing from the cache is refused when ``HF_HUB_OFFLINE`` is set (nothing can fetch it);
online it is left to the download at load time, and so are the weights of a cached one, once one
request has shown the hub can be reached (else the line says to set ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opd_cli.errors import UserError
from opd_cli.models.loading import looks_local

# files that hold a vocabulary (BPE, WordPiece, SentencePiece, tiktoken); without one,
# AutoTokenizer builds a tokenizer of the special tokens alone instead of failing
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
TOKENIZER_SUFFIXES = (".model", ".tiktoken")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.index.json")


@dataclass(frozen=True)
class ModelFiles:
    """A model's directory, its tokenizer, and the rows of its embedding as its config gives them."""

    directory: Path
    tokenizer: Any
    rows: int | None  # config.json's vocab_size (of the text model); None where the config has none


def offline() -> bool:
    """Whether the Hugging Face hub may not be reached (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


HUB_PROBE_TIMEOUT_S = 3.0


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here (one request, ``HUB_PROBE_TIMEOUT_S`` at most),
    or None. Asked once per process, and only where a hub id is to be fetched: without it, an off-line
    machine retries for about a minute, with doubled warnings, before the load fails."""
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S)
    except urllib.error.HTTPError:
        return None  # the hub answered
    except (urllib.error.URLError, OSError) as e:
        return f"{constants.ENDPOINT} cannot be reached ({getattr(e, 'reason', e)})"
    return None


def check_hub_reachable(what: str, key: str) -> None:
    """Refuse, in seconds, to fetch ``what`` from a hub that cannot be reached; say how to use the cache."""
    if why := hub_unreachable():
        raise UserError(
            f"{key}: cannot fetch '{what}': {why}; set HF_HUB_OFFLINE=1 to use the local cache, "
            "or download it on a machine with network first"
        )


def cached_snapshot(repo_id: str) -> Path | None:
    """The local cache's snapshot directory of ``repo_id`` (its ``main`` revision) holding a
    ``config.json``; None where the cache has none. Reads the cache only, never the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def has_tokenizer_files(directory: Path) -> bool:
    return any(p.name in TOKENIZER_FILES or p.suffix in TOKENIZER_SUFFIXES for p in directory.iterdir() if p.is_file())


def first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def config_rows(directory: Path, key: str, trust_remote_code: bool) -> int | None:
    """``config.json`` parsed by ``AutoConfig`` (local files only): its text model's ``vocab_size``."""
    from transformers import AutoConfig

    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"{key}: {directory} has no config.json; give a Hugging Face model directory or hub id")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{key}: {config_file} is not a model config transformers can read: {first_line(e)}") from None
    return getattr(config.get_text_config(), "vocab_size", None)


def tokenizer_of(directory: Path, key: str, trust_remote_code: bool):
    """The tokenizer in ``directory`` (local files only)."""
    from transformers import AutoTokenizer

    if not has_tokenizer_files(directory):
        raise UserError(
            f"{key}: {directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)} or *.model); "
            "save the tokenizer beside the model"
        )
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # a malformed tokenizer.json raises the tokenizers library's bare Exception
        raise UserError(f"{key}: cannot load the tokenizer in {directory}: {first_line(e)}") from None


def check_safetensors(path: Path, key: str) -> None:
    """Refuse a safetensors file whose header does not parse or does not cover the file (a truncated
    or foreign file). ``safe_open`` reads the header alone; the tensors stay on disk."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise UserError(f"{key}: {path} is not a valid safetensors file ({first_line(e)})") from None


def check_index(path: Path, key: str) -> None:
    """A sharded checkpoint's index (``*.index.json``) parses and every shard it names is there."""
    try:
        shards = set(json.loads(path.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{key}: {path} is not a weight index (a JSON object with a weight_map): {e}") from None
    if missing := sorted(s for s in shards if not (path.parent / s).is_file()):
        raise UserError(f"{key}: {path} names {len(missing)} shard(s) that are missing, e.g. {missing[0]}")


def check_weights(directory: Path, key: str) -> None:
    """At least one weight file (``WEIGHT_PATTERNS``); every index complete, every safetensors header sane."""
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern)})
    if not files:
        raise UserError(f"{key}: {directory} has no weight files (*.safetensors, *.bin or a *.index.json)")
    for path in files:
        if path.name.endswith(".index.json"):
            check_index(path, key)
        elif path.suffix == ".safetensors":
            check_safetensors(path, key)


def model_directory(name_or_path: str, key: str) -> tuple[Path | None, bool]:
    """Where the model's files are now, and whether they must be complete there.

    A local directory must be; a hub id's cached snapshot must be when offline (nothing can fetch
    what is missing), and is (None, False) when online and not cached: the load downloads it.
    """
    if looks_local(name_or_path):
        directory = Path(name_or_path).expanduser()
        if not directory.is_dir():
            raise UserError(f"{key}: {name_or_path} is not a directory; give a model directory or a hub id")
        return directory, True
    snapshot = cached_snapshot(name_or_path)
    if snapshot is None and offline():
        raise UserError(
            f"{key}: cannot load '{name_or_path}': it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1, "
            "so it cannot be fetched; download it first or unset HF_HUB_OFFLINE"
        )
    if not offline():
        check_hub_reachable(name_or_path, key)
    return snapshot, offline()


def preflight(name_or_path: str, key: str, trust_remote_code: bool, weights: bool = True) -> ModelFiles | None:
    """Check the files of the model config key ``key`` names, without loading its weights.

    ``weights``: whether this process loads the weights (not for a teacher behind a server).
    Returns None for a hub id that is downloaded at load time (online, not fully cached).
    """
    directory, complete = model_directory(name_or_path, key)
    if directory is None or (not complete and not has_tokenizer_files(directory)):
        return None  # online: what the cache lacks is fetched at load time
    rows = config_rows(directory, key, trust_remote_code)
    tokenizer = tokenizer_of(directory, key, trust_remote_code)
    if weights and complete:
        check_weights(directory, key)
    return ModelFiles(directory, tokenizer, rows)
