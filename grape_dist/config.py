"""Typed run configuration: YAML files plus dotted command-line overrides, validated up front.

Every section is a dataclass whose defaults are the documented defaults. Loading is strict: an
unknown key, a value of the wrong type or a value out of range raises `ConfigError` naming the
dotted key and what is allowed, before any model is built or any rank starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import StartupError

# Rules that update every block from a directly projected signal (no backward between blocks).
DIRECT_RULES = ("dfa", "drtp", "grape")
CALIBRATED_RULES = ("dfa", "grape")


# Datasets of text (language modelling); the rest are image classification.
TEXT_DATASETS = ("shakespeare", "wikitext2", "wikitext103")
# Colour images of natural scenes, where a crop and a mirror image keep the label.
AUGMENTED_DATASETS = ("cifar10", "cifar100", "tinyimagenet")
# The text datasets the char (ASCII) tokeniser covers; WikiText has accents, CJK, ...
ASCII_TEXT_DATASETS = ("shakespeare",)


class ConfigError(StartupError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""

    prefix = "config error"


def _one_line(exc: BaseException) -> str:
    """A parser's multi-line message folded into one line."""
    return " ".join(str(exc).split())


@dataclass
class OptimConfig:
    """A torch optimiser. `momentum` is SGD's; `betas` are Adam's.

    `schedule` sets the learning rate per epoch: constant; cosine (from lr to 0 over the run);
    step (multiply by `gamma` at each epoch in `milestones`, as the paper's App. E).
    `warmup_steps` (the weights' `optim` only): over the run's first N training steps the
    learning rate rises linearly to the scheduled one (step k of N uses k/N of it), as
    transformers are usually trained.
    """

    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "cosine", "step"] = "constant"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_steps: int = 0
    # torch's fused single-kernel update (CPU and CUDA): measured here 1.8x faster for SGD and
    # 5x for Adam on 4M parameters, the same arithmetic.
    fused: bool = True


@dataclass
class ModelConfig:
    """`mlp`: `hidden` widths; `lenet`: conv `channels`, then fully connected `hidden` widths;
    `transformer` (text datasets): a decoder-only language model of `layers` pre-LN layers of
    width `d_model` with `heads` attention heads, context `data.seq_len`; `feedback` is
    `macro` (one feedback point per layer) or `micro` (one per attention and MLP sub-layer);
    `resnet`: He et al.'s CIFAR ResNet of `depth` layers, one feedback point per residual
    block; `alexnet`, `vgg16`: the CIFAR AlexNet (8 blocks) and VGG-16 (16 blocks) of Table 2,
    one feedback point per weight layer (docs/convnets.md)."""

    name: Literal["mlp", "lenet", "resnet", "transformer", "alexnet", "vgg16"] = "mlp"
    hidden: list[int] = field(default_factory=lambda: [1024, 1024])
    channels: list[int] = field(default_factory=lambda: [6, 16])
    activation: Literal["relu", "tanh"] = "relu"
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    feedback: Literal["macro", "micro"] = "macro"
    # resnet: He et al.'s CIFAR ResNet of this depth (6n + 2: 20, 56, ...).
    depth: int = 20
    # alexnet, vgg16: multiplier of every channel count and hidden width (1.0: the paper's
    # model; e.g. 0.25 for a CPU-sized one).
    width: float = 1.0
    # alexnet, vgg16: dropout probability at the input of the hidden Linear layers (0.5 as in
    # torchvision's AlexNet and the CIFAR VGGs; 0 leaves the layer out).
    dropout: float = 0.5


