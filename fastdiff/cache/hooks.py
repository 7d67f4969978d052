"""Feature caching as removable diffusers hooks (``ModelHook`` / ``HookRegistry``), driven by a pure policy.

``apply_cache(model, policy)`` hooks the model's *units*: every transformer block of DiT / PixArt
(``BasicTransformerBlock``), SD3 and Flux models -- or, with ``granularity="attn-mlp"``, the attention and the
feed-forward of each adaLN-gated block (DiT, PixArt) -- or, for ``UNet2DModel`` / ``UNet2DConditionModel``, the deep
path DeepCache skips (down blocks after ``branch``, the mid block, the matching up blocks). A unit that is reused
returns ``input + cached residual`` (transformer blocks: the block's deviation, Delta-DiT style, so the current input
still flows) or its cached output (an attention / feed-forward output, which the block then scales with the current
step's gate; a UNet's deep feature, which enters the fresh shallow branch).

A hook on the model itself counts its calls and starts a new generation when the timestep goes up, so nothing leaks
between pipeline calls. When a pipeline calls the model more than once per denoising step (Flux with
``true_cfg_scale``: a conditional and an unconditional call), each call keeps its own step count and cache: the calls
are told apart by the diffusers ``cache_context`` the pipeline opens ("cond", "uncond"), or, where it opens none, a
call at the same timestep with the same input as the step's first call is the step's next call. A call at a repeated
timestep with another input is a new step (PLMS, Heun). A classifier-free guidance batch is one call.
``remove_cache`` restores the model exactly; ``cache_stats`` reports reuse rates per unit and step and the estimated
share of multiply-accumulates saved.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import Tensor, nn

from fastdiff._compat import ContextReceiver, hook_registry, remove_hook_registry, transformer_block_io
from fastdiff.cache.policies import CachePolicy, StepContext
from fastdiff.errors import InputError

__all__ = ["apply_cache", "remove_cache", "cache_stats", "cache_units", "cache_bypassed", "cached_model", "model_id", "UNIT_HOOK", "STEP_HOOK",
           "GRANULARITIES"]  # fmt: skip

UNIT_HOOK, STEP_HOOK = "fastdiff_cache_unit", "fastdiff_cache_step"
_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")
GRANULARITIES = ("block", "attn-mlp")
_GATED_NORMS = ("ada_norm_zero", "ada_norm_single")  # BasicTransformerBlock's adaLN-Zero (DiT) and adaLN-single (PixArt)


@dataclass
class _State:
    policy: CachePolicy
    generation: int = -1
    last_t: float | None = None  # the timestep of the last call
    restart: bool = False  # diffusers reset the hooks (the end of a pipeline call): the next call starts a generation
    context: str | None = None  # the name of the cache_context the pipeline has open, if any
    steps: dict[str, int] = field(default_factory=dict)  # call name -> its step in this generation
    step_input: Tensor | None = None  # without a cache_context: the input of the current step's first call
    step_calls: int = 0  # ... and the calls of that step after it
    ctx: StepContext | None = None
    log: dict[tuple[str, int, int], bool] = field(default_factory=dict)  # (call, step, unit) -> computed, last generation
    macs: dict[int, float] = field(default_factory=dict)  # unit -> multiply-accumulates of one computed call
    total_macs: float = 0.0
    counting: bool = True
    bypass: bool = False  # compute everything, touch no cache, count no step (a reference run: cache_bypassed)
    current: int | None = None
    counters: list = field(default_factory=list)  # forward hooks counting multiply-accumulates
    unit_names: list[str] = field(default_factory=list)
    sigma_of: Any = None  # model timestep -> sigma, from the scheduler given to apply_cache

    def begin(self, timestep: float, x: Tensor | None) -> None:
        if self.restart or self.last_t is None or timestep > self.last_t + 1e-6:  # the noise level went up: a new generation
            self.generation += 1
            self.steps, self.log, self.step_input, self.restart = {}, {}, None, False
            self.policy.reset()
        call = self.context if self.context is not None else self._call(timestep, x)
        self.steps[call] = self.steps.get(call, -1) + 1
        self.last_t = timestep
        self.ctx = StepContext(self.steps[call], timestep, None if self.sigma_of is None else self.sigma_of(timestep), call)

    def _call(self, timestep: float, x: Tensor | None) -> str:
        """Without a cache context: "0" for a step's first call; "1", "2", ... for the calls after it at the same
        timestep with the same input (a separate unconditional pass). Another input at the same timestep is a new
        step (PLMS, Heun evaluate the model twice at some timesteps)."""
        same = (self.step_input is not None and x is not None and abs(timestep - self.last_t) <= 1e-6
                and torch.equal(x, self.step_input))  # fmt: skip
        if same:
            self.step_calls += 1
        else:
            self.step_input, self.step_calls = None if x is None else x.detach().clone(), 0
        return str(self.step_calls)


def _timestep(args: tuple, kwargs: dict) -> float:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        raise InputError("the cached model was called without a timestep; fastdiff's cache needs one per call")
    return float(torch.as_tensor(t).flatten()[0])


def _sample(args: tuple, kwargs: dict) -> Tensor | None:
    x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
    return x if isinstance(x, Tensor) else None


class _StepHook(ModelHook):
    _is_stateful = True  # diffusers then hands it the pipeline's cache_context and resets it after each pipeline call

    def __init__(self, state: _State):
        super().__init__()
        self.state = state
        self.context = ContextReceiver(partial(setattr, state, "context"))  # the name of the pipeline's cache_context

    def pre_forward(self, module, *args, **kwargs):
        if not self.state.bypass:
            self.state.begin(_timestep(args, kwargs), _sample(args, kwargs))
            self.state.policy.begin_step(self.state.ctx)
        return args, kwargs

    def reset_state(self, module):
        self.state.restart = True
        return module

    def post_forward(self, module, output):
        if self.state.counting and not self.state.bypass:  # multiply-accumulates: the first cached call only
            self.state.counting = False
            for handle in self.state.counters:
                handle.remove()
        return output


def main_output(out: Any) -> Tensor:
    """A model's main output: the tensor itself, or the first entry of its tuple or diffusers output."""
    return out if isinstance(out, Tensor) else out[0]


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


