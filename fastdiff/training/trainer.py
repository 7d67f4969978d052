"""The trainer: one readable loop on ``accelerate`` that hosts any :class:`~fastdiff.objectives.base.Objective`.

Per step: the global batch of step ``k`` (fixed by the seed, whatever the number of processes), each phase that is
due (``update_every``: two-time-scale updates) computes its named loss terms over its share of the batch in
``grad_accum`` micro-batches (the other phases' parameters frozen), clips, steps its own optimiser, moves the
objective's EMA targets and calls its ``after_step``; then the EMA of the exported network follows. The trainer calls
only what :class:`~fastdiff.objectives.base.Objective` declares. Host synchronisations: one per optimiser step (the
guard) and one per log step (the logged terms); none per micro-batch. Around it: a NaN/inf guard,
atomic checkpoints (``accelerator.save_state`` into a temporary folder, a manifest with file hashes, then a rename)
with a retention limit and ``resume="latest"`` that skips corrupt ones, trackers (tensorboard / wandb), a progress
bar, periodic evaluation and sample grids.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fastdiff.training.checkpoints import MANIFEST, find_checkpoint, latest_good, load_data_state, save_checkpoint
from fastdiff.training.data import BatchSource, TensorSource
from fastdiff.training.ema import EMA, decay_from_half_life, ema_update_
from fastdiff.errors import InputError
from fastdiff.objectives.base import Objective

__all__ = ["OptimConfig", "TrainerConfig", "TrainingStopped", "train", "find_checkpoint", "resolve_precision"]


@dataclass
class OptimConfig:
    kind: Literal["adamw", "radam"] = "radam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up of the learning rate
    update_every: int = 1  # this phase steps every N iterations (two-time-scale updates)


@dataclass
class TrainerConfig:
    steps: int = 1000
    batch_size: int = 128  # global: over all processes and accumulation micro-batches
    grad_accum: int = 1
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    ema_half_life: float | None = None  # in steps; overrides ema_decay
    # None: what `accelerate launch` was told; "auto": bf16 where the device has bf16 kernels, else fp32 (resolve_precision)
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] | None = None
    compile: bool = False  # torch.compile the trained network
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate only at the end
    tracker: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    optim: OptimConfig = field(default_factory=OptimConfig)
    phase_optim: dict[str, OptimConfig] = field(default_factory=dict)  # per-phase overrides (e.g. critic)


class TrainingStopped(RuntimeError):
    """The run stopped on a non-finite loss (the message names the step, the term and the last good checkpoint) or on
    SIGTERM / SIGUSR1 (after writing a checkpoint of the step it was on; the message names it)."""


Evaluate = Callable[[torch.nn.Module, int], tuple[dict[str, float], Tensor | None]]


def train(objective: Objective, data: Tensor | BatchSource, labels: Tensor | None, cfg: TrainerConfig, output_dir: str | Path,
          fingerprint: dict, evaluate: Evaluate | None = None, resume: str | None = None, progress: bool = True,
          accelerator: Any = None) -> tuple[torch.nn.Module, dict]:  # fmt: skip
    """Run ``objective`` for ``cfg.steps`` steps on ``data``; returns the EMA network and a record.

    ``data``: a batch source (:mod:`fastdiff.training.data`), or images with their ``labels`` (a
    :class:`~fastdiff.training.data.TensorSource` of ``cfg.batch_size`` and ``cfg.seed``; ``labels`` is None for a
    source). Each process draws its own share of every step's batch (``source.batches(start, rank, world, state)``);
    a source whose position is not a function of the step (streaming) has its state saved in every checkpoint, one
    file per process, and restored on resume.

    ``fingerprint`` (the recipe) is stored in every checkpoint; resuming from another recipe's folder is refused.
    ``resume``: ``"latest"`` or a checkpoint folder.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(output_dir)
    ckpt_dir = out / "checkpoints"
    if resume is None and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise InputError(f"{out} already holds checkpoints; pass --resume latest to continue, or a new output_dir")
    if cfg.batch_size % cfg.grad_accum:
        raise InputError(f"trainer.batch_size={cfg.batch_size} must be divisible by trainer.grad_accum={cfg.grad_accum}")
    _check_phases(objective, cfg)
    accelerator = accelerator or Accelerator(mixed_precision=resolve_precision(cfg.mixed_precision), log_with=_tracker(cfg.tracker),
                                             project_dir=str(out),
                                             cpu=not torch.cuda.is_available(),  # cpu: torchrun on CPU runs gloo processes
                                             kwargs_handlers=_ddp_kwargs(objective))  # fmt: skip
    _check_precision(accelerator.mixed_precision, accelerator.device)
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % (world * cfg.grad_accum):
        raise InputError(f"trainer.batch_size={cfg.batch_size} must split evenly over {world} processes x {cfg.grad_accum} micro-batches")
    optims = {phase: _optimizer(objective, phase, cfg.phase_optim.get(phase, cfg.optim)) for phase in objective.phases}
    scheds = {p: torch.optim.lr_scheduler.LambdaLR(o, _warmup(cfg.phase_optim.get(p, cfg.optim).warmup_steps)) for p, o in optims.items()}
    if cfg.compile:
        objective.export().compile()
    prepared = accelerator.prepare(objective, *optims.values(), *scheds.values())
    model, optims = prepared[0], dict(zip(optims, prepared[1 : 1 + len(optims)]))
    scheds = dict(zip(scheds, prepared[1 + len(optims) :]))
    frozen = _frozen_per_phase(optims)
    ema = EMA(accelerator.unwrap_model(model).export(), decay_from_half_life(cfg.ema_half_life) if cfg.ema_half_life else cfg.ema_decay)
    start, elapsed = 0, 0.0  # elapsed: training seconds of the earlier pieces of a resumed run
    if resume is not None:
        found = find_checkpoint(ckpt_dir, fingerprint, resume, log=accelerator.print)
        if found is not None:
            from safetensors.torch import load_file

            accelerator.load_state(str(found))  # weights (safetensors), optimisers, schedulers, RNG: weights_only loads
            ema.model.load_state_dict(load_file(found / "ema.safetensors"))
            manifest = json.loads((found / MANIFEST).read_text())
            start, elapsed = manifest["step"], manifest.get("elapsed_s") or 0.0
            accelerator.print(f"resumed from {found} (step {start})")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    if accelerator.log_with:
        accelerator.init_trackers(out.name, config=_flat(fingerprint))
    source = _source(data, labels, cfg, accelerator.device)
    batches = source.batches(start, rank, world, load_data_state(found, rank) if start else None)  # this process's shares
    history: list[dict] = []
    last_ckpt = latest_good(ckpt_dir, fingerprint)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not progress or not accelerator.is_main_process)
    tick = began = time.perf_counter()
    ticked = start  # steps done at the last log (the last interval may be shorter than log_every)
    terms: dict[str, Tensor] = {}  # each phase's latest terms and logs, on the device: read only at log steps
    with _stop_signals() as signalled:  # SIGTERM / SIGUSR1: checkpoint after this step and stop
        for step in bar:
            shard = {k: v.to(accelerator.device, non_blocking=True) for k, v in next(batches).items()}
            for phase in objective.phases:
                if step % cfg.phase_optim.get(phase, cfg.optim).update_every:
                    continue
                terms.update(_phase_step(accelerator, model, optims[phase], scheds[phase], shard, phase, step, cfg, last_ckpt, frozen[phase]))
                _after_phase(accelerator.unwrap_model(model), phase)
            ema.update(accelerator.unwrap_model(model).export())
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                logs = _reduce_logs(accelerator, terms)
                now = time.perf_counter()
                logs["images_per_s"] = (step + 1 - ticked) * cfg.batch_size / max(now - tick, 1e-9)
                tick, ticked = now, step + 1
                accelerator.log(logs, step=step + 1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss")})
                history.append({"step": step + 1, **logs})
            stop = _stop_requested(accelerator, signalled) and step + 1 < cfg.steps
            if ((step + 1) % cfg.checkpoint_every == 0 or stop) and step + 1 < cfg.steps:
                last_ckpt = save_checkpoint(accelerator, ckpt_dir, step + 1, fingerprint, cfg.keep_checkpoints, ema,
                                            data_state=getattr(batches, "state_dict", lambda: None)(),
                                            elapsed_s=elapsed + time.perf_counter() - began)  # fmt: skip
            if stop:
                raise TrainingStopped(f"stopped by a signal after step {step + 1} of {cfg.steps}; checkpoint {last_ckpt} written: "
                                      "continue with --resume latest")  # fmt: skip
            if evaluate is not None and accelerator.is_main_process and (
                (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps
            ):
                _evaluate(evaluate, ema.model, step + 1, out, accelerator)
    bar.close()
    accelerator.wait_for_everyone()
    main, device, precision = accelerator.is_main_process, str(accelerator.device), accelerator.mixed_precision
    # The DDP wrapper (its reducer) must go before the process group it talks to: gloo aborted ("terminate called
    # without an active exception") at exit in ~15% of 2-process runs of a multi-phase objective otherwise.
    del model, optims, scheds, prepared
    accelerator.free_memory()
    accelerator.end_training()  # also ends the process group
    record = {"history": history, "start_step": start, "num_processes": world, "is_main_process": main, "device": device,
              "mixed_precision": precision,  # as resolved (auto: bf16 or no)
              "seconds_all_pieces": elapsed + time.perf_counter() - began}  # with a resumed run's earlier pieces (as checkpointed)
    return ema.model, record


@contextlib.contextmanager
def _stop_signals():
    """While training: SIGTERM and SIGUSR1 (a scheduler's notice before it ends a job, e.g. Slurm's ``--signal``)
    are recorded instead of ending the process, so the loop can checkpoint after the current step and stop; the
    previous handlers come back after. Outside the main thread (where handlers cannot be set) nothing is caught."""
    import signal
    import threading

    caught: list[int] = []
    kinds = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None]
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {s: signal.signal(s, lambda number, frame: caught.append(number)) for s in kinds}
    try:
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop_requested(accelerator, caught: list[int]) -> bool:
    """Whether any process was signalled (every process stops at the same step: one reduction per step when there
    are several)."""
    if accelerator.num_processes == 1:
        return bool(caught)
    return bool(accelerator.reduce(torch.tensor(float(bool(caught)), device=accelerator.device), reduction="sum") > 0)


def _phase_step(accelerator, model, opt, sched, shard, phase, step, cfg, last_ckpt, frozen: list[Tensor]) -> dict[str, Tensor]:
    """Accumulate gradients over the micro-batches of this process's shard (the other phases' parameters ``frozen``),
    check the loss terms are finite, then one optimiser step. Returns the terms and logs, this process's means over
    the micro-batches, as tensors on the device (no host synchronisation)."""
    micro = {k: v.chunk(cfg.grad_accum) for k, v in shard.items()}
    totals: dict[str, Tensor] = {}
    with _frozen(frozen):
        for m in range(cfg.grad_accum):
            part = {k: v[m] for k, v in micro.items()}
            sync = contextlib.nullcontext() if m == cfg.grad_accum - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                result = model(part, phase, step)
            accelerator.backward(result.total / cfg.grad_accum)
            for name, value in {**result.terms, **{k: torch.as_tensor(v, dtype=torch.float32) for k, v in result.logs.items()}}.items():
                totals[name] = totals.get(name, 0) + value.detach().float().to(accelerator.device) / cfg.grad_accum
    _guard(accelerator, {k: totals[k] for k in result.terms}, step, phase, last_ckpt)
    params = [p for g in opt.param_groups for p in g["params"]]
    if cfg.grad_clip:
        accelerator.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    loss_names = set(result.terms)
    return {(f"loss/{phase}/{k}" if k in loss_names else f"{phase}/{k}"): v for k, v in totals.items()}


def _guard(accelerator, terms: dict[str, Tensor], step: int, phase: str, last_ckpt: Path | None) -> None:
    """Stop on the first non-finite loss term (on any process), naming the step, phase, term and the last good
    checkpoint.

    One host synchronisation per optimiser step (the ``bool`` below), not one per micro-batch and term: the terms are
    checked once, as their means over the micro-batches, after the backward passes and before the optimiser step.
    The trade-off: with ``grad_accum > 1`` a run computes the remaining micro-batches of the step after the first
    non-finite one before it stops, and the value named is the micro-batch mean (nan or inf); no optimiser step ever
    uses a non-finite loss, so the last checkpoint and the weights in memory stay good.
    """
    bad = accelerator.reduce(torch.stack([~torch.isfinite(v) for v in terms.values()]).float(), reduction="sum")
    if not bool(bad.any()):  # the one synchronisation per step
        return
    name = list(terms)[int(bad.nonzero()[0])]
    value = terms[name].item()
    where = f"last good checkpoint: {last_ckpt} (resume with --resume latest, e.g. with a lower optim.lr)" if last_ckpt else "no checkpoint was written yet"
    raise TrainingStopped(f"step {step}: loss term '{name}' of phase '{phase}' is {value}; stopped. {where}")


def _reduce_logs(accelerator, terms: dict[str, Tensor]) -> dict[str, float]:
    """This step's terms and logs averaged over the processes, as floats: one reduction and one host
    synchronisation for all of them, at log steps only."""
    if not terms:
        return {}
    values = accelerator.reduce(torch.stack(list(terms.values())), reduction="mean").tolist()
    return dict(zip(terms, values))


def _after_phase(objective: Objective, phase: str) -> None:
    """The objective's declared hooks after ``phase``'s optimiser step: its EMA targets, then ``after_step``."""
    for t in objective.ema_targets(phase):
        ema_update_(t.target, t.source, t.decay)
    objective.after_step(phase)


def _check_phases(objective: Objective, cfg: TrainerConfig) -> None:
    phases = objective.phases
    if not phases or len(set(phases)) != len(phases):
        raise InputError(f"{type(objective).__name__}.phases must name one or more distinct phases; got {phases!r}")
    unknown = sorted(set(cfg.phase_optim) - set(phases))
    if unknown:
        raise InputError(f"trainer.phase_optim names {', '.join(map(repr, unknown))}, but {type(objective).__name__}'s phases are "
                         f"{', '.join(map(repr, phases))}")  # fmt: skip


def _ddp_kwargs(objective: Objective) -> list:
    """Several phases: each leaves the other phases' parameters without gradient, which DDP must be told."""
    from accelerate.utils import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(find_unused_parameters=True)] if len(objective.phases) > 1 else []


