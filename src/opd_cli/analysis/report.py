"""``opd-report DIR``: plots and a table for one run or a multirun sweep directory.

A run is a directory with ``metrics.jsonl`` (and ``summary.json`` when it finished). A
sweep is a directory whose subdirectories (any depth) are runs. Each run is labelled by
the overrides that differ between the runs (from Hydra's ``.hydra/overrides.yaml``). The
report goes to ``DIR/report/``: one PNG per training curve and ``report.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

CURVES = [
    ("loss", "loss (token mean)"),
    ("grad_norm", "gradient norm before clipping"),
    ("pg_clipfrac", "PPO clip fraction"),
    ("response_clip_ratio", "share of responses at the length limit"),
    ("entropy", "student entropy (nats / token)"),
    ("logprob_gap", "log q(y) - log p(y) (nats / token)"),
    ("overlap_ratio", "top-K overlap |TopK(p) ∩ TopK(q)| / K"),
    ("eval/acc", "held-out accuracy (avg@k)"),
]


TABLE = ["loss", "grad_norm", "entropy", "logprob_gap", "overlap_ratio"]


SUMMARY = ["acc_before", "acc_after", "acc_teacher", "gap_recovery"]


def find_runs(root: Path) -> list[Path]:
    """``root`` itself if it is a run, else every run below it (sorted)."""
    if (root / "metrics.jsonl").exists():
        return [root]
    return sorted(p.parent for p in root.rglob("metrics.jsonl") if "report" not in p.parts)


def read_metrics(run: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``; a ``ValueError`` naming the file (and line) if one is
    not a JSON object with an integer ``step``, or if there is none."""
    path = run / "metrics.jsonl"
    rows = []
    for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{line_no}: not valid JSON") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError(f"{path}:{line_no}: not a metrics row (a JSON object with an integer step)")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


def read_summary(run: Path) -> dict:
    """A run's ``summary.json`` ({} before the run finished); a ``ValueError`` naming it if it is damaged."""
    path = run / "summary.json"
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text(errors="replace"))
    except json.JSONDecodeError:
        raise ValueError(f"{path}: not valid JSON") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: not a JSON object")
    return summary


def overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []

    return [str(o) for o in OmegaConf.load(path)]


def labels(runs: list[Path]) -> list[str]:
    """The overrides that differ between runs (the run directory's name if none do)."""
    sets = [overrides(r) for r in runs]
    common = set.intersection(*(set(s) for s in sets)) if sets else set()
    out = []
    for run, own in zip(runs, sets, strict=True):
        differ = [o for o in own if o not in common and not o.startswith(("hydra.", "paths."))]
        out.append(" ".join(differ) if differ else run.name)
    return out


def plot_curves(data: list[list[dict]], names: list[str], out: Path) -> list[Path]:
    """One PNG per training curve in ``out``, a line per run (``data``: each run's metrics rows)."""
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    from matplotlib.ticker import MaxNLocator

    files = []
    for key, title in CURVES:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        drawn = False
        for rows, name in zip(data, names, strict=True):
            points = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=name)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def fmt(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(root: Path) -> Path:
    """Plots and ``report.md`` for the run or sweep at ``root``; returns the report's path."""
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"{root}: no run directory (metrics.jsonl) found")
    # every file is read (and refused if damaged) before anything is written
    data, summaries = [read_metrics(r) for r in runs], [read_summary(r) for r in runs]
    out = root / "report"
    out.mkdir(exist_ok=True)
    names = labels(runs)
    files = plot_curves(data, names, out)
    lines = [f"# Report: {root}", "", f"{len(runs)} run(s). Final training metrics and evaluation:", ""]
    lines.append("| run | step | " + " | ".join(TABLE + SUMMARY) + " |")
    lines.append("|---" * (2 + len(TABLE) + len(SUMMARY)) + "|")
    for all_rows, summary, name in zip(data, summaries, names, strict=True):
        rows = [r for r in all_rows if "loss" in r]
        last = rows[-1] if rows else {}
        cells = (
            [name, fmt(last.get("step"))] + [fmt(last.get(k)) for k in TABLE] + [fmt(summary.get(k)) for k in SUMMARY]
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Training curves", ""]
    lines += [f"![{f.stem}]({f.name})" for f in files]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
