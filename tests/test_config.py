"""Config loading: defaults, files, overrides, and refusals that name the key and the choices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from grape_dist.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_config_loads():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(files) >= 9
    for f in files:
        load_config(f)


def test_overrides_apply_after_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rule: dfa\ntrain: {epochs: 4}\noptim: {lr: 0.001}\n")
    cfg = load_config(f, ["train.epochs=3", "rule=grape", "model.hidden=[8, 8]"])
    assert (cfg.rule, cfg.train.epochs, cfg.optim.lr, cfg.model.hidden) == ("grape", 3, 1e-3,
                                                                          [8, 8])
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("override,match", [
    (["rule=sgd"], r"rule: 'sgd' is not allowed; allowed values: bp, fa, dfa, drtp, pepita, grape"),
    (["train.epoch=3"], r"unknown key 'train.epoch' \(did you mean 'epochs'\?\)"),
    (["optim.lr=0"], r"optim.lr: must be > 0"),
    (["optim.lr=-1"], r"optim.lr: must be > 0"),
    (["grape.b_optim.lr=0"], r"grape.b_optim.lr: must be > 0"),
    (["optim.warmup_steps=-1"], r"optim.warmup_steps: must be >= 0"),
    (["grape.b_optim.warmup_steps=10"], r"grape.b_optim.warmup_steps: only the weights' "
                                        r"optimiser \(optim.warmup_steps\) warms up"),
    (["rule=grape", "calibration.every_epochs=-1"], r"calibration.every_epochs: must be >= 0"),
    (["train.epochs=three"], r"train.epochs: expected an integer, got 'three'"),
    (["train.epochs=2.5"], r"train.epochs: expected an integer"),
    (["grape.routing=all"], r"grape.routing: 'all' is not allowed; allowed values: per_block, "
                            r"shared"),
    (["pipeline.schedule=dualpipe"], r"allowed values: native, gpipe, 1f1b, zero_bubble, zbv, "
                                     r"dualpipev"),
    (["train.jacobian_metric_max_outputs=-1"], r"train.jacobian_metric_max_outputs: must be >= 0"),
    (["rule=bp", "calibration.every_epochs=1"], r"calibration applies to rules dfa, grape"),
    (["rule=pepita", "model.name=lenet"], r"pepita is defined for MLPs only"),
    (["data.name=imagenet"], r"data.name: 'imagenet' is not allowed; allowed values: mnist"),
    (["data.batch_size=0"], r"data.batch_size: must be > 0"),
    (["pipeline.micro_batches=0"], r"pipeline.micro_batches: must be >= 1"),
    (["model.hidden=5"], r"model.hidden: expected a list"),
    (["train"], r"must look like key.sub=value"),
    (["bogus=1"], r"unknown key 'bogus'"),
])
def test_bad_values_are_refused_naming_key_and_choices(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


def test_bad_file_is_refused(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim: {lr: 0.1, momentun: 0.9}\n")
    with pytest.raises(ConfigError, match="unknown key 'optim.momentun'.*did you mean 'momentum'"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_entry_point_refuses_bad_config_before_starting():
    r = subprocess.run([sys.executable, "-m", "grape_dist.train", "optim.lr=-3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert "config error: optim.lr: must be > 0, got -3" in r.stderr


def test_partial_section_keeps_the_fields_own_defaults():
    # calibration.optim defaults to the paper's SGD(0.9) lr 0.01, unlike the top-level optim.
    cfg = load_config(None, ["calibration.optim.lr=0.5"])
    assert (cfg.calibration.optim.name, cfg.calibration.optim.momentum) == ("sgd", 0.9)
    assert cfg.calibration.optim.lr == 0.5
    assert cfg.grape.b_optim.name == "sgd"
