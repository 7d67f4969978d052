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

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import Tensor, nn

from fastdiff.cache.policies import CachePolicy, StepContext
from fastdiff.errors import InputError

__all__ = ["apply_cache", "remove_cache", "cache_stats", "cache_units", "UNIT_HOOK", "STEP_HOOK"]

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
    current: int | None = None
    counters: list = field(default_factory=list)  # forward hooks counting multiply-accumulates
    unit_names: list[str] = field(default_factory=list)

    def begin(self, timestep: float) -> None:
        if self.last_t is None or timestep > self.last_t + 1e-6:  # the noise level went up: a new generation
            self.generation += 1
            self.step, self.log = 0, {}
            self.policy.reset()
        else:
            self.step += 1
        self.last_t = timestep
        self.ctx = StepContext(self.step, timestep)


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
        self.state.begin(_timestep(args, kwargs))
        return args, kwargs

    def post_forward(self, module, output):
        self.state.counting = False  # multiply-accumulates are counted on the first call only
        return output


def _tensors(out: Any) -> list[Tensor]:
    return [out] if isinstance(out, Tensor) else [t for t in out if isinstance(t, Tensor)] if isinstance(out, tuple) else []


class _UnitHook(ModelHook):
    """Caches one unit; ``mode`` ``residual`` (output - input of every tensor output matching an input) or
    ``output`` (the whole output)."""

    def __init__(self, state: _State, unit: int, mode: str, names: tuple[str, ...] = ("hidden_states",),
                 out_index: dict[int, int] | None = None):  # fmt: skip
        super().__init__()
        self.state, self.unit, self.mode, self.names = state, unit, mode, names
        self.out_index = out_index or {0: 0}  # output position -> input position (hidden, encoder hidden states)
        self.cache: Any = None
        self.generation = -1

    def _inputs(self, args: tuple, kwargs: dict) -> list[Tensor | None]:
        values = [kwargs.get(n) for n in self.names]
        for i, v in enumerate(values):
            if v is None and i < len(args) and isinstance(args[i], Tensor):
                values[i] = args[i]
        return values

    def new_forward(self, module, *args, **kwargs):
        state, ctx = self.state, self.state.ctx
        inputs = self._inputs(args, kwargs)
        valid = self.cache is not None and self.generation == state.generation and self._fits(inputs)
        compute = self.unit == 0 or not valid or state.policy.should_compute(ctx, self.unit)
        state.log[(ctx.step, self.unit)] = compute
        if not compute:
            return self._reuse(inputs)
        state.current = self.unit
        out = self.fn_ref.original_forward(*args, **kwargs)
        state.current = None
        self.generation = state.generation
        self.cache = self._store(out, inputs)
        if self.unit == 0:
            first = _tensors(out)[0]
            state.policy.observe(ctx, first - inputs[0] if self.mode == "residual" and inputs[0] is not None else first)
        return out

    def _fits(self, inputs: list[Tensor | None]) -> bool:
        if self.mode == "output":
            return self._shape_key == tuple(None if x is None else x.shape for x in inputs)
        return all(x is None or r is None or x.shape == r.shape for x, r in zip(inputs, self.cache[1]))

    def _store(self, out: Any, inputs: list[Tensor | None]) -> Any:
        if self.mode == "output":
            self._shape_key = tuple(None if x is None else x.shape for x in inputs)
            return out
        outs = list(out) if isinstance(out, tuple) else [out]
        residuals = [None] * len(inputs)
        for j, i in self._out_index(outs).items():
            residuals[i] = outs[j] - inputs[i] if inputs[i] is not None else outs[j]
        return (type(out) is tuple, residuals, len(outs))

    def _reuse(self, inputs: list[Tensor | None]) -> Any:
        if self.mode == "output":
            return self.cache
        is_tuple, residuals, n = self.cache
        outs: list[Any] = [None] * n
        for j, i in self._out_index([None] * n).items():
            outs[j] = inputs[i] + residuals[i] if inputs[i] is not None else residuals[i]
        return tuple(outs) if is_tuple else outs[0]

    def _out_index(self, outs: list) -> dict[int, int]:
        return self.out_index if len(outs) > 1 else {0: 0}


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
    """``(name, module, mode)`` of the units ``apply_cache`` hooks, in call order; unit 0 is always computed."""
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
        if not state.counting or not isinstance(output, Tensor):
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


def apply_cache(model: nn.Module, policy: CachePolicy, branch: int = 0) -> nn.Module:
    """Hook ``model`` (a diffusers transformer or UNet) with ``policy``; returns the model. ``branch``: the DeepCache
    skip branch of a UNet (0 = keep only the outermost down/up pair fresh on reused steps)."""
    if not isinstance(policy, CachePolicy):
        raise InputError(f"policy must be a fastdiff.cache policy (EveryN, ResidualThreshold, ...); got {type(policy).__name__}")
    if getattr(model, "_fastdiff_cache", None) is not None:
        raise InputError(f"{type(model).__name__} already has a fastdiff cache; call remove_cache(model) first")
    state = _State(policy)
    units = cache_units(model, branch)
    policy.bind([n for n, _, _ in units])
    for i, (_, module, mode) in enumerate(units):
        names, index = _block_metadata(module) if mode == "residual" else (("hidden_states",), {0: 0})
        hook = _UnitHook(state, i, mode, names, index)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, UNIT_HOOK)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(_StepHook(state), STEP_HOOK)
    state.counters = [m.register_forward_hook(_count_macs(state))
                      for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]  # fmt: skip
    state.unit_names = [n for n, _, _ in units]
    model._fastdiff_cache = state
    return model


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
