"""One place that assembles the engine: the transport (in process, or torch.distributed's from
`distributed/`), the stage split, which blocks this rank materialises, the rules (built
complete) and the schedules. It sits above `runtime/` and `distributed/`, which never import it
(tests/test_layers.py)."""

from __future__ import annotations

import logging

import torch

from .config import CALIBRATED_RULES, TEXT_DATASETS, Config
from .data import get_source, tokenizer_vocab_size
from .distributed import backend_for
from .models import BlockModel, build_model
from .rules import build_calibration_rule, build_stage_rule
from .runtime.engine import PipelineEngine
from .runtime.layout import Layout, plan_layout
from .runtime.partition import held_costs, measured_costs, partition
from .runtime.schedules import (
    ForwardThenBroadcast,
    Schedule,
    SequentialBackward,
    StreamingSignals,
    TwoForwardPasses,
)
from .runtime.stage import Stage
from .runtime.transport import InProcessTransport, Transport

log = logging.getLogger("grape_dist")


def build_model_for(cfg: Config) -> BlockModel:
    """The configured model on the meta device (its structure, no weights): sized from the
    dataset's registry entry, so it is known before any data is loaded or group joined."""
    if cfg.data.name in TEXT_DATASETS:
        # The tokeniser's vocabulary, from the config alone (the word vocabulary's size is
        # data.vocab_size whatever words the corpus turns out to have).
        vocab = tokenizer_vocab_size(cfg.data.tokenizer, cfg.data.vocab_size)
        return build_model(cfg.model, (cfg.data.seq_len,), vocab)
    src = get_source(cfg.data.name)
    return build_model(cfg.model, src.input_shape, src.num_classes)


def plan_run(cfg: Config, world_size: int, device: torch.device,
             model: BlockModel | None = None) -> Layout:
    """The checked layout of a run of `world_size` ranks on `device`, before any process group
    is joined: the one call that torchrun's entry point, the Ray job's driver and workers and
    the trainer make. Block counts come from `model` (the meta model already built, if any) or
    the model's own builder."""
    model = model if model is not None else build_model_for(cfg)
    return plan_layout(cfg, len(model.blocks), world_size, backend_for(device))


def build_engine(cfg: Config, model: BlockModel, layout: Layout, device: torch.device,
                 bounds: list[tuple[int, int]] | None = None) -> PipelineEngine:
    """The engine for this process: every stage here (`layout.placement == "all"`), or this
    rank's stages of the mesh (torch.distributed must be initialised with
    `layout.world_size` ranks). `model` may be all meta: only this rank's blocks are built.
    `bounds` overrides the configured split (in-process tests)."""
    mesh = None
    if layout.placement == "all":
        rank, transport = 0, _in_process_transport(cfg, layout, device)
    else:
        import torch.distributed as dist

        from .distributed.mesh import Mesh
        from .distributed.transport import DistributedTransport

        rank = dist.get_rank()
        mesh = Mesh.create(layout)
        transport = DistributedTransport(mesh, layout, device,
                                         cfg.pipeline.max_sends_in_flight)
    if bounds is None:
        bounds = _stage_bounds(cfg, model, layout, transport, rank, device)
    if len(bounds) != layout.num_stages:
        raise ValueError(f"{len(bounds)} stage bounds for {layout.num_stages} stages")
    local = layout.stages_at(layout.position(rank))
    model.materialize([i for s in local for i in range(*bounds[s])], cfg.seed, device)
    reduce = transport.all_reduce_replicas
    calibrate = cfg.rule in CALIBRATED_RULES and cfg.calibration.every_epochs > 0
    stages = []
    for s in local:
        rule = build_stage_rule(cfg, model, *bounds[s], reduce)
        stages.append(Stage(s, *bounds[s], rule,
                            build_calibration_rule(cfg, model, *bounds[s], reduce, rule=rule)
                            if calibrate else None))
    if rank == 0:
        log.info("layout %s; blocks per stage %s", layout.describe(),
                 [b - a for a, b in bounds])
    args = (transport, layout.num_stages, model.signal_spec, device)
    if cfg.pipeline.schedule != "native":
        from .distributed.torch_schedules import TorchPipelineSchedule
        train: Schedule = TorchPipelineSchedule(
            cfg.pipeline.schedule, model, stages, layout.num_stages, mesh, transport,
            cfg.pipeline.micro_batches, cfg.data.batch_size, device)
    else:
        train = _native_schedule(cfg)(*args)
    return PipelineEngine(model, stages, layout, rank, transport, train,
                          SequentialBackward(*args) if calibrate else None,
                          cfg.pipeline.micro_batches, device)


def _in_process_transport(cfg: Config, layout: Layout, device: torch.device) -> Transport:
    """Every stage here: in memory, with one CUDA stream per stage if asked and possible."""
    if cfg.pipeline.stage_streams and device.type == "cuda" and layout.num_stages > 1:
        from .runtime.streams import StreamTransport
        return StreamTransport(layout.num_stages, device)
    if cfg.pipeline.stage_streams:
        log.info("pipeline.stage_streams: nothing to overlap on %s with %d stage(s); the "
                 "stages run one after another", device.type, layout.num_stages)
    return InProcessTransport()


def _native_schedule(cfg: Config) -> type[Schedule]:
    if cfg.rule in ("bp", "fa"):
        return SequentialBackward
    if cfg.rule == "pepita":
        return TwoForwardPasses
    return StreamingSignals if cfg.pipeline.streaming else ForwardThenBroadcast


def _stage_bounds(cfg: Config, model: BlockModel, layout: Layout, transport: Transport,
                  rank: int, device: torch.device) -> list[tuple[int, int]]:
    p = cfg.pipeline
    costs = None
    if not p.stage_blocks and p.balance == "time" and layout.num_stages > 1:
        # Measurements differ from rank to rank: everyone takes rank 0's.
        mine = measured_costs(model, cfg.seed, device) if rank == 0 else None
        costs = transport.all_gather_object(mine)[0]
    elif p.balance == "memory":
        costs = held_costs(cfg, model)
    return partition(model, layout.num_stages, p.stage_blocks, costs)
