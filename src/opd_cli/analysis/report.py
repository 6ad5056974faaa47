"""``opd-report DIR [DIR ...] [key=value ...]``: plots and a table for runs and multirun sweeps.

A run is a directory with ``metrics.jsonl`` (and ``summary.json`` when it finished); a sweep is a
directory whose subdirectories (any depth) are runs. Several directories make one report.

- **Groups.** Runs found under the same directory whose saved configs (``run_config.yaml``, or
  Hydra's ``.hydra/config.yaml``) differ only in ``trainer.seed`` (and in ``paths``, ``logger``)
  are one group, drawn as the mean over its seeds with a band (``band``: min-max or one sample
  standard deviation). A run without a saved config is a group of its own.
- **Labels.** The overrides (``.hydra/overrides.yaml``, else the saved config's values) that
  differ between groups; with several directories each label starts with its directory.
- **Smoothing.** ``smooth=w`` draws the exponential moving average ``s_0 = x_0``,
  ``s_i = w s_{i-1} + (1 - w) x_i`` over each run's logged points (0: none), with the raw curve
  faint behind it; the band is taken over the smoothed runs. ``eval/*`` curves (a few points) are
  never smoothed.
- **Which metrics.** ``metrics=[...]`` or the default ``CURVES``; a clip fraction only for runs
  whose objective clips (``loss.objective=sampled_token``; the dual-clip fraction also needs
  ``loss.dual_clip``); metrics whose scale depends on K (``overlap_*``, ``teacher_rank``) get one
  panel per K (``loss.diag_k`` or ``loss.k``) when the runs differ in it.
- **Accuracy.** The teacher's accuracy and the student's before training (step 0, or
  ``summary.json``) are horizontal lines on the ``eval/acc`` plot.

The report goes to ``DIR/report/`` (the first ``DIR``'s, or ``out=``): each plot in every format
of ``formats`` and ``report.md``. Every file is read, and every key checked, before anything is
written; bad input is a ``ValueError``/``FileNotFoundError``/``UserError`` naming the file or key.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf

from opd_cli.analysis.plots import BAND_WORDS, BANDS, draw_band
from opd_cli.config.rundir import leaves, resumable, saved_config
from opd_cli.errors import UserError

CURVES = [
    ("loss", "loss (token mean)"),
    ("grad_norm", "gradient norm before clipping"),
    ("pg_clipfrac", "PPO clip fraction"),
    ("pg_clipfrac_lower", "PPO dual-clip fraction"),
    ("response_clip_ratio", "share of responses at the length limit"),
    ("entropy", "student entropy (nats / token)"),
    ("logprob_gap", "log q(y) - log p(y) (nats / token)"),
    ("overlap_ratio", "top-K overlap |TopK(p) ∩ TopK(q)| / K"),
    ("eval/acc", "held-out accuracy (avg@k)"),
]


TITLES = dict(CURVES)


TABLE = ["loss", "grad_norm", "entropy", "logprob_gap", "overlap_ratio"]


SUMMARY = ["acc_before", "acc_after", "acc_teacher", "gap_recovery"]


FORMATS = ("png", "pdf", "svg")


# the key=value arguments of opd-report
KEYS = ("dirs", "smooth", "band", "metrics", "formats", "out")


USAGE = (
    "usage: opd-report DIR [DIR ...] [smooth=0.6] [band=minmax|std] [metrics=[loss,eval/acc]] "
    "[formats=[png,pdf,svg]] [out=DIR]"
)


# config keys (and groups of keys) that do not make two runs different experiments
NOT_THE_EXPERIMENT = ("trainer.seed", "paths", "logger", "hydra")


# the objective whose loss clips (policy_gradient.build: clip unless sampled_token_is); a divergence's
# outcome term clips too, but its flags are the divergence's (all zero): only this one reports a clip
CLIPPING_OBJECTIVE = "sampled_token"


# what the teacher and baseline lines on the eval/acc plot are read from: (step-0 metric, summary key)
REFERENCES = {"teacher": ("eval/acc_teacher", "acc_teacher"), "student before training": ("eval/acc", "acc_before")}


# config groups that decide the teacher's and the untrained student's accuracy
REFERENCE_CONFIG = ("model.", "teacher.", "task.", "eval.", "demo.")


@dataclass
class Options:
    """What to report on and how (the ``key=value`` arguments)."""

    dirs: list[Path]
    smooth: float = 0.0
    band: str = "minmax"
    metrics: list[str] | None = None
    formats: tuple[str, ...] = ("png", "pdf")
    out: Path | None = None


@dataclass
class Run:
    path: Path
    root: Path  # the directory given on the command line the run was found under
    rows: list[dict]
    summary: dict
    config: dict[str, Any] | None  # every value of the saved config by dotted key; None: no saved config
    overrides: list[str] = field(default_factory=list)

    @property
    def seed(self) -> Any:
        return None if self.config is None else self.config.get("trainer.seed")

    @property
    def k(self) -> int | None:
        """The K of the overlap diagnostics (``loss.diag_k``, else ``loss.k``)."""
        if self.config is None:
            return None
        return self.config.get("loss.diag_k") or self.config.get("loss.k")


# --- arguments -------------------------------------------------------------------------------------------------

_OPTION = re.compile(r"([a-z_]+)=(.*)", re.S)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _names(key: str, value: Any) -> list[str]:
    """A list of names (``[a,b]``, or one name); a ``UserError`` naming ``key`` otherwise."""
    items = value if isinstance(value, list) else str(value).split(",") if isinstance(value, str) else [value]
    if not items or any(not isinstance(i, str | int | float) or isinstance(i, bool) or str(i) == "" for i in items):
        raise UserError(f"{key}: a list of names such as {key}=[a,b], got {value!r}")
    return [str(i) for i in items]


def parse_args(argv: Sequence[str]) -> Options:
    """``DIR ...`` and ``key=value`` arguments (values in YAML: ``metrics=[loss,eval/acc]``); a ``UserError``
    naming the key for an unknown key or a bad value. An argument is a key when it starts with a lower-case
    word and ``=``; anything else is a directory."""
    dirs: list[Path] = []
    given: dict[str, Any] = {}
    for arg in argv:
        m = _OPTION.fullmatch(arg)
        if m is None:
            dirs.append(Path(arg))
            continue
        key, text = m.groups()
        if key not in KEYS:
            raise UserError(f"{key}: not an opd-report key; the keys are {', '.join(KEYS)} (directories have no '=')")
        try:
            given[key] = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            raise UserError(f"{key}: cannot parse {text!r} (lists are written [a,b])") from None
    opts = Options(dirs=dirs + [Path(d) for d in _names("dirs", given["dirs"])] if "dirs" in given else dirs)
    if "smooth" in given:
        smooth = given["smooth"]
        try:  # YAML reads 1e-1 as a string
            smooth = float(smooth) if isinstance(smooth, str) else smooth
        except ValueError:
            pass
        if not _number(smooth) or not 0 <= smooth < 1:
            raise UserError(f"smooth: the EMA weight of the past, a number in [0, 1) (0: no smoothing), got {smooth!r}")
        opts.smooth = float(smooth)
    if "band" in given:
        if given["band"] not in BANDS:
            raise UserError(
                f"band: one of {', '.join(BANDS)} (min-max over seeds, or ± one std), got {given['band']!r}"
            )
        opts.band = given["band"]
    if "metrics" in given:
        opts.metrics = _names("metrics", given["metrics"])
    if "formats" in given:
        formats = _names("formats", given["formats"])
        if bad := [f for f in formats if f not in FORMATS]:
            raise UserError(f"formats: each one of {', '.join(FORMATS)}, got {bad[0]!r}")
        opts.formats = tuple(dict.fromkeys(formats))
    if "out" in given:
        if not isinstance(given["out"], str) or not given["out"]:
            raise UserError(f"out: a directory for the report, got {given['out']!r}")
        opts.out = Path(given["out"])
    if not opts.dirs:
        raise UserError(f"dirs: no run or sweep directory given; {USAGE}")
    return opts


# --- reading runs ----------------------------------------------------------------------------------------------


def find_runs(root: Path) -> list[Path]:
    """``root`` itself if it is a run, else every run below it (sorted; earlier reports left out)."""
    if (root / "metrics.jsonl").exists():
        return [root]
    found = (p.parent for p in root.rglob("metrics.jsonl"))
    return sorted(p for p in found if "report" not in p.relative_to(root).parts)


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


def read_config(run: Path) -> dict[str, Any] | None:
    """Every value of the run's saved config by dotted key (as saved, unresolved); None if it has none."""
    saved = saved_config(run)
    return None if saved is None else leaves(OmegaConf.to_container(saved, resolve=False))


