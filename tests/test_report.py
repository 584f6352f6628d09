"""`python -m grape_dist.report` on run folders made by the real trainer: 2 rules x 2 seeds x
2 calibration intervals of a tiny MNIST MLP, then the report CLI as a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RULES, SEEDS, INTERVALS = ("dfa", "grape"), (0, 1), (0, 1)
TINY = ["data.train_subset=256", "data.test_subset=256", "data.batch_size=32",
        "train.epochs=2", "model.hidden=[32,16]", "train.threads=1", "train.checkpoint=false"]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 real runs under root/mlp/, trained in this process (one torch import for all)."""
    from grape_dist.train import main

    root = tmp_path_factory.mktemp("runs")
    for rule in RULES:
        for t in INTERVALS:
            for seed in SEEDS:
                out = root / "mlp" / f"{rule}_T{t}_s{seed}"
                rc = main(["--config", str(ROOT / "configs/mnist_mlp_grape.yaml"), "--out",
                           str(out), "--quiet", f"rule={rule}", f"seed={seed}",
                           f"calibration.every_epochs={t}", *TINY])
                assert rc == 0, out
    return root


def report(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grape_dist.report", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def made(runs_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    r = report(runs_root, "--out", out, "--title", "Tiny MLP")
    assert r.returncode == 0, r.stderr
    assert "8 runs" in r.stdout
    return out


def table_rows(markdown: str) -> list[dict[str, str]]:
    """The markdown table(s) as dicts keyed by header cell."""
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split(" | "))))
            for ln in lines[2:] if not ln.startswith("| run group")]


def expected(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def test_plots_are_png_and_linked(made: Path) -> None:
    text = (made / "report.md").read_text()
    assert text.startswith("# Tiny MLP\n")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["mnist_mlp_curve.png", "mnist_mlp_alignment.png",
                     "mnist_mlp_calibration.png", "mnist_mlp_time.png"]
    for link in links:
        path = made / link  # relative to report.md
        assert path.stat().st_size > 0
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
            im.verify()


def test_table_rows_seeds_and_mean_std(made: Path, runs_root: Path) -> None:
    rows = table_rows((made / "report.md").read_text())
    # One row per (rule, T), in the rule order BP, FA, DFA, ..., GrAPE and T ascending.
    assert [(r["rule"], r["T"]) for r in rows] == [("dfa", "none"), ("dfa", "1"),
                                                   ("grape", "none"), ("grape", "1")]
    # Recomputed from the run folders' own files, not through grape_dist.report.
    groups: dict[tuple[str, str], list[dict]] = {}
    for summary in sorted(runs_root.rglob("summary.json")):
        cfg = yaml.safe_load((summary.parent / "config.yaml").read_text())
        t = cfg["calibration"]["every_epochs"]
        groups.setdefault((cfg["rule"], "none" if t == 0 else str(t)), []).append(
            {**json.loads(summary.read_text()), "seed": cfg["seed"]})
    for row in rows:
        runs = groups[(row["rule"], row["T"])]
        assert row["seeds"] == f"{len(runs)} (0, 1)"
        assert row["final test acc. (%)"] == expected(
            [100 * s["final_test_accuracy"] for s in runs])
        assert row["best test acc. (%)"] == expected(
            [100 * s["best_test_accuracy"] for s in runs])
        assert row["calibrations"] == ("0" if row["T"] == "none" else "2")
        assert row["world size"] == "1" and row["model"] == "mlp" and row["dataset"] == "mnist"
        assert row["run group"] == row["rule"] + ("" if row["T"] == "none" else " T=1")


def test_calibration_plot_only_when_t_varies(runs_root: Path, tmp_path: Path) -> None:
    only_t0 = sorted(runs_root.glob("mlp/*_T0_*"))
    r = report(*only_t0, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "report.md").read_text()
    assert "mnist_mlp_curve.png" in text and "calibration.png" not in text
    assert not (tmp_path / "mnist_mlp_calibration.png").exists()
    assert [row["seeds"] for row in table_rows(text)] == ["2 (0, 1)", "2 (0, 1)"]


@pytest.mark.parametrize("make", ["missing", "file", "empty", "no_runs"])
def test_bad_input_exits_2_with_one_line(tmp_path: Path, make: str) -> None:
    target = tmp_path / "target"
    if make == "file":
        target.write_text("x")
    elif make in ("empty", "no_runs"):
        target.mkdir()
        if make == "no_runs":  # a started but unfinished run: no summary.json
            (target / "sub").mkdir()
            (target / "sub" / "metrics.jsonl").write_text("{}\n")
    r = report(target, "--out", tmp_path / "out")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0], \
        r.stderr
    assert not (tmp_path / "out").exists()