@dataclass
class DataConfig:
    """`name`: image datasets mnist, cifar10, cifar100, tinyimagenet (evaluated on its `valid`
    split); text datasets shakespeare (evaluated on test.txt), wikitext2, wikitext103 (evaluated
    on `validation`), data/text.py."""

    name: Literal["mnist", "cifar10", "cifar100", "tinyimagenet", "shakespeare", "wikitext2",
                  "wikitext103"] = "mnist"
    # Folder in the hub's parquet layout; None: $GRAPE_DATA_DIR, then the embedded MNIST copy.
    root: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 1000
    # Train on a fixed random subset of this many samples (0 = all); for quick runs and tests.
    train_subset: int = 0
    test_subset: int = 0
    # Text datasets: tokens per training sequence (the model's context); the corpus is cut into
    # consecutive windows of this length, each predicting its next-token shift.
    seq_len: int = 128
    # Text datasets, offline: `char` (ASCII codes, 128 ids; ASCII corpora only), `byte` (UTF-8
    # bytes, 256 ids) or `word` (whitespace-separated words, each line ended by <eos>: <unk>,
    # <eos> and the `vocab_size` - 2 most frequent training words).
    tokenizer: Literal["char", "byte", "word"] = "char"
    # The word tokeniser's vocabulary size (the model's classes); 0 for char and byte.
    vocab_size: int = 0
    # Training images: random crop from the image zero-padded by 4 (black) and horizontal
    # flip, drawn per (seed, epoch, training row): cifar10, cifar100, tinyimagenet
    # (data/augment.py). Evaluation and the alignment probe see the images as they are.
    augment: bool = False
    # Drop each epoch's last mini-batch when it is partial (every schedule; torch's pipeline
    # schedules need it, they take equal micro-batches).
    drop_last: bool = False


@dataclass
class FeedbackConfig:
    """Initial feedback matrices B_l (d_out x n_l) of the direct rules and FA."""

    init: Literal["gaussian", "uniform"] = "gaussian"
    # Unit-norm columns, as GrAPE's renormalisation keeps them; DFA starts from the same B.
    normalize_columns: bool = True
    # Conv blocks (output C x H x W): `full`, one column per output value (the paper's B_l);
    # `channel`, one column per channel, its signal repeated over positions (C columns: far
    # fewer parameters, and GrAPE's tangent is drawn per channel). Dense blocks: always full.
    conv: Literal["full", "channel"] = "full"
    # Where the direct rules inject their signal: `block`, one feedback point per block output,
    # trained by backprop through the whole block (the paper's form); `layer`, one point per
    # weight layer of residual blocks and transformer sub-layers (each conv's BatchNorm/ReLU
    # output; the qkv, attention-output, MLP-hidden and MLP-output projections), each layer
    # trained from its own point with no backward through any other layer (docs/points.md).
    # Models without such blocks (MLP, LeNet, AlexNet, VGG) already have one point per layer.
    points: Literal["block", "layer"] = "block"


@dataclass
class GrapeConfig:
    """GrAPE's feedback learning (paper section 3, App. C); defaults are justified in docs/."""

    # Tangents live in activation space (each block's output); docs/grape.md says why the
    # paper's weight-space alternative is not offered.
    routing: Literal["per_block", "shared"] = "per_block"
    # Tangents on m rows of each mini-batch (evenly spaced by row index; 0 = every row). The
    # rows do not depend on the micro-batching or the data-parallel split.
    tangent_samples: int = 0
    # Independent tangent directions per tangent row (K): J_hat sums K x m rank-1 terms.
    directions: int = 1
    # Where the tangent noise is drawn: `host` (CPU, then copied: the same numbers on every
    # device) or `device` (on the block's device: no host work or copy, numbers differ per
    # device type; what a GPU run wants for speed).
    tangent_noise: Literal["host", "device"] = "host"
    # Optimiser of B on L_align = 1 - mean_k cos(B[:, k], J_hat[:, k]) (the 1/n_l of eq. 17 is in
    # the gradient). The paper's SGD(0.9) lr 0.01 barely moves B; see docs/grape.md.
    b_optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(name="sgd", lr=1.0, momentum=0.9)
    )
    eps: float = 1e-8


@dataclass
class PepitaConfig:
    # F entries ~ U(-s, s) with s = f_scale * sqrt(6 / input_dim) (Dellaferrera & Kreiman 2022).
    f_scale: float = 0.05