def _frozen_per_phase(optims: dict[str, torch.optim.Optimizer]) -> dict[str, list[Tensor]]:
    """For each phase, the parameters that other phases train and it does not (empty for one phase)."""
    own = {phase: {id(p) for g in o.param_groups for p in g["params"]} for phase, o in optims.items()}
    trained = {id(p): p for o in optims.values() for g in o.param_groups for p in g["params"]}
    return {phase: [p for i, p in trained.items() if i not in own[phase]] for phase in optims}


@contextlib.contextmanager
def _frozen(params: list[Tensor]):
    """``requires_grad`` off for ``params`` inside the block: a phase's gradient reaches only its own parameters."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _source(data: Tensor | BatchSource, labels: Tensor | None, cfg: TrainerConfig, device: torch.device) -> BatchSource:
    if isinstance(data, Tensor):
        if labels is None:
            raise InputError("train(): images given without labels; pass labels, or a batch source from fastdiff.training.data")
        return TensorSource(data, labels, cfg.batch_size, cfg.seed).to(device)
    if labels is not None:
        raise InputError("train(): labels are given with a batch source; the source carries its own labels")
    if not isinstance(data, BatchSource):
        raise InputError(f"train(): data must be images or a batch source (fastdiff.training.data); got {type(data).__name__}")
    if getattr(data, "batch_size", cfg.batch_size) != cfg.batch_size:
        raise InputError(f"the batch source makes batches of {data.batch_size}, trainer.batch_size is {cfg.batch_size}; make them equal")
    return data.to(device) if hasattr(data, "to") else data


def _optimizer(objective: Objective, phase: str, o: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in objective.parameters_for(phase) if p.requires_grad]
    if not params:
        raise InputError(f"phase {phase!r} of {type(objective).__name__} has no trainable parameters")
    cls = torch.optim.RAdam if o.kind == "radam" else torch.optim.AdamW
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def _warmup(steps: int) -> Callable[[int], float]:
    return lambda k: min(1.0, (k + 1) / steps) if steps > 0 else 1.0


def resolve_precision(mixed_precision: str | None) -> str | None:
    """``"auto"`` as this machine trains it: ``"bf16"`` on a GPU that supports it or a CPU with bf16 kernels
    (:func:`fastdiff.machine.cpu_bf16_kernels`), else ``"no"`` (fp32; not fp16, which DMD2 and the LCM scripts' SD runs
    diverge in); any other value unchanged. Resolved at each start: a run resumed on another machine may go on in the
    other precision (the run's record names the precision of its last piece)."""
    if mixed_precision != "auto":
        return mixed_precision
    from fastdiff.machine import cpu_bf16_kernels

    fast = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_bf16_kernels()
    return "bf16" if fast else "no"


def _check_precision(mixed_precision: str, device: torch.device) -> None:
    """Warn where bf16 autocast would be emulated: on a CPU without bf16 kernels it is an order of magnitude slower
    than fp32 (:func:`fastdiff.machine.cpu_bf16_kernels`)."""
    from fastdiff.machine import cpu_bf16_kernels

    if mixed_precision == "bf16" and device.type == "cpu" and not cpu_bf16_kernels():
        warnings.warn(f"trainer.mixed_precision=bf16 on a CPU without bf16 kernels ({torch.backends.cpu.get_cpu_capability()}; "
                      "they need AVX-512, AMX or ARM BF16): autocast emulates bf16 here, about 14x slower per step than fp32; "
                      "pass --set trainer.mixed_precision=no (or auto) unless bf16's numerics are what you want", stacklevel=3)  # fmt: skip


def _tracker(name: str) -> str | None:
    import importlib.util

    if name == "none":
        return None
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
    if importlib.util.find_spec(module) is None:
        warnings.warn(f"trainer.tracker={name} but `{module}` is not installed; logging to the progress bar and JSON only", stacklevel=3)
        return None
    return name


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _evaluate(evaluate: Evaluate, model: torch.nn.Module, step: int, out: Path, accelerator) -> None:
    from fastdiff.images import save_grid

    metrics, images = evaluate(model, step)
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    with (out / "eval.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    if images is not None:
        (out / "samples").mkdir(exist_ok=True)
        save_grid(images, out / "samples" / f"step_{step:08d}.png", nrow=int(math.sqrt(len(images))) or 1, scale=3)
