"""The trainer: one readable loop on ``accelerate`` that hosts any :class:`~fastdiff.objectives.base.Objective`.

Per step: the global batch of step ``k`` (fixed by the seed, whatever the number of processes), each phase that is
due (``update_every``: two-time-scale updates) computes its named loss terms over its share of the batch in
``grad_accum`` micro-batches, clips, steps its own optimiser, then the EMA follows. Around it: a NaN/inf guard,
atomic checkpoints (``accelerator.save_state`` into a temporary folder, a manifest with file hashes, then a rename)
with a retention limit and ``resume="latest"`` that skips corrupt ones, trackers (tensorboard / wandb), a progress
bar, periodic evaluation and sample grids.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fastdiff.training.checkpoints import MANIFEST, find_checkpoint, latest_good, save_checkpoint
from fastdiff.training.data import BatchSource, TensorSource
from fastdiff.training.ema import EMA, decay_from_half_life
from fastdiff.errors import InputError
from fastdiff.objectives.base import Objective

__all__ = ["OptimConfig", "TrainerConfig", "TrainingStopped", "train", "find_checkpoint"]


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
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None  # None: what `accelerate launch` was told
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
    """The run stopped on a non-finite loss; the message names the step, the term and the last good checkpoint."""


Evaluate = Callable[[torch.nn.Module, int], tuple[dict[str, float], Tensor | None]]


def train(objective: Objective, data: Tensor | BatchSource, labels: Tensor | None, cfg: TrainerConfig, output_dir: str | Path,
          fingerprint: dict, evaluate: Evaluate | None = None, resume: str | None = None, progress: bool = True,
          accelerator: Any = None) -> tuple[torch.nn.Module, dict]:  # fmt: skip
    """Run ``objective`` for ``cfg.steps`` steps on ``data``; returns the EMA network and a record.

    ``data``: a batch source (:mod:`fastdiff.training.data`), or images with their ``labels`` (a
    :class:`~fastdiff.training.data.TensorSource` of ``cfg.batch_size`` and ``cfg.seed``; ``labels`` is None for a
    source).

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
    accelerator = accelerator or Accelerator(mixed_precision=cfg.mixed_precision, log_with=_tracker(cfg.tracker), project_dir=str(out),
                                             cpu=not torch.cuda.is_available())  # cpu: torchrun on CPU runs gloo processes
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
    ema = EMA(accelerator.unwrap_model(model).export(), decay_from_half_life(cfg.ema_half_life) if cfg.ema_half_life else cfg.ema_decay)
    start = 0
    if resume is not None:
        found = find_checkpoint(ckpt_dir, fingerprint, resume, log=accelerator.print)
        if found is not None:
            from safetensors.torch import load_file

            accelerator.load_state(str(found))  # weights (safetensors), optimisers, schedulers, RNG: weights_only loads
            ema.model.load_state_dict(load_file(found / "ema.safetensors"))
            start = json.loads((found / MANIFEST).read_text())["step"]
            accelerator.print(f"resumed from {found} (step {start})")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    if accelerator.log_with:
        accelerator.init_trackers(out.name, config=_flat(fingerprint))
    source = _source(data, labels, cfg, accelerator.device)
    history: list[dict] = []
    last_ckpt = latest_good(ckpt_dir, fingerprint)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train", disable=not progress or not accelerator.is_main_process)
    tick = time.perf_counter()
    for step in bar:
        batch = source.batch(step)
        shard = {k: v.chunk(world)[rank] for k, v in batch.items()}
        logs: dict[str, float] = {}
        for phase in objective.phases:
            if step % cfg.phase_optim.get(phase, cfg.optim).update_every:
                continue
            logs.update(_phase_step(accelerator, model, optims[phase], scheds[phase], shard, phase, step, cfg, last_ckpt))
            hook = getattr(accelerator.unwrap_model(model), "after_step", None)
            if hook is not None:
                hook(phase)
        ema.update(accelerator.unwrap_model(model).export())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            now = time.perf_counter()
            logs["images_per_s"] = cfg.log_every * cfg.batch_size / max(now - tick, 1e-9)
            tick = now
            accelerator.log(logs, step=step + 1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss")})
            history.append({"step": step + 1, **logs})
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            last_ckpt = save_checkpoint(accelerator, ckpt_dir, step + 1, fingerprint, cfg.keep_checkpoints, ema)
        if evaluate is not None and accelerator.is_main_process and (
            (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps
        ):
            _evaluate(evaluate, ema.model, step + 1, out, accelerator)
    bar.close()
    accelerator.wait_for_everyone()
    main = accelerator.is_main_process
    accelerator.end_training()  # also ends the process group
    return ema.model, {"history": history, "start_step": start, "num_processes": world, "is_main_process": main}


def _phase_step(accelerator, model, opt, sched, shard, phase, step, cfg, last_ckpt) -> dict[str, float]:
    """Accumulate gradients over the micro-batches of this process's shard, then one optimiser step."""
    micro = {k: v.chunk(cfg.grad_accum) for k, v in shard.items()}
    totals: dict[str, Tensor] = {}
    for m in range(cfg.grad_accum):
        part = {k: v[m] for k, v in micro.items()}
        sync = contextlib.nullcontext() if m == cfg.grad_accum - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            result = model(part, phase, step)
        _guard(accelerator, result.terms, step, phase, last_ckpt)
        accelerator.backward(result.total / cfg.grad_accum)
        for name, value in {**result.terms, **{k: torch.as_tensor(v, dtype=torch.float32) for k, v in result.logs.items()}}.items():
            totals[name] = totals.get(name, 0) + value.detach().float().to(accelerator.device) / cfg.grad_accum
    params = [p for g in opt.param_groups for p in g["params"]]
    if cfg.grad_clip:
        accelerator.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    reduced = {k: accelerator.reduce(v, reduction="mean").item() for k, v in totals.items()}
    loss_names = set(result.terms)
    return {(f"loss/{phase}/{k}" if k in loss_names else f"{phase}/{k}"): v for k, v in reduced.items()}


def _guard(accelerator, terms: dict[str, Tensor], step: int, phase: str, last_ckpt: Path | None) -> None:
    """Stop on the first non-finite loss term (on any process), naming it and the last good checkpoint."""
    bad = torch.tensor([0.0 if torch.isfinite(v.detach()).all() else 1.0 for v in terms.values()], device=accelerator.device)
    bad = accelerator.reduce(bad, reduction="sum")
    if bad.sum() > 0:
        name = list(terms)[int(bad.nonzero()[0])]
        value = terms[name].detach().float().item()
        where = f"last good checkpoint: {last_ckpt} (resume with --resume latest, e.g. with a lower optim.lr)" if last_ckpt else "no checkpoint was written yet"
        raise TrainingStopped(f"step {step}: loss term '{name}' of phase '{phase}' is {value}; stopped. {where}")


def _source(data: Tensor | BatchSource, labels: Tensor | None, cfg: TrainerConfig, device: torch.device) -> BatchSource:
    if isinstance(data, Tensor):
        if labels is None:
            raise InputError("train(): images given without labels; pass labels, or a batch source from fastdiff.training.data")
        return TensorSource(data, labels, cfg.batch_size, cfg.seed).to(device)
    if labels is not None:
        raise InputError("train(): labels are given with a batch source; the source carries its own labels")
    return data.to(device) if hasattr(data, "to") else data


def _optimizer(objective: Objective, phase: str, o: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in objective.parameters_for(phase) if p.requires_grad]
    if not params:
        raise InputError(f"phase {phase!r} of {type(objective).__name__} has no trainable parameters")
    cls = torch.optim.RAdam if o.kind == "radam" else torch.optim.AdamW
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def _warmup(steps: int) -> Callable[[int], float]:
    return lambda k: min(1.0, (k + 1) / steps) if steps > 0 else 1.0


def _tracker(name: str) -> str | None:
    import importlib.util

    if name == "none":
        return None
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
    if importlib.util.find_spec(module) is None:
        print(f"fastdiff: trainer.tracker={name} but `{module}` is not installed; logging to the progress bar and JSON only")
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