def overrides(run: Path) -> list[str]:
    path = run / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    try:
        return [str(o) for o in OmegaConf.load(path)]
    except Exception:  # noqa: BLE001 - any parse error of a damaged file
        raise ValueError(f"{path}: not a YAML list of overrides") from None


def load_runs(roots: Sequence[Path]) -> list[Run]:
    """Every run under each root, every file read (a damaged one refused, naming it)."""
    runs: list[Run] = []
    seen: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a directory (a run or a sweep directory)")
        paths = find_runs(root)
        if not paths:
            raise FileNotFoundError(f"{root}: no run directory (metrics.jsonl) found")
        for path in paths:
            if path.resolve() in seen:  # a run below two of the directories given
                continue
            seen.add(path.resolve())
            runs.append(Run(path, root, read_metrics(path), read_summary(path), read_config(path), overrides(path)))
    return runs


# --- groups and labels -----------------------------------------------------------------------------------------


def not_the_experiment(key: str) -> bool:
    key = key.lstrip("+~")
    return any(key == k or key.startswith((k + ".", k + "/")) for k in NOT_THE_EXPERIMENT)


def identity(run: Run) -> tuple:
    """Runs with the same identity differ only in their seed (and where they keep files or log)."""
    if run.config is None:
        return (str(run.root), str(run.path))
    return (str(run.root), tuple(sorted((k, repr(v)) for k, v in run.config.items() if not not_the_experiment(k))))


