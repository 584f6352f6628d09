"""Plots and tables from finished runs (folders holding summary.json; see docs/reporting.md).

    python -m grape_dist.report runs/                        # runs/report/report.md + PNGs
    python -m grape_dist.report runs/a runs/b --title "MLP sweep"
    # refresh the generated blocks of docs/results.md, keeping the prose around them
    python -m grape_dist.report runs/ --out docs/results --results-page docs/results.md
    # the ranks' timelines recorded with --trace, as one PNG (docs/pipeline.md, Timelines)
    python -m grape_dist.report timeline runs/x/trace --out timeline.png [--steps 2]

Runs are grouped by (dataset, model, rule, calibration interval T, other config keys that differ
between runs of the same rule → a label); seeds are pooled within a group, and every number is
the mean ± sample std (n-1) over its distinct seeds (a seed run more than once, e.g. on other
ranks, counts once: its newest run). Per (dataset, model) the report has a table and up to
three plots: test accuracy (perplexity for language models) vs epoch, per-block alignment
(grad_cos) over training, and the final metric vs T (the paper's Figure 2) when T varies.
With `--budget shortest` the tables also give each group's metric at equal training time.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shlex
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

RULE_ORDER = ("bp", "fa", "dfa", "drtp", "pepita", "grape")
PARTS = ("table", "curve", "alignment", "calibration", "time")
# A table's time budget (--budget): training seconds, "shortest" (the least any of its runs
# trained), or none.
Budget = float | str | None

# Config keys that do not change what a run learns (or only like a seed does): runs differing
# only in these are pooled. Anything ending in ".fused" is ignored too (same arithmetic).
IGNORED_KEYS = (
    "seed", "rule", "model.name", "data.name", "data.root", "data.eval_batch_size",
    "calibration.every_epochs",  # it is T, a grouping key of its own
    "train.progress", "train.threads", "train.device", "train.save_final", "train.checkpoint",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.probe_batch_size",
    "train.jacobian_metric_max_outputs", "grape.tangent_noise",
    "pipeline.pp", "pipeline.dp", "pipeline.balance", "pipeline.stage_blocks",
    "pipeline.schedule", "pipeline.timeout_s", "pipeline.streaming", "pipeline.stage_streams",
)
# Shown in the label whenever present: an alignment-triggered run is not an every-T run.
TRIGGER_KEYS = ("calibration.trigger", "calibration.threshold", "calibration.budget")


class ReportError(Exception):
    """Bad input: printed as one line, exit code 2."""


# -- runs -----------------------------------------------------------------------------------


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → dotted keys; lists → tuples (hashable, comparable)."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(data, list):
        data = tuple(_flatten(v, "")[""] if isinstance(v, list) else v for v in data)
    return {prefix[:-1]: data}


def _fmt_value(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ",".join(_fmt_value(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _finite(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


@dataclass
class Run:
    path: Path
    rel: str  # relative to the RUN_DIR it was found under (posix); what result-page globs match
    config: dict[str, Any]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    # timing.jsonl: per evaluation, the training seconds (steps and calibrations) and wall
    # seconds so far; empty for runs written before it existed.
    timing: list[dict[str, Any]] = field(default_factory=list)
    # resumes.jsonl: the config keys each resume changed ({"changed": {key: [old, new]}}).
    # config.yaml keeps the config the run started with.
    resumes: list[dict[str, Any]] = field(default_factory=list)

    @cached_property
    def flat(self) -> dict[str, Any]:
        """The config the run finished with: config.yaml, then each resume's changes (a run
        resumed with train.epochs=40 is grouped with runs started for 40 epochs)."""
        flat = _flatten(self.config)
        for entry in self.resumes:
            changed = entry.get("changed")
            for key, value in (changed.items() if isinstance(changed, dict) else ()):
                if isinstance(value, list) and len(value) == 2:
                    flat[key] = value[1]
        return flat

    def _get(self, summary_key: str, config_key: str) -> str:
        v = self.summary.get(summary_key, self.flat.get(config_key))
        return str(v) if v is not None else "?"

    @property
    def rule(self) -> str:
        return self._get("rule", "rule")

    @property
    def model(self) -> str:
        return self._get("model", "model.name")

    @property
    def dataset(self) -> str:
        return self._get("dataset", "data.name")

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @cached_property
    def mtime(self) -> float:
        """When the run last wrote its metrics (0 if it has none)."""
        path = self.path / "metrics.jsonl"
        return path.stat().st_mtime if path.exists() else 0.0

    @property
    def interval(self) -> int | None:
        """Calibration interval T in epochs (0: none); None when config.yaml is missing."""
        if not self.config:
            return None
        return int(self.flat.get("calibration.every_epochs", 0) or 0)

    @cached_property
    def test_rows(self) -> list[dict[str, Any]]:
        by_epoch: dict[Any, dict[str, Any]] = {}
        for row in self.rows:
            if row.get("split") == "test" and row.get("epoch") is not None:
                by_epoch[row["epoch"]] = row  # the last row of an epoch wins
        return [by_epoch[e] for e in sorted(by_epoch)]

    @property
    def is_lm(self) -> bool:
        return _finite(self.summary.get("final_test_perplexity")) is not None or any(
            "perplexity" in r for r in self.test_rows)

    def relevant(self, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """The config keys that can change what this run learns. `defaults` fill keys an
        older config.yaml lacks (a key added later: the old run ran as its default does)."""
        t = self.interval or 0
        out = {}
        flat = {**(defaults or {}), **self.flat} if self.config else {}
        for k, v in flat.items():
            if k in IGNORED_KEYS or k.endswith(".fused"):
                continue
            if (k.startswith("grape.") and self.rule != "grape") or (
                    k.startswith("pepita.") and self.rule != "pepita"):
                continue
            if self.rule == "bp" and (k.startswith(("feedback.", "calibration."))
                                      or k == "model.feedback"):
                continue
            if k.startswith("calibration.") and t == 0:
                continue
            out[k] = v
        return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: the rows before it still count
            if isinstance(row, dict):
                rows.append(row)
    return rows


def load_run(path: Path, rel: str) -> Run:
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path / 'summary.json'}: unreadable ({exc})") from exc
    if not isinstance(summary, dict):
        raise ReportError(f"{path / 'summary.json'}: not a JSON object")
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        try:
            config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        except yaml.YAMLError as exc:
            raise ReportError(f"{path / 'config.yaml'}: unreadable YAML ({exc})") from exc
    return Run(path, rel, config if isinstance(config, dict) else {}, summary,
               _read_jsonl(path / "metrics.jsonl"), _read_jsonl(path / "timing.jsonl"),
               _read_jsonl(path / "resumes.jsonl"))


def discover(paths: Sequence[str | Path]) -> list[Run]:
    """Each path is a run folder (holds summary.json) or a folder searched recursively."""
    runs: dict[Path, Run] = {}
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ReportError(f"{p}: no such folder")
        if not path.is_dir():
            raise ReportError(f"{p}: not a folder (give a run folder or a folder of runs)")
        if (path / "summary.json").is_file():
            found = [(path, path.resolve().name)]
        else:
            found = [(s.parent, s.parent.relative_to(path).as_posix())
                     for s in sorted(path.rglob("summary.json"))]
        if not found:
            raise ReportError(f"{p}: not a run folder (no summary.json) and no runs under it")
        for run_dir, rel in found:
            key = run_dir.resolve()
            if key not in runs:
                runs[key] = load_run(run_dir, rel)
    return sorted(runs.values(), key=lambda r: (r.rel, str(r.path)))


# -- groups ---------------------------------------------------------------------------------


@dataclass
class Group:
    dataset: str
    model: str
    rule: str
    interval: int | None
    base_label: str  # differing config keys other than calibration.*
    cal_label: str  # differing calibration.* keys (runs with T > 0 only)
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        return ", ".join(x for x in (self.base_label, self.cal_label) if x)

    @property
    def t_text(self) -> str:
        return "?" if self.interval is None else ("none" if self.interval == 0 else
                                                  str(self.interval))

    @property
    def name(self) -> str:
        t = f" T={self.interval}" if self.interval else ""
        return f"{self.rule}{t}" + (f" ({self.label})" if self.label else "")

    @property
    def is_lm(self) -> bool:
        return any(r.is_lm for r in self.runs)

    @property
    def pooled(self) -> list[Run]:
        """One run per distinct seed, the newest (its metrics.jsonl last written), in the
        order of `runs`: repeats of a seed (the same run on other ranks, a rerun) are not
        independent samples, so means and stds are taken over these only. Runs without a
        recorded seed count as distinct."""
        newest: dict[int, Run] = {}
        for r in self.runs:
            if r.seed is not None and (r.seed not in newest or r.mtime > newest[r.seed].mtime):
                newest[r.seed] = r
        return [r for r in self.runs if r.seed is None or newest[r.seed] is r]

    def sort_key(self) -> tuple:
        rank = RULE_ORDER.index(self.rule) if self.rule in RULE_ORDER else len(RULE_ORDER)
        t = math.inf if self.interval is None else self.interval
        return (rank, self.rule, self.base_label, t, self.cal_label)


def group_runs(runs: Iterable[Run]) -> dict[tuple[str, str], list[Group]]:
    """(dataset, model) → its groups, both in a fixed order."""
    from .config import Config, to_dict

    defaults = _flatten(to_dict(Config()))
    scopes: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        scopes.setdefault((run.dataset, run.model, run.rule), []).append(run)
    sections: dict[tuple[str, str], dict[tuple, Group]] = {}
    for (dataset, model, rule), members in scopes.items():
        relevant = [r.relevant(defaults) for r in members]
        # A key differs when runs hold two values for it; a key that only older configs hold
        # (removed since) matches anything where it is missing.
        values: dict[str, set] = {}
        for rel in relevant:
            for k, v in rel.items():
                values.setdefault(k, set()).add(v)
        differing = {k for k, vs in values.items() if len(vs) > 1}
        for run, rel in zip(members, relevant):
            trig = rel.get("calibration.trigger") not in (None, "every")
            keys = sorted(k for k in rel if k in differing or (trig and k in TRIGGER_KEYS))
            base = ", ".join(f"{k}={_fmt_value(rel[k])}" for k in keys
                             if not k.startswith("calibration."))
            cal = ", ".join(f"{k}={_fmt_value(rel[k])}" for k in keys
                            if k.startswith("calibration."))
            key = (rule, run.interval, base, cal)
            sec = sections.setdefault((dataset, model), {})
            if key not in sec:
                sec[key] = Group(dataset, model, rule, run.interval, base, cal)
            sec[key].runs.append(run)
    return {sk: sorted(sections[sk].values(), key=Group.sort_key) for sk in sorted(sections)}


# -- numbers --------------------------------------------------------------------------------


def final_metric(run: Run, lm: bool) -> float | None:
    key = "perplexity" if lm else "accuracy"
    v = _finite(run.summary.get(f"final_test_{key}"))
    if v is None and run.test_rows:
        v = _finite(run.test_rows[-1].get(key))
    return v


def best_metric(run: Run, lm: bool) -> float | None:
    key = "perplexity" if lm else "accuracy"
    v = _finite(run.summary.get(f"best_test_{key}"))
    if v is None:  # older summaries: the best test row
        vals = [x for r in run.test_rows if (x := _finite(r.get(key))) is not None]
        v = (min(vals) if lm else max(vals)) if vals else None
    return v


def scale(lm: bool) -> float:
    return 1.0 if lm else 100.0  # accuracy in percent


def mean_std(values: Sequence[float]) -> tuple[float, float | None] | None:
    """Mean and sample standard deviation (None for a single value)."""
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_mean_std(values: Sequence[float], digits: int = 2) -> str:
    ms = mean_std(values)
    if ms is None:
        return "—"
    mean, std = ms
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _metric_values(group: Group, fn: Any) -> list[float]:
    lm = group.is_lm
    return [v * scale(lm) for r in group.pooled if (v := fn(r, lm)) is not None]


def _summary_numbers(group: Group, key: str) -> list[float]:
    return [v for r in group.pooled if (v := _finite(r.summary.get(key))) is not None]


def _compact(values: Sequence[float], digits: int) -> str:
    if not values:
        return "—"
    m = statistics.fmean(values)
    return str(int(m)) if m == int(m) and all(v == m for v in values) else f"{m:.{digits}f}"


def markdown_table(groups: Sequence[Group], budget: Budget = None) -> str:
    """One row per group. With a `budget` (training seconds, or "shortest": the least any run
    of these groups trained), two more columns: each group's training seconds and its test
    metric at the budget, so that forms with different step costs compare at equal time."""
    lm = any(g.is_lm for g in groups)
    unit = "test perplexity" if lm else "test acc. (%)"
    seconds = resolve_budget(budget, groups)
    timed = ([] if seconds is None else
             ["training s", f"{unit.replace(' (%)', '')} at {seconds:.0f} training s"])
    head = ["run group", "rule", "model", "dataset", "T", "seeds", f"final {unit}",
            f"best {unit}", *timed, "calibrations", "wall s", "world size", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        pooled = g.pooled
        seeds = sorted(r.seed for r in pooled if r.seed is not None)
        unknown = ["?"] * (len(pooled) - len(seeds))
        seed_text = f"{len(pooled)} (" + ", ".join([*map(str, seeds), *unknown]) + ")"
        if len(pooled) < len(g.runs):
            seed_text += f"; {len(g.runs) - len(pooled)} repeat(s) of a seed not pooled"
        worlds = sorted({int(w) for w in _summary_numbers(g, "world_size")})
        cells = [
            g.name, g.rule, g.model, g.dataset, g.t_text, seed_text,
            fmt_mean_std(_metric_values(g, final_metric)),
            fmt_mean_std(_metric_values(g, best_metric)),
            *([] if seconds is None else [
                _compact([t for r in g.pooled if (t := training_seconds(r)) is not None], 0),
                fmt_mean_std([v for r in g.pooled if (v := metric_at(r, seconds)) is not None]),
            ]),
            _compact(_summary_numbers(g, "calibration_steps"), 1),
            _compact(_summary_numbers(g, "wall_seconds"), 1),
            ", ".join(map(str, worlds)) or "—",
            ", ".join(f"`{r.rel}`" for r in g.runs),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# -- plots ----------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" chunk: a rerun with another matplotlib leaves identical PNGs unchanged.
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)


def _integer_ticks(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no "2.5"


def _by_epoch(runs: Sequence[Run], value: Any) -> tuple[list[float], list[float], list[float]]:
    """Epochs present in any run, the mean of `value(row)` over runs, and its std (0 for one)."""
    per: dict[float, list[float]] = {}
    for run in runs:
        for row in run.test_rows:
            v = _finite(value(row))
            if v is not None:
                per.setdefault(row["epoch"], []).append(v)
    xs = sorted(per)
    means = [statistics.fmean(per[x]) for x in xs]
    stds = [statistics.stdev(per[x]) if len(per[x]) > 1 else 0.0 for x in xs]
    return xs, means, stds


def _scaled(v: Any, lm: bool) -> float | None:
    x = _finite(v)
    return None if x is None else x * scale(lm)


def plot_curves(groups: Sequence[Group], path: Path, title: str) -> bool:
    lm = any(g.is_lm for g in groups)
    key = "perplexity" if lm else "accuracy"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for i, g in enumerate(groups):
        xs, means, stds = _by_epoch(g.pooled, lambda r: _scaled(r.get(key), lm))
        if not xs:
            continue
        color = f"C{i % 10}"
        ax.plot(xs, means, marker="o", ms=3, color=color, label=f"{g.name} (n={len(g.pooled)})")
        if len(g.pooled) > 1:
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)],
                            [m + s for m, s in zip(means, stds)], color=color, alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("epoch")
    _integer_ticks(ax)
    ax.set_ylabel("test perplexity" if lm else "test accuracy (%)")
    ax.set_title(f"{title}: test {key} (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # off the data
    _save(fig, path)
    return True


def metric_over_time(run: Run) -> list[tuple[float, float]]:
    """(training seconds, test metric) after each evaluation: accuracy in percent, or
    perplexity, from metrics.jsonl and timing.jsonl (matched by step)."""
    lm = run.is_lm
    key = "perplexity" if lm else "accuracy"
    seconds = {r.get("step"): _finite(r.get("train_seconds")) for r in run.timing}
    out = []
    for row in run.test_rows:
        t, v = seconds.get(row.get("step")), _scaled(row.get(key), lm)
        if t is not None and v is not None:
            out.append((t, v))
    return out


def time_to_reach(run: Run, target: float) -> float | None:
    """Training seconds until the run's test metric first reaches `target` (accuracy at least,
    perplexity at most), interpolated linearly between evaluations; None if it never does."""
    lower_is_better = run.is_lm
    prev = (0.0, None)
    for t, v in metric_over_time(run):
        if (v <= target) if lower_is_better else (v >= target):
            t0, v0 = prev
            if v0 is None or v0 == v:
                return t
            return t0 + (t - t0) * (target - v0) / (v - v0)
        prev = (t, v)
    return None


def training_seconds(run: Run) -> float | None:
    """The training seconds (steps and calibrations) up to the run's last evaluation."""
    pts = metric_over_time(run)
    return pts[-1][0] if pts else None