@dataclass
class CalibrationConfig:
    """One exact BP step on one random mini-batch every `every_epochs` epochs (0 = off).

    `trigger: alignment`: every `every_epochs` epochs, measure the blocks' alignment on the
    probe batch (mean over blocks of grad_cos, cos(B_l^T e, dL/dh_l)) and calibrate only when it
    is below `threshold`, at most `budget` times in the run (0 = no limit). Rank 0 decides from
    every stage's measurements; all ranks calibrate on the same step."""

    every_epochs: int = 0
    trigger: Literal["every", "alignment"] = "every"
    threshold: float = 0.5
    budget: int = 0
    batch_size: int = 128
    # paper: one step of `optim` (SGD lr 0.01) with fresh state, Algorithm 1's step 4.
    # optimizer: the exact gradient goes through the weights' own optimiser, its state and its
    # current learning rate: one more training step, with the true gradient (docs/grape.md).
    form: Literal["paper", "optimizer"] = "paper"
    # Trust bound for either form: each tensor moves by at most max_update x its norm
    # (0 = unbounded, the paper's).
    max_update: float = 0.01
    # The step is tried at 1, 1/2, ..., 1/2^line_search of its length; the one with the lowest
    # loss (eval mode) on `check_rows` training rows drawn apart from its mini-batch is kept,
    # or none if none lowers it (0 = off, the paper's). check_rows 0: judge on the calibration
    # mini-batch itself (too lenient: docs/grape.md).
    line_search: int = 4
    check_rows: int = 1024
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(name="sgd", lr=0.01, momentum=0.9)
    )


@dataclass
class PipelineConfig:
    """How ranks are arranged and blocks split into stages. World size = pp x dp."""

    # Pipeline stages; 0 = WORLD_SIZE / dp.
    pp: int = 0
    # Data-parallel replicas of every stage; the global batch is dp x data.batch_size.
    dp: int = 1
    micro_batches: int = 1
    # Contiguous split balanced by what each stage holds (weights, their optimiser state,
    # feedback matrices and theirs: `memory`), by parameter count alone, or by measured forward
    # time (rank 0's).
    balance: Literal["memory", "params", "time"] = "memory"
    # Explicit blocks per stage (e.g. [2, 1]); overrides `balance`.
    stage_blocks: list[int] = field(default_factory=list)
    # BP only: `native` (this runtime, all forwards then all backwards), or
    # torch.distributed.pipelining's `gpipe`, `1f1b`, and the schedules with two stages per
    # rank: `zero_bubble` (interleaved zero bubble; rank r holds stages r and r + pp), `zbv`
    # (zero bubble V) and `dualpipev` (both V-shaped: rank r holds stages r and 2pp - 1 - r).
    schedule: Literal["native", "gpipe", "1f1b", "zero_bubble", "zbv", "dualpipev"] = "native"
    timeout_s: float = 300.0
    # Across ranks: messages (activations, gradients) a rank may have in flight before a send
    # waits for its oldest one; bounds the memory they hold (distributed/transport.py).
    max_sends_in_flight: int = 4
    # Direct rules: broadcast each micro-batch's signal as soon as it exists and update at once,
    # so a stage holds ~pp micro-batches of activations (like 1F1B) instead of all of them.
    # For GrAPE the weight update then uses B from before this mini-batch's B step (which still
    # runs once per mini-batch on the summed estimate). Same trajectory on 1 and P ranks.
    # Refused with nccl across ranks until it has been run on GPUs (docs/pipeline.md).
    streaming: bool = False
    # One process on CUDA with several stages (pp > 1 in one process, e.g. the Table 5 bench):
    # each stage issues its work on its own CUDA stream, so the direct rules' stages update
    # concurrently (runtime/streams.py). Same results as without, to float tolerance.
    stage_streams: bool = False