def group_runs(runs: list[Run]) -> list[list[Run]]:
    """Runs by ``identity``, in the order they were found (each group sorted by seed)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(identity(run), []).append(run)

    def order(run: Run) -> tuple:
        return (not _number(run.seed), run.seed if _number(run.seed) else 0, str(run.seed))

    return [sorted(g, key=order) for g in groups.values()]


def tags(run: Run) -> list[str]:
    """What describes a run: its Hydra overrides, else its saved config's values as ``key=value``."""
    if run.overrides or run.config is None:
        return run.overrides
    return [f"{k}={v}" for k, v in run.config.items()]


def differing(tag_lists: list[list[str]], drop) -> list[list[str]]:
    """Each list's tags that not every list has, without those ``drop(key)`` is true for."""
    common = set.intersection(*(set(t) for t in tag_lists)) if tag_lists else set()
    return [[t for t in own if t not in common and not drop(t.split("=", 1)[0])] for own in tag_lists]


def _hidden(key: str) -> bool:
    """Left out of every label: where a run keeps files and logs, Hydra's own keys (the seed is shown)."""
    return not_the_experiment(key) and key.lstrip("+~") != "trainer.seed"


def _name(parts: list[str], root: Path, fallback: str, several_roots: bool) -> str:
    text = " ".join(parts)
    if several_roots:
        return f"{root}: {text}" if text else str(root)
    return text or fallback


def run_labels(runs: list[Run]) -> list[str]:
    """Per run: the overrides that differ between runs (its directory's name if none do); with several
    directories, prefixed by the one it was found under."""
    several = len({r.root for r in runs}) > 1
    parts = differing([tags(r) for r in runs], _hidden)
    return [_name(p, r.root, r.path.name, several) for p, r in zip(parts, runs, strict=True)]


def labels(runs: list[Path]) -> list[str]:
    """``run_labels`` of run directories (their overrides only)."""
    return run_labels([Run(p, p.parent, [], {}, None, overrides(p)) for p in runs])


def group_labels(groups: list[list[Run]]) -> list[str]:
    """Per group: the overrides that differ between groups, seeds left out (the directory's name if none do)."""
    several = len({g[0].root for g in groups}) > 1
    parts = differing([tags(g[0]) for g in groups], lambda k: _hidden(k) or not_the_experiment(k))
    out = []
    for p, g in zip(parts, groups, strict=True):
        fallback = g[0].path.name if len(g) == 1 and g[0].path != g[0].root else g[0].root.name
        out.append(_name(p, g[0].root, fallback or str(g[0].root), several))
    return out


# --- curves ----------------------------------------------------------------------------------------------------