def test_old_runs_and_differing_keys(runs_root: Path, tmp_path: Path) -> None:
    """An older run (no config.yaml, fewer summary keys, rows without `calibrated`) still
    reports; runs that differ in a config key other than the seed form their own group; a key
    an older config lacks counts as its default."""
    from grape_dist.report import fmt_mean_std, main

    runs = tmp_path / "runs"

    def edited(src: Path, suffix: str, edit) -> None:
        """A copy with an edited config (its numbers stay the same: only grouping counts)."""
        dst = runs / f"{src.name}_{suffix}"
        shutil.copytree(src, dst)
        cfg = yaml.safe_load((dst / "config.yaml").read_text())
        edit(cfg)
        (dst / "config.yaml").write_text(yaml.safe_dump(cfg))

    for src in sorted(runs_root.glob("mlp/grape_T0_*")):
        shutil.copytree(src, runs / src.name)
        edited(src, "lr", lambda c: c["optim"].update(lr=0.002))  # a sweep point
        edited(src, "chan", lambda c: c["feedback"].update(conv="channel"))
        edited(src, "old", lambda c: c["feedback"].pop("conv"))  # from before feedback.conv
        # ... and older than its twin, with another result: a repeat of the seed, not pooled.
        twin = runs / f"{src.name}_old"
        summary = json.loads((twin / "summary.json").read_text())
        (twin / "summary.json").write_text(json.dumps({**summary, "final_test_accuracy": 0.0}))
        os.utime(twin / "metrics.jsonl", (1e9, 1e9))
    old = runs / "old"
    shutil.copytree(runs_root / "mlp" / "dfa_T0_s0", old)
    (old / "config.yaml").unlink()
    summary = json.loads((old / "summary.json").read_text())
    for key in ("best_test_accuracy", "wall_seconds", "world_size"):
        del summary[key]
    (old / "summary.json").write_text(json.dumps(summary))
    rows = [json.loads(ln) for ln in (old / "metrics.jsonl").read_text().splitlines()]
    (old / "metrics.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "calibrated"}) + "\n"
                for r in rows) + '{"epoch": 3, "spl')  # and a line cut short by a crash
    assert main([str(runs), "--out", str(tmp_path / "out")]) == 0
    table = table_rows((tmp_path / "out" / "report.md").read_text())
    by_group = {r["run group"]: r for r in table}
    assert list(by_group) == ["dfa", "grape (feedback.conv=channel, optim.lr=0.0005)",
                              "grape (feedback.conv=full, optim.lr=0.0005)",
                              "grape (feedback.conv=full, optim.lr=0.002)"]
    assert by_group["dfa"]["T"] == "?" and by_group["dfa"]["seeds"] == "1 (?)"
    best = max(r["accuracy"] for r in rows if r["split"] == "test")  # from the rows instead
    assert by_group["dfa"]["best test acc. (%)"] == f"{100 * best:.2f}"
    assert by_group["dfa"]["wall s"] == "—" and by_group["dfa"]["world size"] == "—"
    full = by_group["grape (feedback.conv=full, optim.lr=0.0005)"]
    assert full["seeds"] == "2 (0, 1); 2 repeat(s) of a seed not pooled"
    finals = [json.loads((src / "summary.json").read_text())["final_test_accuracy"]
              for src in sorted(runs_root.glob("mlp/grape_T0_*"))]
    assert full["final test acc. (%)"] == fmt_mean_std([100 * v for v in finals])
    assert by_group["grape (feedback.conv=full, optim.lr=0.002)"]["seeds"] == "2 (0, 1)"