@dataclass
class _Memory:
    """What a unit cached for one call name: its value and the value's finite differences in the step index, at
    step ``at`` of generation ``generation``, for inputs of shapes ``layout``."""

    derivs: list[Any]
    at: int
    generation: int
    layout: tuple


class _UnitHook(ModelHook):
    """Caches one unit, separately for each call of a step (``StepContext.call``). ``mode`` ``residual`` caches
    output - input for every output that continues an input (a transformer block's deviation) and reuses ``input +
    residual``; ``output`` caches and reuses the whole output (an attention or feed-forward before its gate, a UNet's
    deep path). With ``forecast`` k > 0 the reused value is the order-k Taylor extrapolation in the step index from
    the last k + 1 computed steps (finite differences, TaylorSeer) instead of the last value."""

    def __init__(self, state: _State, unit: int, mode: str, names: tuple[str, ...] = ("hidden_states",),
                 out_index: dict[int, int] | None = None, forecast: int = 0, always: bool = False):  # fmt: skip
        super().__init__()
        self.state, self.unit, self.mode, self.names, self.forecast = state, unit, mode, names, forecast
        self.always = always  # computed at every step: the probe of an adaptive policy, a UNet's shallow branch
        self.out_index = out_index or {0: 0}  # output position -> input position (hidden, encoder hidden states)
        self.memory: dict[str, _Memory] = {}  # call name -> what was cached for it

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
        memory = self._valid_memory(inputs)
        gate = state.policy.gate(ctx, self.unit) if memory is not None and not self.always else None
        compute = self.always or memory is None or state.policy.should_compute(ctx, self.unit)
        state.log[(ctx.call, ctx.step, self.unit)] = compute
        if not compute and gate is None:
            return self._reuse(memory, inputs, ctx.step)
        state.current = self.unit
        out = self.fn_ref.original_forward(*args, **kwargs)
        state.current = None
        if gate is not None:  # training a router: a differentiable mix of the fresh and the reused output
            mixed = _tmap(lambda f, r: gate * f + (1 - gate) * r, out, self._reuse(memory, inputs, ctx.step))
        if compute:
            self._store(memory, out, inputs, ctx)
        if self.unit == 0 and state.policy.needs_probe:
            state.policy.observe(ctx, self._probe(out, inputs))
        return mixed if gate is not None else out

    def _valid_memory(self, inputs: list[Tensor | None]) -> _Memory | None:
        """This call's cache, if it is from this generation and for inputs of these shapes."""
        memory = self.memory.get(self.state.ctx.call)
        if memory is None or memory.generation != self.state.generation or memory.layout != self._layout(inputs):
            return None
        return memory

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

    def _store(self, memory: _Memory | None, out: Any, inputs: list[Tensor | None], ctx: StepContext) -> None:
        derivs = [self._value(out, inputs)]
        if self.forecast and memory is not None:
            gap = ctx.step - memory.at
            for old in memory.derivs[: self.forecast]:
                derivs.append(_tmap(lambda new, prev: (new - prev) / gap, derivs[-1], old))
        self.memory[ctx.call] = _Memory(derivs, ctx.step, self.state.generation, self._layout(inputs))

    def _predict(self, memory: _Memory, step: int) -> Any:
        d, value = step - memory.at, memory.derivs[0]
        for k, deriv in enumerate(memory.derivs[1:], start=1):
            value = _tmap(lambda v, g, c=d**k / math.factorial(k): v + c * g, value, deriv)
        return value

    def _reuse(self, memory: _Memory, inputs: list[Tensor | None], step: int) -> Any:
        value = self._predict(memory, step)
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
    io = transformer_block_io(type(block))
    if io is None:
        return ("hidden_states",), {0: 0}
    index = {io.hidden_states_index: 0}
    if io.encoder_hidden_states_index is not None:
        index[io.encoder_hidden_states_index] = 1
    return (io.hidden_states_argument, "encoder_hidden_states"), index


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    return [(n, getattr(model, n)) for n in _BLOCK_LISTS if isinstance(getattr(model, n, None), nn.ModuleList)]