def curve(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The finite values of ``key`` by step (a step logged twice keeps its last value)."""
    by_step = {r["step"]: float(r[key]) for r in rows if _number(r.get(key)) and math.isfinite(r[key])}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average: ``s_0 = x_0``, ``s_i = weight * s_{i-1} + (1 - weight) * x_i``."""
    out: list[float] = []
    for x in values:
        out.append(x if not out else weight * out[-1] + (1 - weight) * x)
    return out


def align(curves: list[tuple[list[int], list[float]]]) -> tuple[list[int], np.ndarray]:
    """The steps every curve has, and the values there: ``[n_curves, n_steps]``."""
    shared = sorted(set.intersection(*(set(s) for s, _ in curves)))
    table = [dict(zip(s, v, strict=True)) for s, v in curves]
    return shared, np.array([[t[s] for s in shared] for t in table], dtype=float).reshape(len(curves), len(shared))


def smoothed(values: np.ndarray, key: str, weight: float) -> np.ndarray:
    """Each row smoothed by ``ema`` (``eval/*`` curves and ``weight`` 0: unchanged)."""
    if not weight or key.startswith("eval/"):
        return values
    return np.array([ema(row, weight) for row in values], dtype=float).reshape(values.shape)


def meaningful(key: str, run: Run) -> bool:
    """Whether ``key`` means something for the run's objective: a clip fraction only where the loss clips."""
    if run.config is None or key not in ("pg_clipfrac", "pg_clipfrac_lower"):
        return True
    clips = run.config.get("loss.objective") == CLIPPING_OBJECTIVE
    return clips and (key == "pg_clipfrac" or run.config.get("loss.dual_clip") is not None)


def k_scaled(key: str) -> bool:
    """Metrics whose scale depends on the diagnostics' K: |O| / K and the overlap masses, the teacher rank (<= K + 1)."""
    base = key.split("/")[0]
    return base.startswith("overlap_") or base == "teacher_rank"


def reference(run: Run, metric: str, summary_key: str) -> float | None:
    """A step-0 value of ``metric``, else ``summary.json``'s ``summary_key``, else None."""
    for row in run.rows:
        if row["step"] == 0 and _number(row.get(metric)):
            return float(row[metric])
    value = run.summary.get(summary_key)
    return float(value) if _number(value) else None


def decides_references(config: dict[str, Any]) -> dict[str, Any]:
    """The config values that decide the teacher's and the untrained student's accuracy (the keys a resume may
    change, such as ``eval.every``, do not)."""
    return {k: v for k, v in config.items() if k.startswith(REFERENCE_CONFIG) and not resumable(k)}


def reference_lines(groups: list[list[Run]], names: list[str]) -> list[tuple[float, str, int | None]]:
    """The teacher and baseline lines of the accuracy plot: ``(value, label, group index or None)``. One line
    each (the mean over all runs) where every run has the same model, teacher, task and evaluation config;
    else one per group, in its colour."""
    configs = [r.config for g in groups for r in g]
    same = all(c is not None for c in configs) and all(
        decides_references(c) == decides_references(configs[0]) for c in configs
    )
    lines = []
    for what, (metric, summary_key) in REFERENCES.items():
        sets = [[r for g in groups for r in g]] if same else groups
        for i, runs in enumerate(sets):
            values = [v for r in runs if (v := reference(r, metric, summary_key)) is not None]
            if values:
                mean = sum(values) / len(values)
                of = f", mean of {len(values)} runs" if len(values) > 1 else ""
                whose = "" if same else f" ({names[i]})"
                lines.append((mean, f"{what}{whose}: {mean:.3g}{of}", None if same else i))
    return lines


@dataclass
class Plot:
    """One metric's figure: per panel (title, [(group index, steps, values [runs, steps])])."""

    key: str
    panels: list[tuple[str, list[tuple[int, list[int], np.ndarray]]]]
    note: str = ""


def plan(key: str, groups: list[list[Run]]) -> tuple[Plot | None, str]:
    """The figure of ``key`` (None where no run has it), and a note for the report (or "")."""
    series, left_out = [], []
    for i, group in enumerate(groups):
        runs = [r for r in group if meaningful(key, r)]
        left_out += [r for r in group if r not in runs and curve(r.rows, key)[0]]
        curves = [c for r in runs if (c := curve(r.rows, key))[0]]
        if curves:
            steps, values = align(curves)
            if steps:
                series.append((i, runs[0].k, steps, values))
    note = ""
    if left_out:
        objectives = sorted({str(r.config.get("loss.objective")) for r in left_out if r.config})
        note = (
            f"{key}: not drawn for runs with loss.objective={','.join(objectives)}: only {CLIPPING_OBJECTIVE} "
            f"clips{' (the dual clip needs loss.dual_clip)' if key == 'pg_clipfrac_lower' else ''}."
        )
    if not series:
        return None, note
    ks = sorted({k for _, k, _, _ in series}, key=lambda k: (k is None, k or 0))
    if k_scaled(key) and len(ks) > 1:
        panels = [(f"K = {k}", [(i, s, v) for i, kk, s, v in series if kk == k]) for k in ks]
        note = (note + " " if note else "") + (
            f"{key}: runs with different K (loss.diag_k or loss.k: {', '.join(map(str, ks))}) are drawn in "
            "separate panels; the metric is relative to K, so values are not comparable across K."
        )
        return Plot(key, panels), note
    return Plot(key, [("", [(i, s, v) for i, _, s, v in series])]), note


def caption(key: str, plot: Plot, opts: Options) -> str:
    parts = []
    if any(v.shape[0] > 1 for _, series in plot.panels for _, _, v in series):
        parts.append(f"line: mean over seeds, band: {BAND_WORDS[opts.band]}")
    if opts.smooth and not key.startswith("eval/"):
        parts.append(f"EMA smoothing {opts.smooth:g} (faint: raw)")
    return "; ".join(parts)


def figure(plot: Plot, names: list[str], references: list, opts: Options):
    """The matplotlib figure of ``plot``: per group the (smoothed) mean with its band, the raw curve faint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    n = len(plot.panels)
    fig, axes = plt.subplots(1, n, figsize=(7 if n == 1 else 4.6 * n, 4.4), squeeze=False)
    for ax, (panel, series) in zip(axes[0], plot.panels, strict=True):
        for i, steps, raw in series:
            color = f"C{i % 10}"
            values = smoothed(raw, plot.key, opts.smooth)
            marker = {"marker": "o", "markersize": 3} if len(steps) < 30 else {}
            if values is not raw:  # the raw curve (the mean of the runs), faint behind the smoothed one
                ax.plot(steps, raw.mean(0), color=color, alpha=0.25, linewidth=1)
            if raw.shape[0] > 1:
                label = f"{names[i]} (mean of {raw.shape[0]} seeds)"
                draw_band(ax, steps, values, label, "mean", opts.band, color, **marker)
            else:
                ax.plot(steps, values[0], color=color, label=names[i], **marker)
        if plot.key == "eval/acc":
            for value, label, i in references:
                style = "--" if label.startswith("teacher") else ":"
                color = "black" if i is None else f"C{i % 10}"
                ax.axhline(value, linestyle=style, linewidth=1.2, color=color, label=label)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(plot.key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    sub = caption(plot.key, plot, opts)
    fig.suptitle(TITLES.get(plot.key, plot.key) + (f"\n{sub}" if sub else ""), fontsize=11)
    fig.tight_layout()
    return fig


def save(fig, key: str, formats: Sequence[str], out: Path) -> list[Path]:
    """``fig`` in ``out`` once per format (then closed); returns the files."""
    import matplotlib.pyplot as plt

    files = []
    for fmt in formats:
        path = out / f"{key.replace('/', '_')}.{fmt}"
        fig.savefig(path, dpi=150)
        files.append(path)
    plt.close(fig)
    return files


# --- the report ------------------------------------------------------------------------------------------------


def fmt(value) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def mean_std(values: list) -> str:
    """``mean ± std`` (sample std) of the numbers in ``values``; one number as it is; none: ""."""
    xs = [float(v) for v in values if _number(v)]
    if len(xs) < 2:
        return fmt(xs[0]) if xs else ""
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return f"{mean:.4g} ± {std:.2g}"


def chosen_metrics(opts: Options, runs: list[Run]) -> list[str]:
    """The metrics to plot: ``metrics=`` (each logged by some run, and meaningful for one), or ``CURVES``."""
    if opts.metrics is None:
        return [k for k, _ in CURVES]
    logged = {k for r in runs for row in r.rows for k in row if k != "step"}
    for key in opts.metrics:
        if key not in logged:
            shown = sorted(k for k in logged if "/bucket_" not in k)
            raise UserError(f"metrics: no run logged {key!r}; logged: {', '.join(shown)}")
        if not any(meaningful(key, r) for r in runs):
            raise UserError(
                f"metrics: {key} is meaningful only for loss.objective={CLIPPING_OBJECTIVE} (the objective that clips)"
                f"{' with loss.dual_clip' if key == 'pg_clipfrac_lower' else ''}; no run here has it"
            )
    return list(dict.fromkeys(opts.metrics))


def write_report(opts: Options | Path) -> Path:
    """Plots and ``report.md`` for the runs and sweeps ``opts.dirs``; returns the report's path."""
    opts = opts if isinstance(opts, Options) else Options(dirs=[Path(opts)])
    # every file is read (and refused if damaged), every key checked, before anything is written
    runs = load_runs(opts.dirs)
    keys = chosen_metrics(opts, runs)
    groups = group_runs(runs)
    names = group_labels(groups)
    plans = [plan(key, groups) for key in keys]
    out = opts.out or opts.dirs[0] / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"out: cannot create the report directory {out}: {e.strerror}") from None
    references = reference_lines(groups, names)
    files = [save(figure(p, names, references, opts), p.key, opts.formats, out) for p, _ in plans if p is not None]

    seeded = sum(len(g) > 1 for g in groups)
    lines = [f"# Report: {', '.join(map(str, opts.dirs))}", ""]
    lines.append(
        f"{len(runs)} run(s) in {len(groups)} group(s). Runs found under the same directory whose saved configs differ "
        f"only in trainer.seed are one group: its curve is the mean over its seeds, its band "
        f"{'the min-max over them' if opts.band == 'minmax' else '± one sample standard deviation (n-1)'}."
    )
    if opts.smooth:
        w = f"{opts.smooth:g}"
        lines.append(
            f"Training curves are smoothed by an exponential moving average over the logged points, "
            f"s_0 = x_0, s_i = {w} s_(i-1) + {1 - opts.smooth:g} x_i (smooth={w}), the raw curve faint behind; "
            f"the band is over the smoothed runs; eval curves are not smoothed."
        )
    if seeded:
        lines += ["", "## Groups (mean ± sample std over seeds)", ""]
        lines.append("| group | seeds | " + " | ".join(SUMMARY) + " |")
        lines.append("|---" * (2 + len(SUMMARY)) + "|")
        for group, name in zip(groups, names, strict=True):
            seeds = ", ".join(str(r.seed) for r in group)
            cells = [name, seeds] + [mean_std([r.summary.get(k) for r in group]) for k in SUMMARY]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Runs: final training metrics and evaluation", ""]
    lines.append("| run | step | " + " | ".join(TABLE + SUMMARY) + " |")
    lines.append("|---" * (2 + len(TABLE) + len(SUMMARY)) + "|")
    for run, name in zip(runs, run_labels(runs), strict=True):
        rows = [r for r in run.rows if "loss" in r]
        last = rows[-1] if rows else {}
        cells = (
            [name, fmt(last.get("step"))]
            # a metric's last logged value (logger.diagnostics_every may leave it out of the last step)
            + [fmt(next((r[k] for r in reversed(rows) if k in r), None)) for k in TABLE]
            + [fmt(run.summary.get(k)) for k in SUMMARY]
        )
        lines.append("| " + " | ".join(cells) + " |")
    unequal = [n for g, n in zip(groups, names, strict=True) if len({len(r.rows) for r in g}) > 1]
    notes = [note for _, note in plans if note]
    if unequal:
        notes.append(
            f"Groups whose runs logged different steps are drawn on the steps all logged: {'; '.join(unequal)}."
        )
    if references and any(p is not None and p.key == "eval/acc" for p, _ in plans):
        notes.append("The eval/acc plot's dashed line is the teacher, the dotted one the student before training.")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Curves", ""]
    for group in files:
        image = next((f for f in group if f.suffix in (".png", ".svg")), group[0])
        other = ", ".join(f"[{f.suffix[1:]}]({f.name})" for f in group if f != image)
        lines.append(f"![{image.stem}]({image.name})" + (f" ({other})" if other else ""))
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