def metric_at(run: Run, seconds: float) -> float | None:
    """The test metric of the last evaluation within `seconds` of training: what stopping the
    run at that time would have given. None if it had not evaluated by then."""
    within = [v for t, v in metric_over_time(run) if t <= seconds * (1 + 1e-9)]
    return within[-1] if within else None


def resolve_budget(budget: Budget, groups: Sequence[Group]) -> float | None:
    if budget != "shortest":
        return None if budget is None else float(budget)
    totals = [t for g in groups for r in g.pooled if (t := training_seconds(r)) is not None]
    return min(totals) if totals else None


def plot_time(groups: Sequence[Group], path: Path, title: str) -> bool:
    """The test metric against training wall-clock seconds, one line per run."""
    lm = any(g.is_lm for g in groups)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for i, g in enumerate(groups):
        for j, run in enumerate(g.runs):
            pts = metric_over_time(run)
            if not pts:
                continue
            ax.plot([0.0] + [t for t, _ in pts], [None] + [v for _, v in pts], marker="o",
                    ms=3, color=f"C{i % 10}", label=g.name if j == 0 else None)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("training time (s; steps and calibrations, no evaluation)")
    ax.set_ylabel("test perplexity" if lm else "test accuracy (%)")
    ax.set_title(f"{title}: test metric against training time", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    _save(fig, path)
    return True


def plot_alignment(groups: Sequence[Group], path: Path, title: str, metric: str) -> bool:
    panels = []
    for g in groups:
        blocks: list[str] = []  # model order: the order the rows list them in
        for run in g.runs:
            for row in run.test_rows:
                for b, m in (row.get("alignment") or {}).items():
                    if b not in blocks and _finite((m or {}).get(metric)) is not None:
                        blocks.append(b)
        if blocks:
            panels.append((g, blocks))
    if not panels:
        return False
    plt = _pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False,
                             sharey=True, layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (g, blocks) in zip(axes.flat, panels):
        cmap = plt.get_cmap("viridis")
        for j, b in enumerate(blocks):
            xs, means, _ = _by_epoch(
                g.pooled, lambda r, b=b: ((r.get("alignment") or {}).get(b) or {}).get(metric))
            ax.plot(xs, means, marker="o", ms=2, lw=1.2, label=b,
                    color=cmap(j / max(len(blocks) - 1, 1)) if len(blocks) > 10 else f"C{j}")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(f"{g.name} (n={len(g.pooled)})", fontsize=8)
        ax.set_xlabel("epoch")
        _integer_ticks(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2 if len(blocks) > 6 else 1)
    for ax in axes[:, 0]:
        ax.set_ylabel(metric)
    fig.suptitle(f"{title}: per-block {metric} (mean over seeds)", fontsize=10)
    _save(fig, path)
    return True


def plot_calibration(groups: Sequence[Group], path: Path, title: str) -> bool:
    """Figure 2: final test metric vs T, one line per (rule, label); T=none at the right,
    apart from the line; BP as a dashed reference."""
    learners = [g for g in groups if g.rule != "bp" and g.interval is not None]
    ts = sorted({g.interval for g in learners if g.interval})
    if len({g.interval for g in learners}) < 2:
        return False
    lm = any(g.is_lm for g in groups)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    pos = {t: i for i, t in enumerate(ts)}
    none_x = len(ts) + 0.5
    families: dict[tuple[str, str], list[Group]] = {}
    for g in learners:
        families.setdefault((g.rule, g.base_label), []).append(g)
    styles = ["-", "--", ":", "-."]
    for i, ((rule, base), members) in enumerate(families.items()):
        color = f"C{i % 10}"
        dx = 0.06 * (i - (len(families) - 1) / 2)  # side by side: error bars stay readable
        fam = rule + (f" ({base})" if base else "")
        lines: dict[str, list[Group]] = {}
        for g in members:
            if g.interval:
                lines.setdefault(g.cal_label, []).append(g)
        for j, (cal, line) in enumerate(sorted(lines.items())):
            line.sort(key=lambda g: g.interval or 0)
            stats = [mean_std(_metric_values(g, final_metric)) for g in line]
            pts = [(pos[g.interval] + dx, s) for g, s in zip(line, stats) if s is not None]
            if pts:
                ax.errorbar([x for x, _ in pts], [s[0] for _, s in pts],
                            yerr=[s[1] or 0.0 for _, s in pts], color=color,
                            marker="o^vD"[j % 4],
                            capsize=3, ls=styles[j % len(styles)],
                            label=fam + (f", {cal}" if cal else ""))
        for g in members:
            s = mean_std(_metric_values(g, final_metric)) if g.interval == 0 else None
            if s is not None:
                ax.errorbar([none_x + dx], [s[0]], yerr=[s[1] or 0.0], color=color, marker="s",
                            capsize=3, ls="none",
                            label=None if lines else f"{fam}, no calibration")
    for g in groups:
        s = mean_std(_metric_values(g, final_metric)) if g.rule == "bp" else None
        if s is not None:
            ax.axhline(s[0], color="black", ls="--", lw=1, label=g.name)
    if ts:
        ax.axvline(len(ts) - 0.25, color="grey", lw=0.6, ls=":")
    ax.set_xticks([*range(len(ts)), none_x], [*map(str, ts), "none"])
    ax.set_xlim(-0.5, none_x + 0.5)
    ax.set_xlabel("calibration interval T (epochs)")
    ax.set_ylabel("final test perplexity" if lm else "final test accuracy (%)")
    ax.set_title(f"{title}: final test metric vs calibration interval (mean ± std)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # off the data
    _save(fig, path)
    return True


# -- documents ------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "all"


def render_sections(runs: Sequence[Run], out: Path, link_base: Path, prefix: str = "",
                    parts: Sequence[str] = PARTS, heading: str = "##",
                    metric: str = "grad_cos", budget: Budget = None) -> str:
    """Markdown for `runs`: per (dataset, model) a table and plots. PNGs go into `out`
    (named `<prefix><dataset>_<model>_<plot>.png`); links are relative to `link_base`."""
    sections = group_runs(runs)
    chunks = []
    for (dataset, model), groups in sections.items():
        title = f"{dataset} / {model}"
        text = [f"{heading} {title}\n"] if heading else []
        if "table" in parts:
            text.append(markdown_table(groups, budget))
        stem = f"{prefix}{_slug(dataset)}_{_slug(model)}"
        plots = [("curve", "test metric vs epoch",
                  lambda p, g=groups, t=title: plot_curves(g, p, t)),
                 ("alignment", f"per-block {metric}",
                  lambda p, g=groups, t=title: plot_alignment(g, p, t, metric)),
                 ("calibration", "final test metric vs calibration interval T",
                  lambda p, g=groups, t=title: plot_calibration(g, p, t)),
                 ("time", "test metric vs training time",
                  lambda p, g=groups, t=title: plot_time(g, p, t))]
        for part, alt, draw in plots:
            path = out / f"{stem}_{part}.png"
            if part in parts and draw(path):
                link = Path(os.path.relpath(path, link_base)).as_posix()
                text.append(f"![{title}: {alt}]({link})\n")
            elif path.exists():
                path.unlink()  # a plot that no longer applies must not linger, stale
        chunks.append("\n".join(text))
    return "\n".join(chunks)


MEAN_NOTE = ("Test metrics are the mean ± sample std (n − 1) over a group's runs (one run: its "
             "value); accuracy in percent. T: calibration interval in epochs.")


def write_report(runs: Sequence[Run], out: Path, title: str, command: str,
                 metric: str = "grad_cos", budget: Budget = None) -> Path:
    from .fileio import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    body = render_sections(runs, out, out, metric=metric, budget=budget)
    text = (f"# {title}\n\nGenerated by `{command}` from {len(runs)} runs. {MEAN_NOTE}\n\n"
            f"{body}")
    path = out / "report.md"
    atomic_write_text(path, text)
    return path


BEGIN = re.compile(r"^<!-- report:begin (\S+)((?: \S+)*) -->\s*$")
END = re.compile(r"^<!-- report:end (\S+) -->\s*$")


def update_results_page(page: Path, runs: Sequence[Run], out: Path, command: str,
                        metric: str = "grad_cos", budget: Budget = None) -> list[str]:
    """Regenerate each `<!-- report:begin GLOB [PART ...] -->` … `<!-- report:end GLOB -->`
    block of `page` from the runs whose relative path matches GLOB (fnmatch: `*` also crosses
    `/`), leaving everything outside the markers as it is. PARTS: any of table, curve,
    alignment, calibration, time (default: all). Plots go to out/<GLOB as a slug>/. Returns
    warnings (blocks that match no run are left unchanged)."""
    from .fileio import atomic_write_text

    if not page.is_file():
        raise ReportError(f"--results-page {page}: no such file")
    lines = page.read_text().splitlines(keepends=True)
    result: list[str] = []
    warnings: list[str] = []
    slugs: set[str] = set()
    fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fence = not fence  # markers shown inside code blocks are examples, not blocks
        m = None if fence else BEGIN.match(line)
        if END.match(line) and not fence:
            raise ReportError(f"{page}:{i + 1}: report:end without a report:begin")
        result.append(line)
        i += 1
        if m is None:
            continue
        name, opts = m.group(1), m.group(2).split()
        bad = [o for o in opts if o not in PARTS]
        if bad:
            raise ReportError(f"{page}:{i}: unknown part {bad[0]!r} (choose from "
                              f"{', '.join(PARTS)})")
        start = i
        while i < len(lines) and not (END.match(lines[i]) or BEGIN.match(lines[i])):
            i += 1
        if i == len(lines) or BEGIN.match(lines[i]):
            raise ReportError(f"{page}:{start}: report:begin {name} has no report:end {name}")
        if END.match(lines[i]).group(1) != name:
            raise ReportError(f"{page}:{i + 1}: report:end {END.match(lines[i]).group(1)} "
                              f"closes report:begin {name}")
        chosen = [r for r in runs if fnmatch.fnmatchcase(r.rel, name)]
        if not chosen:
            warnings.append(f"{page}: block {name} matches no run; left as it was")
            result.extend(lines[start:i])
        else:
            slug = _slug(name)
            while slug in slugs:
                slug += "_"
            slugs.add(slug)
            body = render_sections(chosen, out / slug, page.parent, parts=opts or PARTS,
                                   heading="####" if len(group_runs(chosen)) > 1 else "",
                                   metric=metric, budget=budget)
            result.append(f"<!-- generated by `{command}` from {len(chosen)} runs; edits "
                          f"between these markers are overwritten -->\n\n{body}\n")
        result.append(lines[i])  # the end marker
        i += 1
    atomic_write_text(page, "".join(result))
    return warnings


# -- command line ---------------------------------------------------------------------------


# -- timelines (grape_dist/trace.py files) -------------------------------------------------------

# Fixed colours for the runtime's span names (others take the next free tab20 colour).
SPAN_COLOURS = {
    "step": "#d9d9d9", "calibration": "#bdbdbd",
    "forward": "#1f77b4", "tangents": "#aec7e8", "loss": "#17becf",
    "backward": "#ff7f0e", "backward weight": "#ffbb78", "modulated forward": "#9edae5",
    "update": "#2ca02c", "B step": "#98df8a", "local update": "#bcbd22", "optimiser": "#9467bd",
    "recv": "#d62728", "send": "#ff9896", "broadcast": "#8c564b", "broadcast wait": "#e377c2",
    "all_reduce": "#c49c94", "flush": "#f7b6d2", "p2p wait": "#d62728",
}
LANE_ORDER = ("step", "compute", "comm")


@dataclass
class Span:
    rank: int
    lane: str
    name: str
    start: float  # µs, on the files' common clock
    dur: float  # µs
    depth: int = 0  # nesting within its lane (0: outermost)


def load_traces(paths: Sequence[str | Path]) -> list[Span]:
    """The complete ("X") events of every trace_rank*.json in `paths` (folders or files)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.glob("trace_rank*.json"))
            if not found:
                raise ReportError(f"{path}: no trace_rank*.json here (record one with --trace)")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ReportError(f"{path}: no such file or folder")
    spans: list[Span] = []
    for f in files:
        try:
            events = json.loads(f.read_text())["traceEvents"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ReportError(f"{f}: not a trace file ({exc})") from None
        lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "thread_name"}
        for e in events:
            if e.get("ph") == "X":
                lane = lanes.get((e["pid"], e["tid"]), str(e["tid"]))
                spans.append(Span(int(e["pid"]), lane, e["name"], float(e["ts"]),
                                  float(e.get("dur", 0.0))))
    # Nesting depth per (rank, lane): a span starting inside an open one is its child.
    spans.sort(key=lambda s: (s.rank, s.lane, s.start, -s.dur))
    stack: list[Span] = []
    for s in spans:
        while stack and (stack[-1].rank, stack[-1].lane) != (s.rank, s.lane) or \
                stack and s.start >= stack[-1].start + stack[-1].dur:
            stack.pop()
        s.depth = len(stack)
        stack.append(s)
    return spans


def timeline_window(spans: Sequence[Span], steps: int) -> tuple[float, float]:
    """[start, end] in µs: the first `steps` steps of every rank (0: everything)."""
    start = min(s.start for s in spans)
    end = max(s.start + s.dur for s in spans)
    step_spans = [s for s in spans if s.lane == "step" and s.depth == 0]
    if steps > 0 and step_spans:
        ends = []
        for rank in sorted({s.rank for s in step_spans}):
            mine = sorted((s for s in step_spans if s.rank == rank), key=lambda s: s.start)
            last = mine[min(steps, len(mine)) - 1]
            ends.append(last.start + last.dur)
        start = min(s.start for s in step_spans)
        end = max(ends)
    return start, end


def _busy(spans: Sequence[Span], rank: int, t0: float, t1: float) -> float | None:
    """The fraction of rank's step time its compute lane was busy, within [t0, t1]."""
    def clipped(s: Span) -> float:
        return max(0.0, min(s.start + s.dur, t1) - max(s.start, t0))
    steps = sum(clipped(s) for s in spans if s.rank == rank and s.lane == "step"
                and s.depth == 0)
    work = sum(clipped(s) for s in spans if s.rank == rank and s.lane == "compute"
               and s.depth == 0)
    return work / steps if steps > 0 else None


def timeline_summary(spans: Sequence[Span], window: tuple[float, float]) -> str:
    """Per rank: milliseconds and count of each span name inside the window, and how busy
    the compute lane was during the steps."""
    t0, t1 = window
    lines = []
    for rank in sorted({s.rank for s in spans}):
        per: dict[str, list[float]] = {}
        for s in spans:
            if s.rank == rank and s.start >= t0 and s.start + s.dur <= t1:
                per.setdefault(s.name, []).append(s.dur)
        busy = _busy(spans, rank, t0, t1)
        parts = [f"{n} {sum(d) / 1e3:.1f} ms ({len(d)})" for n, d in
                 sorted(per.items(), key=lambda kv: -sum(kv[1]))]
        lines.append(f"rank {rank}" + (f" (compute busy {100 * busy:.0f}% of its steps)"
                                       if busy is not None else "") + ": " + ", ".join(parts))
    return "\n".join(lines)


def plot_timeline(spans: Sequence[Span], path: Path, title: str, steps: int = 0) -> None:
    """One row per (rank, lane), a box per span coloured by its name, nested spans drawn
    thinner on top of their parents; time in ms from the window's start."""
    if not spans:
        raise ReportError("the trace files hold no spans (was any step inside the window?)")
    t0, t1 = timeline_window(spans, steps)
    shown = [s for s in spans if s.start < t1 and s.start + s.dur > t0]
    lanes = sorted({(s.rank, s.lane) for s in shown},
                   key=lambda rl: (rl[0], LANE_ORDER.index(rl[1]) if rl[1] in LANE_ORDER
                                   else len(LANE_ORDER), rl[1]))
    row = {rl: i for i, rl in enumerate(lanes)}
    names = list(dict.fromkeys(s.name for s in sorted(shown, key=lambda s: s.start)))
    spare = iter(f"C{i}" for i in range(10))
    colours = {n: SPAN_COLOURS.get(n) or next(spare, "#7f7f7f") for n in names}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(13, 0.9 + 0.42 * len(lanes)))
    for depth in range(max(s.depth for s in shown) + 1):
        height = max(0.8 - 0.22 * depth, 0.25)
        for name in names:
            mine = [s for s in shown if s.depth == depth and s.name == name]
            if not mine:
                continue
            for r in {row[(s.rank, s.lane)] for s in mine}:
                bars = [((max(s.start, t0) - t0) / 1e3,
                         (min(s.start + s.dur, t1) - max(s.start, t0)) / 1e3)
                        for s in mine if row[(s.rank, s.lane)] == r]
                ax.broken_barh(bars, (r - height / 2, height), facecolors=colours[name],
                               edgecolors="black", linewidth=0.3)
    labels = []
    for rank, lane in lanes:
        label = f"rank {rank} {lane}"
        if lane == "compute":
            busy = _busy(spans, rank, t0, t1)
            if busy is not None:
                label += f" ({100 * busy:.0f}% busy)"
        labels.append(label)
    ax.set_yticks(range(len(lanes)), labels, fontsize=8)
    ax.set_ylim(len(lanes) - 0.5, -0.5)  # rank 0 on top
    ax.set_xlim(0, (t1 - t0) / 1e3)
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor=colours[n], edgecolor="black", linewidth=0.3, label=n)
                       for n in names], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1), frameon=False)
    _save(fig, path)


