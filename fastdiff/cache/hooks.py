"""Feature caching as removable diffusers hooks (``ModelHook`` / ``HookRegistry``), driven by a pure policy.

``apply_cache(model, policy)`` hooks the model's *units*: every transformer block of DiT / PixArt
(``BasicTransformerBlock``), SD3 and Flux models, or, for ``UNet2DModel`` / ``UNet2DConditionModel``, the deep path
DeepCache skips (down blocks after ``branch``, the mid block, the matching up blocks). A unit that is reused returns
``input + cached residual`` (transformer blocks: the block's deviation, Delta-DiT style, so the current input still
flows) or its cached output (UNet deep path: the cached deep feature enters the fresh shallow branch). A hook on the
model itself counts its calls -- one per denoising step, with or without a classifier-free guidance batch -- and
starts a new generation when the timestep goes up, so nothing leaks between pipeline calls and no
``cache_context`` is needed. ``remove_cache`` restores the model exactly; ``cache_stats`` reports reuse rates per
unit and step and the estimated share of multiply-accumulates saved.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import Tensor, nn

from fastdiff.cache.policies import CachePolicy, StepContext
from fastdiff.errors import InputError

__all__ = ["apply_cache", "remove_cache", "cache_stats", "cache_units", "cache_bypassed", "cached_model", "model_id", "UNIT_HOOK", "STEP_HOOK"]

UNIT_HOOK, STEP_HOOK = "fastdiff_cache_unit", "fastdiff_cache_step"
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")


@dataclass
class _State:
    policy: CachePolicy
    generation: int = -1
    step: int = -1
    last_t: float | None = None
    ctx: StepContext | None = None
    log: dict[tuple[int, int], bool] = field(default_factory=dict)  # (step, unit) -> computed, last generation
    macs: dict[int, float] = field(default_factory=dict)  # unit -> multiply-accumulates of one computed call
    total_macs: float = 0.0
    counting: bool = True
    bypass: bool = False  # compute everything, touch no cache, count no step (a reference run: cache_bypassed)
    current: int | None = None
    counters: list = field(default_factory=list)  # forward hooks counting multiply-accumulates
    unit_names: list[str] = field(default_factory=list)
    sigma_of: Any = None  # model timestep -> sigma, from the scheduler given to apply_cache

    def begin(self, timestep: float) -> None:
        if self.last_t is None or timestep > self.last_t + 1e-6:  # the noise level went up: a new generation
            self.generation += 1
            self.step, self.log = 0, {}
            self.policy.reset()
        else:
            self.step += 1
        self.last_t = timestep
        self.ctx = StepContext(self.step, timestep, None if self.sigma_of is None else self.sigma_of(timestep))


def _timestep(args: tuple, kwargs: dict) -> float:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        raise InputError("the cached model was called without a timestep; fastdiff's cache needs one per call")
    return float(torch.as_tensor(t).flatten()[0])


class _StepHook(ModelHook):
    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        if not self.state.bypass:
            self.state.begin(_timestep(args, kwargs))
            self.state.policy.begin_step(self.state.ctx)
        return args, kwargs

    def post_forward(self, module, output):
        if self.state.counting and not self.state.bypass:  # multiply-accumulates: the first cached call only
            self.state.counting = False
            for handle in self.state.counters:
                handle.remove()
        return output


def _tensors(out: Any) -> list[Tensor]:
    return [out] if isinstance(out, Tensor) else [t for t in out if isinstance(t, Tensor)] if isinstance(out, tuple) else []


def _tmap(fn, *trees: Any) -> Any:
    """``fn`` over the tensors of equally structured (nested tuple / list) values; other leaves come from the first."""
    first = trees[0]
    if isinstance(first, Tensor):
        return fn(*trees)
    if isinstance(first, (tuple, list)):
        return type(first)(_tmap(fn, *parts) for parts in zip(*trees))
    return first


class _UnitHook(ModelHook):
    """Caches one unit. ``mode`` ``residual`` caches output - input for every output that continues an input (a
    transformer block's deviation) and reuses ``input + residual``; ``output`` caches and reuses the whole output
    (a UNet's deep path). With ``forecast`` k > 0 the reused value is the order-k Taylor extrapolation in the step
    index from the last k + 1 computed steps (finite differences, TaylorSeer) instead of the last value."""

    def __init__(self, state: _State, unit: int, mode: str, names: tuple[str, ...] = ("hidden_states",),
                 out_index: dict[int, int] | None = None, forecast: int = 0, always: bool = False):  # fmt: skip
        super().__init__()
        self.state, self.unit, self.mode, self.names, self.forecast = state, unit, mode, names, forecast
        self.always = always  # computed at every step: the probe of an adaptive policy, a UNet's shallow branch
        self.out_index = out_index or {0: 0}  # output position -> input position (hidden, encoder hidden states)
        self.derivs: list[Any] = []  # value and its finite differences in the step index, at `self.at`
        self.at, self.layout, self.generation = -1, None, -1

    def _inputs(self, args: tuple, kwargs: dict) -> list[Tensor | None]:
        values = [kwargs.get(n) for n in self.names]
        for i, v in enumerate(values):
            if v is None and i < len(args) and isinstance(args[i], Tensor):
                values[i] = args[i]
        return values

    def new_forward(self, module, *args, **kwargs):
        state, ctx = self.state, self.state.ctx
        if state.bypass:
            return self.fn_ref.original_forward(*args, **kwargs)
        inputs = self._inputs(args, kwargs)
        valid = bool(self.derivs) and self.generation == state.generation and self.layout == self._layout(inputs)
        gate = state.policy.gate(ctx, self.unit) if valid and not self.always else None
        compute = self.always or not valid or state.policy.should_compute(ctx, self.unit)
        state.log[(ctx.step, self.unit)] = compute
        if not compute and gate is None:
            return self._reuse(inputs, ctx.step)
        state.current = self.unit
        out = self.fn_ref.original_forward(*args, **kwargs)
        state.current = None
        if gate is not None:  # training a router: a differentiable mix of the fresh and the reused output
            mixed = _tmap(lambda f, r: gate * f + (1 - gate) * r, out, self._reuse(inputs, ctx.step))
        if compute:
            self._store(out, inputs, ctx.step)
        if self.unit == 0 and state.policy.needs_probe:
            state.policy.observe(ctx, self._probe(out, inputs))
        return mixed if gate is not None else out

    def _probe(self, out: Any, inputs: list[Tensor | None]) -> Tensor:
        """What adaptive policies watch: the residual of the main (image) stream, or the first output tensor."""
        if self.mode == "output" or inputs[0] is None:
            return _tensors(out)[0]
        outs = list(out) if isinstance(out, tuple) else [out]
        main = next(j for j, i in self._out_index(len(outs)).items() if i == 0)
        return outs[main] - inputs[0]

    def _layout(self, inputs: list[Tensor | None]) -> tuple:
        return tuple(None if x is None else x.shape for x in inputs)

    def _value(self, out: Any, inputs: list[Tensor | None]) -> Any:
        """What is cached: the output, or per input slot the residual of the output that continues it."""
        if self.mode == "output":
            return _tmap(Tensor.detach, out)
        outs = list(out) if isinstance(out, tuple) else [out]
        self.shape_out = (type(out) is tuple, len(outs))
        residuals = [None] * len(inputs)
        for j, i in self._out_index(len(outs)).items():  # an output may be None (SD3's last block drops the text stream)
            o, x = outs[j], inputs[i]
            residuals[i] = None if o is None else (o - x if x is not None else o).detach()
        return residuals

    def _store(self, out: Any, inputs: list[Tensor | None], step: int) -> None:
        value = self._value(out, inputs)
        fresh = self.generation != self.state.generation or self.layout != self._layout(inputs)
        derivs = [value]
        if self.forecast and not fresh:
            gap = step - self.at
            for old in self.derivs[: self.forecast]:
                derivs.append(_tmap(lambda new, prev: (new - prev) / gap, derivs[-1], old))
        self.derivs, self.at, self.generation, self.layout = derivs, step, self.state.generation, self._layout(inputs)

    def _predict(self, step: int) -> Any:
        d, value = step - self.at, self.derivs[0]
        for k, deriv in enumerate(self.derivs[1:], start=1):
            value = _tmap(lambda v, g, c=d**k / math.factorial(k): v + c * g, value, deriv)
        return value

    def _reuse(self, inputs: list[Tensor | None], step: int) -> Any:
        value = self._predict(step)
        if self.mode == "output":
            return value
        is_tuple, n = self.shape_out
        outs: list[Any] = [None] * n
        for j, i in self._out_index(n).items():
            v, x = value[i], inputs[i]
            outs[j] = v if v is None or x is None else x + v
        return tuple(outs) if is_tuple else outs[0]

    def _out_index(self, n: int) -> dict[int, int]:
        return self.out_index if n > 1 else {0: 0}


def _block_metadata(block: nn.Module) -> tuple[tuple[str, ...], dict[int, int]]:
    """Which inputs a transformer block's outputs continue (diffusers' block registry where it knows the class)."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        meta = TransformerBlockRegistry.get(type(block))
    except (ImportError, ValueError):
        return ("hidden_states",), {0: 0}
    names = (meta.hidden_states_argument_name, "encoder_hidden_states")
    index = {meta.return_hidden_states_index: 0}
    if meta.return_encoder_hidden_states_index is not None:
        index[meta.return_encoder_hidden_states_index] = 1
    return names, index


def cache_units(model: nn.Module, branch: int = 0) -> list[tuple[str, nn.Module, str]]:
    """``(name, module, mode)`` of the units ``apply_cache`` hooks, in call order. Unit 0 is always computed for
    adaptive policies (it is their probe) and in UNets (the shallow branch DeepCache keeps fresh)."""
    lists = [(n, getattr(model, n)) for n in _BLOCK_LISTS if isinstance(getattr(model, n, None), nn.ModuleList)]
    if lists:
        return [(f"{n}.{i}", b, "residual") for n, blocks in lists for i, b in enumerate(blocks)]
    down, up = getattr(model, "down_blocks", None), getattr(model, "up_blocks", None)
    if isinstance(down, nn.ModuleList) and isinstance(up, nn.ModuleList) and getattr(model, "mid_block", None) is not None:
        if not 0 <= branch < len(down) - 1:
            raise InputError(f"DeepCache branch must be in [0, {len(down) - 2}] for a UNet with {len(down)} down blocks; got {branch}")
        units = [("down_blocks.0", down[0], "output")]
        units += [(f"down_blocks.{i}", down[i], "output") for i in range(branch + 1, len(down))]
        units.append(("mid_block", model.mid_block, "output"))
        units += [(f"up_blocks.{i}", up[i], "output") for i in range(len(up) - branch - 1)]
        return units
    raise InputError(f"{type(model).__name__} has no recognisable block structure: expected transformer blocks "
                     f"({', '.join(_BLOCK_LISTS)}) or a UNet's down_blocks / mid_block / up_blocks")  # fmt: skip


def _count_macs(state: _State):
    def hook(module, inputs, output):
        if not state.counting or state.bypass or not isinstance(output, Tensor):
            return
        if isinstance(module, nn.Linear):
            macs = output.numel() * module.in_features
        else:
            macs = output.numel() * module.in_channels // module.groups * module.weight[0, 0].numel()
        state.total_macs += macs
        owner = state.current
        if owner is not None:
            state.macs[owner] = state.macs.get(owner, 0.0) + macs

    return hook


def apply_cache(model: nn.Module, policy: CachePolicy, branch: int = 0, forecast: int = 0, scheduler: Any = None) -> nn.Module:
    """Hook ``model`` (a diffusers transformer or UNet) with ``policy``; returns the model. ``branch``: the DeepCache
    skip branch of a UNet (0 = keep only the outermost down/up pair fresh on reused steps). ``forecast``: 0 reuses
    the cached value as it is (FORA, DeepCache, TeaCache); k = 1 or 2 extrapolates it from the last k + 1 computed
    steps with a Taylor series in the step index (TaylorSeer, Liu et al. 2025, eq. 8). ``scheduler``: the
    pipeline's scheduler, so that policies also see each step's sigma (``StepContext.sigma``)."""
    if forecast not in (0, 1, 2):
        raise InputError(f"forecast is the Taylor order of the reused features: 0, 1 or 2; got {forecast!r}")
    if not isinstance(policy, CachePolicy):
        raise InputError(f"policy must be a fastdiff.cache policy (EveryN, ResidualThreshold, ...); got {type(policy).__name__}")
    if getattr(model, "_fastdiff_cache", None) is not None:
        raise InputError(f"{type(model).__name__} already has a fastdiff cache; call remove_cache(model) first")
    state = _State(policy, sigma_of=None if scheduler is None else _sigma_of(scheduler))
    units = cache_units(model, branch)
    policy.bind([n for n, _, _ in units], model_id(model))
    for i, (_, module, mode) in enumerate(units):
        names, index = _block_metadata(module) if mode == "residual" else (("hidden_states",), {0: 0})
        always = i == 0 and (policy.needs_probe or mode == "output")  # a UNet's outermost down block is the skip branch
        hook = _UnitHook(state, i, mode, names, index, forecast, always)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, UNIT_HOOK)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(_StepHook(state), STEP_HOOK)
    state.counters = [m.register_forward_hook(_count_macs(state))
                      for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]  # fmt: skip
    state.unit_names = [n for n, _, _ in units]
    model._fastdiff_cache = state
    return model