@dataclass
class TrainConfig:
    epochs: int = 10
    # Evaluate (test split + alignment probe) every this many epochs; the last epoch always is.
    eval_every: int = 1
    probe_batch_size: int = 256
    # The exact-Jacobian alignment metric (`jac_cos`) costs one extra backward pass over the
    # probe batch per output unit: computed when the model has at most this many outputs
    # (0 = never).
    jacobian_metric_max_outputs: int = 100
    # torch intra-op threads; 0 leaves torch's default.
    threads: int = 0
    progress: bool = True
    # Write the final weights and feedback matrices to <out>/final_state/, one file per stage
    # written by the rank that holds it (`grape_dist.runtime.load_final_state` merges them).
    save_final: bool = False
    # auto: this rank's GPU (cuda:LOCAL_RANK, nccl) when there is one, else the CPU (gloo).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Checkpoints under <out>/checkpoints/ (runtime/checkpoint.py): at each epoch end, every
    # `checkpoint_every_steps` steps (0: epoch ends only) and when interrupted; the newest
    # `keep_checkpoints` are kept. `--resume OUT` continues from the newest.
    checkpoint: bool = True
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2


@dataclass
class Config:
    seed: int = 0
    rule: Literal["bp", "fa", "dfa", "drtp", "pepita", "grape"] = "grape"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    grape: GrapeConfig = field(default_factory=GrapeConfig)
    pepita: PepitaConfig = field(default_factory=PepitaConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
# Strict conversion from plain YAML data to the dataclasses.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp` or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(str, allowed))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_type_name(tp)}), got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads 1e-3 (no dot) as a string (YAML 1.1); accept plain float literals.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f"under '{prefix}'" if prefix else "at the top level"
            raise ConfigError(
                f"unknown key '{key}'{hint}; allowed keys {where}: {', '.join(names)}"
            )
        f = next(f for f in dataclasses.fields(cls) if f.name == k)
        if isinstance(v, dict) and f.default_factory is not dataclasses.MISSING:
            # A partial section overrides the field's own default (e.g. calibration.optim is
            # SGD by default), not the defaults of the section's class.
            v = _merge(dataclasses.asdict(f.default_factory()), v)
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value parsed as YAML (3 -> int, etc.)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML "
                          f"({_one_line(exc)})") from None
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def to_dict(cfg: Config) -> dict:
    """Plain data (lists, not tuples) for YAML/JSON."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then each `key=value` override; then validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path) as fh:
            try:
                loaded = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML ({_one_line(exc)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    for text in overrides or []:
        data = _merge(data, parse_override(text))
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def load_config_dict(data: dict, overrides: list[str] | None = None) -> Config:
    """A config from `to_dict`'s output (shipped to Ray workers, saved in a checkpoint), then
    each `key=value` override; validated."""
    for text in overrides or []:
        data = _merge(data, parse_override(text))
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _validate_optim(o: OptimConfig, key: str) -> None:
    _check(o.lr > 0, f"{key}.lr", f"must be > 0, got {o.lr}")
    _check(0 <= o.momentum < 1, f"{key}.momentum", f"must be in [0, 1), got {o.momentum}")
    _check(o.weight_decay >= 0, f"{key}.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(all(0 <= b < 1 for b in o.betas), f"{key}.betas", f"each in [0, 1), got {o.betas}")
    _check(0 < o.gamma <= 1, f"{key}.gamma", f"must be in (0, 1], got {o.gamma}")
    _check(all(m > 0 for m in o.milestones), f"{key}.milestones", "epochs must be > 0")
    _check(o.warmup_steps >= 0, f"{key}.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _check(o.warmup_steps == 0 or key == "optim", f"{key}.warmup_steps",
           "only the weights' optimiser (optim.warmup_steps) warms up; set it to 0 here")


def _validate_tokenizer(d: DataConfig, text: bool) -> None:
    """data.tokenizer and data.vocab_size: the model's vocabulary comes from them alone."""
    if not text:
        _check(d.tokenizer == "char" and d.vocab_size == 0,
               "data.tokenizer" if d.tokenizer != "char" else "data.vocab_size",
               f"applies to the text datasets ({', '.join(TEXT_DATASETS)}), not '{d.name}'; "
               "leave data.tokenizer and data.vocab_size unset")
        return
    if d.tokenizer == "char":
        _check(d.name in ASCII_TEXT_DATASETS, "data.tokenizer",
               f"'char' covers ASCII text only ({', '.join(ASCII_TEXT_DATASETS)}) and "
               f"'{d.name}' is not ASCII; allowed values for it: byte, word")
    if d.tokenizer == "word":
        _check(d.vocab_size >= 3, "data.vocab_size",
               "the word tokenizer needs >= 3 (<unk>, <eos> and at least one word), "
               f"got {d.vocab_size}")
    else:
        fixed = 128 if d.tokenizer == "char" else 256
        _check(d.vocab_size == 0, "data.vocab_size",
               f"the {d.tokenizer} tokenizer has a fixed vocabulary of {fixed}; leave it 0 "
               f"(or use data.tokenizer=word), got {d.vocab_size}")