def test_results_page_blocks(runs_root: Path, tmp_path: Path) -> None:
    """Only the text between report:begin/end markers changes; reruns change nothing."""
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    prose = (ROOT / "docs" / "results.md").read_text()
    example = "```\n<!-- report:begin mlp/* -->\n<!-- report:end mlp/* -->\n```\n"
    before = prose + "\n## Generated\n\n" + example + "\nText before.\n\n"
    middle = "\nText between.\n\n"
    after = "\nText after.\n"
    page.write_text(before + "<!-- report:begin mlp/dfa_* table curve -->\nstale\n"
                    "<!-- report:end mlp/dfa_* -->\n" + middle +
                    "<!-- report:begin elsewhere/* -->\nkept\n<!-- report:end elsewhere/* -->\n"
                    + after)
    r = report(runs_root, "--out", tmp_path / "docs" / "results",
               "--results-page", page)
    assert r.returncode == 0, r.stderr
    assert "elsewhere/*" in r.stderr and "matches no run" in r.stderr
    text = page.read_text()
    head, rest = text.split("<!-- report:begin mlp/dfa_* table curve -->\n", 1)
    block, rest = rest.split("<!-- report:end mlp/dfa_* -->\n", 1)
    assert head == before and rest == middle + (
        "<!-- report:begin elsewhere/* -->\nkept\n<!-- report:end elsewhere/* -->\n" + after)
    assert "stale" not in block
    assert [(row["rule"], row["T"]) for row in table_rows(block)] == [("dfa", "none"),
                                                                      ("dfa", "1")]
    links = re.findall(r"\]\(([^)]+)\)", block)
    assert links == ["results/mlp_dfa/mnist_mlp_curve.png"]  # relative to the page
    assert (page.parent / links[0]).is_file()
    assert not list((tmp_path / "docs" / "results").rglob("*alignment*"))  # not asked for
    r = report(runs_root, "--out", tmp_path / "docs" / "results", "--results-page", page)
    assert r.returncode == 0 and page.read_text() == text