def _sigma_of(scheduler: Any):
    """Model timestep -> sigma for a diffusers scheduler (VP discrete or flow matching; Flux passes t / 1000)."""
    from fastdiff.schedules import FlowSchedule, schedule_from_config

    schedule = schedule_from_config(scheduler.config)
    flow = isinstance(schedule, FlowSchedule)

    def sigma_of(t: float) -> float:
        t = t * schedule.num_train_timesteps if flow and t <= 1.0 else t
        return float(schedule.t_to_sigma(torch.tensor(t, dtype=torch.float64)))

    return sigma_of


def cached_model(pipe) -> nn.Module:
    """The denoiser of a diffusers pipeline that caching applies to (its ``transformer`` or ``unet``)."""
    for name in ("transformer", "unet"):
        if isinstance(getattr(pipe, name, None), nn.Module):
            return getattr(pipe, name)
    raise InputError(f"{type(pipe).__name__} has no transformer or unet to cache")


def model_id(model: nn.Module) -> str:
    """Class and a digest of the config: what a learned cache plan is tied to."""
    config = getattr(model, "config", None)
    items = json.dumps({k: v for k, v in dict(config or {}).items() if not k.startswith("_")}, sort_keys=True, default=str)
    return f"{type(model).__name__}:{hashlib.sha256(items.encode()).hexdigest()[:12]}"