def validate(cfg: Config) -> None:
    """Range and cross-field checks; types and allowed values were checked while loading."""
    _check(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    for key in ("optim", "grape.b_optim", "calibration.optim"):
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        _validate_optim(obj, key)
    m = cfg.model
    _check(len(m.hidden) >= 1 or m.name == "lenet", "model.hidden", "needs at least one width")
    _check(all(w > 0 for w in m.hidden), "model.hidden", f"widths must be > 0, got {m.hidden}")
    if m.name == "lenet":
        _check(len(m.channels) == 2, "model.channels",
               f"lenet takes 2 conv widths, got {m.channels}")
        _check(all(c > 0 for c in m.channels), "model.channels", "widths must be > 0")
    d = cfg.data
    _check(d.batch_size > 0, "data.batch_size", f"must be > 0, got {d.batch_size}")
    _check(d.eval_batch_size > 0, "data.eval_batch_size", f"must be > 0, got {d.eval_batch_size}")
    _check(d.train_subset >= 0, "data.train_subset", "must be >= 0 (0 = all)")
    _check(d.test_subset >= 0, "data.test_subset", "must be >= 0 (0 = all)")
    g = cfg.grape
    _check(g.tangent_samples >= 0, "grape.tangent_samples", "must be >= 0 (0 = every sample)")
    _check(g.directions >= 1, "grape.directions", f"must be >= 1, got {g.directions}")
    _check(g.eps > 0, "grape.eps", f"must be > 0, got {g.eps}")
    _check(cfg.pepita.f_scale > 0, "pepita.f_scale", "must be > 0")
    t = cfg.train
    _check(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps",
           f"must be >= 0 (0 = at epoch ends only), got {t.checkpoint_every_steps}")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints",
           f"must be >= 1, got {t.keep_checkpoints}")
    c = cfg.calibration
    _check(c.every_epochs >= 0, "calibration.every_epochs",
           f"must be >= 0 (0 = off), got T={c.every_epochs}")
    _check(c.batch_size > 0, "calibration.batch_size", f"must be > 0, got {c.batch_size}")
    _check(c.budget >= 0, "calibration.budget", f"must be >= 0 (0 = no limit), got {c.budget}")
    _check(not cfg.data.augment or cfg.data.name in AUGMENTED_DATASETS, "data.augment",
           f"crop and flip apply to {', '.join(AUGMENTED_DATASETS)}, not '{cfg.data.name}'; "
           "set it to false")
    _check(c.max_update >= 0, "calibration.max_update",
           f"must be >= 0 (0 = unbounded), got {c.max_update}")
    _check(c.line_search >= 0, "calibration.line_search",
           f"must be >= 0 (halvings tried; 0 = off), got {c.line_search}")
    _check(c.check_rows >= 0, "calibration.check_rows",
           f"must be >= 0 (0 = the calibration batch), got {c.check_rows}")
    if c.trigger == "alignment":
        _check(c.every_epochs > 0, "calibration.trigger",
               "alignment checks every calibration.every_epochs epochs: set it >= 1")
    if c.every_epochs > 0:
        _check(
            cfg.rule in CALIBRATED_RULES,
            "calibration.every_epochs",
            f"BP calibration applies to rules {', '.join(CALIBRATED_RULES)}, not '{cfg.rule}'; "
            "set it to 0",
        )
    if cfg.rule == "pepita":
        _check(m.name == "mlp", "rule",
               "pepita is defined for MLPs only (Table 1 has no PEPITA CNN)")
    text = d.name in TEXT_DATASETS
    _check(text == (m.name == "transformer"), "model.name",
           f"'{m.name}' does not fit dataset '{d.name}': the transformer is the language model "
           f"for the text datasets ({', '.join(TEXT_DATASETS)}), the others classify images")
    if m.name == "transformer":
        _check(cfg.rule in ("bp", "dfa", "grape"), "rule",
               f"the language model trains with bp, dfa or grape, not '{cfg.rule}'")
        for key in ("d_model", "layers", "heads"):
            _check(getattr(m, key) > 0, f"model.{key}", f"must be > 0, got {getattr(m, key)}")
        _check(m.d_model % m.heads == 0, "model.heads",
               f"must divide model.d_model={m.d_model}, got {m.heads}")
    _check(d.seq_len > 0, "data.seq_len", f"must be > 0, got {d.seq_len}")
    _validate_tokenizer(d, text)
    if m.name == "resnet":
        _check(m.depth >= 8 and (m.depth - 2) % 6 == 0, "model.depth",
               f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110), got {m.depth}")
    _check(m.width > 0, "model.width", f"must be > 0, got {m.width}")
    _check(0 <= m.dropout < 1, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    if m.name == "vgg16":
        _check(d.name in ("cifar10", "cifar100"), "model.name",
               f"vgg16 is the CIFAR variant (32x32 images pooled down to 1x1): use cifar10 "
               f"or cifar100, not {d.name!r}")
    p = cfg.pipeline
    _check(p.pp >= 0, "pipeline.pp", f"must be >= 0 (0 = WORLD_SIZE / dp), got {p.pp}")
    _check(p.dp >= 1, "pipeline.dp", f"must be >= 1, got {p.dp}")
    _check(all(b >= 1 for b in p.stage_blocks), "pipeline.stage_blocks",
           f"block counts must be >= 1, got {p.stage_blocks}")
    _check(p.timeout_s > 0, "pipeline.timeout_s", "must be > 0")
    _check(p.max_sends_in_flight >= 1, "pipeline.max_sends_in_flight",
           f"must be >= 1, got {p.max_sends_in_flight}")
    if p.streaming:
        _check(cfg.rule in DIRECT_RULES, "pipeline.streaming",
               f"applies to rules {', '.join(DIRECT_RULES)}, not '{cfg.rule}'")
    if p.schedule != "native":
        _check(cfg.rule in ("bp", "fa"), "pipeline.schedule",
               f"'{p.schedule}' is a backprop schedule (rules bp, fa); rule '{cfg.rule}' runs "
               "on the native schedule")
        # Torch's schedules split a mini-batch into equal micro-batches of fixed shapes, and
        # call the stages without the keyed dropout context (models/dropout.py): both would
        # change results silently.
        _check(d.drop_last, "data.drop_last",
               f"pipeline.schedule={p.schedule} takes equal micro-batches, so an epoch's last "
               "partial mini-batch cannot run: set data.drop_last=true (the native schedule "
               "drops it too when it is set)")
        _check(m.name not in ("alexnet", "vgg16") or m.dropout == 0, "model.dropout",
               f"torch's pipeline schedules draw dropout masks from the global random stream, "
               f"not keyed by sample as the native schedule does, so the trajectory would depend "
               f"on the layout: set model.dropout=0 or pipeline.schedule=native "
               f"(got {m.dropout})")
    _check(p.micro_batches >= 1, "pipeline.micro_batches", f"must be >= 1, got {p.micro_batches}")
    _check(
        p.micro_batches <= d.batch_size,
        "pipeline.micro_batches",
        f"{p.micro_batches} micro-batches do not fit data.batch_size={d.batch_size}",
    )
    t = cfg.train
    _check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _check(t.eval_every >= 1, "train.eval_every", f"must be >= 1, got {t.eval_every}")
    _check(t.probe_batch_size > 0, "train.probe_batch_size", "must be > 0")
    _check(t.jacobian_metric_max_outputs >= 0, "train.jacobian_metric_max_outputs",
           "must be >= 0 (0 = off)")
    _check(t.threads >= 0, "train.threads", "must be >= 0 (0 = torch default)")