def test_results_page_unclosed_marker(runs_root: Path, tmp_path: Path) -> None:
    page = tmp_path / "results.md"
    page.write_text("a\n<!-- report:begin mlp/* -->\nb\n")
    r = report(runs_root, "--out", tmp_path / "r", "--results-page", page)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {page}:2: report:begin mlp/* has no report:end mlp/*"]
    assert page.read_text() == "a\n<!-- report:begin mlp/* -->\nb\n"


def test_time_to_accuracy_from_the_runs_clocks(runs_root: Path, made: Path) -> None:
    """Every real run writes timing.jsonl (one row per evaluation, training seconds rising);
    the report draws the metric against training time and reads off the time to a target."""
    from grape_dist.report import discover, metric_over_time, time_to_reach

    runs = discover([runs_root])
    for run in runs:
        assert [r["epoch"] for r in run.timing] == [1, 2]
        seconds = [r["train_seconds"] for r in run.timing]
        assert 0 < seconds[0] < seconds[1] <= run.timing[1]["wall_seconds"]
        pts = metric_over_time(run)
        assert [t for t, _ in pts] == seconds
        assert [v for _, v in pts] == [100 * r["accuracy"] for r in run.test_rows]
        first, last = pts[0][1], pts[1][1]
        assert time_to_reach(run, first) == seconds[0]
        assert time_to_reach(run, max(first, last) + 1) is None
        if last > first:  # linear between the two evaluations
            mid = (first + last) / 2
            assert time_to_reach(run, mid) == pytest.approx((seconds[0] + seconds[1]) / 2)
    assert list(made.glob("*_time.png"))


@pytest.mark.parametrize("budget", ["shortest", "between"])
def test_budget_reads_each_group_at_equal_training_time(runs_root: Path, tmp_path: Path,
                                                        budget: str) -> None:
    """`--budget`: each group's metric at the budget is that of its runs' last evaluation
    within that many training seconds, recomputed here from timing.jsonl and metrics.jsonl."""
    clocks: dict[tuple[str, str], list[list[tuple[float, float]]]] = {}
    for summary in sorted(runs_root.rglob("summary.json")):
        cfg = yaml.safe_load((summary.parent / "config.yaml").read_text())
        t = cfg["calibration"]["every_epochs"]
        seconds = {json.loads(ln)["step"]: json.loads(ln)["train_seconds"]
                   for ln in (summary.parent / "timing.jsonl").read_text().splitlines()}
        evals = [json.loads(ln) for ln in (summary.parent / "metrics.jsonl").read_text()
                 .splitlines()]
        clocks.setdefault((cfg["rule"], "none" if t == 0 else str(t)), []).append(
            [(seconds[e["step"]], 100 * e["accuracy"]) for e in evals
             if e.get("split") == "test"])
    totals = [run[-1][0] for runs in clocks.values() for run in runs]
    # "between": after every run's first evaluation, before the slowest run's second.
    seconds = (min(totals) if budget == "shortest" else
               (max(run[0][0] for runs in clocks.values() for run in runs) + max(totals)) / 2)
    r = report(runs_root, "--out", tmp_path, "--budget",
               budget if budget == "shortest" else str(seconds))
    assert r.returncode == 0, r.stderr
    rows = table_rows((tmp_path / "report.md").read_text())
    column = f"test acc. at {seconds:.0f} training s"
    assert all(column in row for row in rows), rows[0].keys()
    for row in rows:
        runs = clocks[(row["rule"], row["T"])]
        # A run that had not evaluated by then gives nothing (it may be the slower seed).
        at = [within[-1] for run in runs
              if (within := [v for t, v in run if t <= seconds * (1 + 1e-9)])]
        assert row[column] == (expected(at) if len(at) > 1 else
                               f"{at[0]:.2f}" if at else "—")
        assert row["training s"] == f"{statistics.fmean(run[-1][0] for run in runs):.0f}"
    # Before any evaluation nothing is read off; a bad budget is refused before any work.
    early = report(runs_root, "--out", tmp_path / "early", "--budget", "1e-6")
    assert early.returncode == 0, early.stderr
    assert {row["test acc. at 0 training s"] for row in
            table_rows((tmp_path / "early" / "report.md").read_text())} == {"—"}
    for text in ("0", "x", "nan"):
        bad = report(runs_root, "--out", tmp_path / "bad", "--budget", text)
        assert bad.returncode == 2 and f"--budget: '{text}'" in bad.stderr
        assert not (tmp_path / "bad").exists()


def test_a_resumed_run_is_grouped_by_the_config_it_finished_with(runs_root: Path,
                                                                 tmp_path: Path) -> None:
    """A run started for 1 epoch and resumed with train.epochs=2 (config.yaml keeps the
    first, resumes.jsonl the change) pools with a run started for 2 epochs."""
    from grape_dist.train import main

    run = tmp_path / "runs" / "dfa_T0_s0_resumed"
    common = [f"{k}={v}" for k, v in (a.split("=", 1) for a in TINY) if k != "train.epochs"]
    assert main(["--config", str(ROOT / "configs/mnist_mlp_grape.yaml"), "--out", str(run),
                 "--quiet", "rule=dfa", "seed=0", "calibration.every_epochs=0", *common,
                 "train.epochs=1", "train.checkpoint=true"]) == 0
    assert main(["--resume", str(run), "--quiet", "train.epochs=2"]) == 0
    assert "train.epochs" in (run / "resumes.jsonl").read_text()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 1
    # Named to sort before seed 0's folder: the seeds column is still listed in seed order.
    shutil.copytree(runs_root / "mlp" / "dfa_T0_s1", tmp_path / "runs" / "a_dfa_T0_s1")
    r = report(tmp_path / "runs", "--out", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    rows = table_rows((tmp_path / "report" / "report.md").read_text())
    assert [(row["run group"], row["seeds"]) for row in rows] == [("dfa", "2 (0, 1)")]