def _block_units(name: str, block: nn.Module, granularity: str) -> list[tuple[str, nn.Module, str]]:
    """A transformer block as one unit, or, at ``attn-mlp`` granularity and in a block gated by adaLN, its
    self-attention and its feed-forward: HarmoniCa (Huang et al. 2025, sec. 3) and Learning-to-Cache route each
    separately and reuse their outputs before the gates ``alpha_1, alpha_2`` of adaLN-Zero (DiT, Peebles & Xie 2023,
    sec. 3.2), which the block recomputes at the current step. PixArt's cross-attention (``attn2``, ungated) is always
    computed."""
    if granularity == "attn-mlp" and getattr(block, "norm_type", None) in _GATED_NORMS:
        return [(f"{name}.attn1", block.attn1, "output"), (f"{name}.ff", block.ff, "output")]
    return [(name, block, "residual")]


def cache_units(model: nn.Module, branch: int = 0, granularity: str = "block") -> list[tuple[str, nn.Module, str]]:
    """``(name, module, mode)`` of the units ``apply_cache`` hooks, in call order. Unit 0 is always computed for
    adaptive policies (it is their probe) and in UNets (the shallow branch DeepCache keeps fresh). ``granularity``:
    ``block`` (each transformer block) or ``attn-mlp`` (the attention and the feed-forward of each adaLN-gated block
    -- DiT, PixArt -- separately; other blocks stay whole; a UNet is unaffected)."""
    if granularity not in GRANULARITIES:
        raise InputError(f"cache granularity must be one of {', '.join(GRANULARITIES)}; got {granularity!r}")
    lists = _block_lists(model)
    if lists:
        return [unit for n, blocks in lists for i, b in enumerate(blocks) for unit in _block_units(f"{n}.{i}", b, granularity)]
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


