"""A small SFT data set as ``opd-data teacher-rollouts`` writes one (the shared contract's columns), for the
tests of ``rollout=dataset`` and ``loss=sft``: arith training problems with their worked solutions."""

from pathlib import Path

from opd_cli.tasks.problems import arith_problems


def write_sft_data(directory: Path, n: int = 16, **columns) -> Path:
    """The first ``n`` arith training problems, each with its worked solution as the response, saved with
    ``save_to_disk`` in ``directory``; ``columns`` replace or add columns (a list of ``n`` values each)."""
    import datasets

    problems = arith_problems(0, "train", 256)[:n]
    data = {
        "question": [p.question for p in problems],
        "answer": [p.answer for p in problems],
        "response": [p.solution for p in problems],
        "response_tokens": [len(p.solution.split()) for p in problems],
        "correct": [True] * n,
        "problem": list(range(n)),
        "sample": [0] * n,
        **columns,
    }
    datasets.Dataset.from_dict(data).save_to_disk(str(directory))
    return Path(directory)