def timeline_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m grape_dist.report timeline",
        description="Draw the ranks' timelines (trace_rank<R>.json files written by "
                    "--trace) as one PNG: a row per rank and lane, a box per span.")
    p.add_argument("traces", nargs="+", metavar="TRACE_DIR",
                   help="a folder of trace_rank*.json files (e.g. <out>/trace), or files")
    p.add_argument("--out", help="the PNG (default: timeline.png in the first TRACE_DIR)")
    p.add_argument("--steps", type=int, default=0,
                   help="draw only each rank's first N recorded steps (default: all)")
    p.add_argument("--title", default="", help="the plot's title")
    args = p.parse_args(argv)
    try:
        spans = load_traces(args.traces)
        first = Path(args.traces[0])
        out = Path(args.out) if args.out else (first if first.is_dir() else first.parent) \
            / "timeline.png"
        title = args.title or f"timeline: {args.traces[0]}"
        plot_timeline(spans, out, title, args.steps)
        print(timeline_summary(spans, timeline_window(spans, args.steps)))
        print(f"{out}: {len({s.rank for s in spans})} ranks")
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m grape_dist.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a run folder (holds summary.json) or a folder searched for runs")
    p.add_argument("--out", help="folder for report.md and the PNGs (default: report/ in "
                                 "the first RUN_DIR, so runs/report stays out of git)")
    p.add_argument("--title", default="Training runs", help="report.md's title")
    p.add_argument("--results-page", metavar="FILE",
                   help="instead of report.md, regenerate the report:begin/end blocks of FILE "
                        "(e.g. docs/results.md); plots go to --out/<block>/")
    p.add_argument("--alignment-metric", default="grad_cos",
                   help="the per-block alignment metric to plot (default grad_cos; also "
                        "jac_cos, jhat_cos, train_col_cos)")
    p.add_argument("--budget", type=_budget, metavar="SECONDS|shortest",
                   help="add each group's training seconds and its test metric at this many "
                        "training seconds (timing.jsonl; `shortest`: the least any run of the "
                        "table trained), to compare forms at equal time")
    return p.parse_args(argv)


def _budget(text: str) -> float | str:
    if text == "shortest":
        return text
    try:
        value = float(text)
        if value > 0:  # also refuses nan
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: give positive seconds or 'shortest'")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["timeline"]:  # a run folder named timeline: give it as ./timeline
        return timeline_main(argv[1:])
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "grape_dist.report", *argv])
    try:
        runs = discover(args.run_dirs)
        out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "report"
        if args.results_page:
            for warning in update_results_page(Path(args.results_page), runs, out, command,
                                               args.alignment_metric, args.budget):
                print(f"warning: {warning}", file=sys.stderr)
            print(f"{args.results_page}: blocks regenerated from {len(runs)} runs")
        else:
            path = write_report(runs, out, args.title, command, args.alignment_metric,
                                args.budget)
            print(f"{path}: {len(runs)} runs")
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