@contextmanager
def cache_bypassed(model: nn.Module):
    """Inside, the cached model computes everything and leaves its cache and step count untouched (a reference
    output at the current step, as router training needs)."""
    state = _cache_state(model)
    state.bypass = True
    try:
        yield model
    finally:
        state.bypass = False


def _cache_state(model: nn.Module) -> _State:
    state = getattr(model, "_fastdiff_cache", None)
    if state is None:
        raise InputError(f"{type(model).__name__} has no fastdiff cache; call apply_cache(model, policy) first")
    return state


def remove_cache(model: nn.Module) -> nn.Module:
    """Remove every hook ``apply_cache`` added; the model computes exactly as before."""
    state = getattr(model, "_fastdiff_cache", None)
    if state is None:
        return model
    for handle in state.counters:
        handle.remove()
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in (UNIT_HOOK, STEP_HOOK):
            registry.remove_hook(name, recurse=False)
        bound = module.__dict__.get("forward")
        if getattr(bound, "__func__", None) is type(module).forward:
            del module.forward  # back to the class's forward, as before the hooks
        if not registry.hooks:
            del module._diffusers_hook
    model._fastdiff_cache = None
    return model


def cache_stats(model: nn.Module) -> dict:
    """Reuse in the last generation: overall, per unit and per step, and the estimated share of the model's
    multiply-accumulates (Linear and Conv2d layers) saved."""
    state = getattr(model, "_fastdiff_cache", None)
    if state is None or not state.log:
        raise InputError("no cached generation to report; apply_cache(model, policy) and run the pipeline first")
    steps = 1 + max(s for s, _ in state.log)
    units = len(state.unit_names)
    reused = {k for k, computed in state.log.items() if not computed}
    saved = sum(state.macs.get(u, 0.0) for _, u in reused)
    return {
        "steps": steps, "units": state.unit_names, "reuse_rate": len(reused) / len(state.log),
        "reuse_rate_per_unit": [sum((s, u) in reused for s in range(steps)) / steps for u in range(units)],
        "reuse_rate_per_step": [sum((s, u) in reused for u in range(units)) / units for s in range(steps)],
        "macs_saved": saved / (state.total_macs * steps) if state.total_macs else 0.0,
    }  # fmt: skip