def apply_cache(model: nn.Module, policy: CachePolicy, branch: int = 0, forecast: int = 0, scheduler: Any = None,
                granularity: str = "block") -> nn.Module:  # fmt: skip
    """Hook ``model`` (a diffusers transformer or UNet) with ``policy``; returns the model. ``branch``: the DeepCache
    skip branch of a UNet (0 = keep only the outermost down/up pair fresh on reused steps). ``forecast``: 0 reuses
    the cached value as it is (FORA, DeepCache, TeaCache); k = 1 or 2 extrapolates it from the last k + 1 computed
    steps with a Taylor series in the step index (TaylorSeer, Liu et al. 2025, eq. 8). ``scheduler``: the
    pipeline's scheduler, so that policies also see each step's sigma (``StepContext.sigma``). ``granularity``:
    the units, see :func:`cache_units`."""
    if forecast not in (0, 1, 2):
        raise InputError(f"forecast is the Taylor order of the reused features: 0, 1 or 2; got {forecast!r}")
    if not isinstance(policy, CachePolicy):
        raise InputError(f"policy must be a fastdiff.cache policy (EveryN, ResidualThreshold, ...); got {type(policy).__name__}")
    if getattr(model, "_fastdiff_cache", None) is not None:
        raise InputError(f"{type(model).__name__} already has a fastdiff cache; call remove_cache(model) first")
    state = _State(policy, sigma_of=None if scheduler is None else _sigma_of(scheduler))
    units = cache_units(model, branch, granularity)
    policy.bind([n for n, _, _ in units], model_id(model))
    unet = not _block_lists(model)
    for i, (_, module, mode) in enumerate(units):
        names, index = _block_metadata(module) if mode == "residual" else (("hidden_states",), {0: 0})
        always = i == 0 and (policy.needs_probe or unet)  # a UNet's outermost down block is the skip branch
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
        registry = hook_registry(module)
        if registry is None:
            continue
        for name in (UNIT_HOOK, STEP_HOOK):
            registry.remove_hook(name, recurse=False)
        bound = module.__dict__.get("forward")
        if getattr(bound, "__func__", None) is type(module).forward:
            del module.forward  # back to the class's forward, as before the hooks
        remove_hook_registry(module)  # if no other hooks are left on it
    model._fastdiff_cache = None
    return model


def cache_stats(model: nn.Module) -> dict:
    """Reuse in the last generation: overall, per unit and per step (over all calls of a step: ``calls`` names
    them), and the estimated share of the model's multiply-accumulates (Linear and Conv2d layers) saved."""
    state = getattr(model, "_fastdiff_cache", None)
    if state is None or not state.log:
        raise InputError("no cached generation to report; apply_cache(model, policy) and run the pipeline first")
    log = state.log
    steps = 1 + max(s for _, s, _ in log)
    reused = [k for k, computed in log.items() if not computed]
    saved = sum(state.macs.get(u, 0.0) for _, _, u in reused)
    model_calls = len({(c, s) for c, s, _ in log})

    def rate(where: int, value: int) -> float:
        entries = [computed for k, computed in log.items() if k[where] == value]
        return sum(not c for c in entries) / len(entries) if entries else 0.0

    return {
        "steps": steps, "calls": sorted({c for c, _, _ in log}), "units": state.unit_names, "reuse_rate": len(reused) / len(log),
        "reuse_rate_per_unit": [rate(2, u) for u in range(len(state.unit_names))],
        "reuse_rate_per_step": [rate(1, s) for s in range(steps)],
        "macs_saved": saved / (state.total_macs * model_calls) if state.total_macs else 0.0,
    }  # fmt: skip
