"""Malformed task data files, each with the end of the one line it must get.

A file is read with ``task.question_key=question`` and ``task.answer_key=answer`` (the layout of
the base task and of the amc23 preset). The message starts ``<key>: <file><end>``.
"""

from pathlib import Path

GOOD_ROW = b'{"question": "What is 1+1?", "answer": "2"}\n'


def _parquet(columns: dict) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


# (id, file name, content, the start of the message after "<key>: <file>": all of it but for pyarrow's words)
BAD_FILES = [
    ("empty", "empty.jsonl", b"", ": no rows (an empty file)"),
    ("blank-lines", "blank.jsonl", b"\n  \n", ": no rows (an empty file)"),
    (
        "not-json",
        "bad.jsonl",
        GOOD_ROW + b"{question: oops\n",
        " line 2: not JSON (Expecting property name enclosed in double quotes at column 2); "
        "a jsonl file has one object per line",
    ),
    ("not-an-object", "list.jsonl", GOOD_ROW + b'["q", "1"]\n', " line 2: not a JSON object but a list"),
    (
        "no-question",
        "noq.jsonl",
        GOOD_ROW + b'{"problem": "q", "answer": "1"}\n',
        " line 2: no field 'question' (task.question_key); the row's fields: problem, answer",
    ),
    (
        "no-answer",
        "noa.jsonl",
        GOOD_ROW + GOOD_ROW + b'{"question": "q"}\n',
        " line 3: no field 'answer' (task.answer_key); the row's fields: question",
    ),
    (
        "question-not-a-string",
        "qnum.jsonl",
        b'{"question": 7, "answer": "1"}\n',
        " line 1: field 'question' must be a non-empty string, got a number",
    ),
    (
        "empty-question",
        "qempty.jsonl",
        b'{"question": "  ", "answer": "1"}\n',
        " line 1: field 'question' must be a non-empty string, got an empty string",
    ),
    (
        "null-answer",
        "anull.jsonl",
        b'{"question": "q", "answer": null}\n',
        " line 1: field 'answer' must be a non-empty string or a number, got null",
    ),
    (
        "not-utf8",
        "latin1.jsonl",
        GOOD_ROW + '{"question": "café?", "answer": "1"}\n'.encode("latin-1"),
        " line 2: not UTF-8 text (byte 0xe9 at column 18)",
    ),
    (
        "text-named-parquet",
        "data.parquet",
        b"question,answer\nWhat is 1+1?,2\n",
        ": not a parquet file (Parquet magic bytes not found",  # then pyarrow's words
    ),
    (
        "parquet-missing-column",
        "nocol.parquet",
        _parquet({"question": ["a", "b"], "solution": ["1", "2"]}),
        ": no column 'answer' (task.answer_key=answer); its columns: question, solution",
    ),
]


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path
