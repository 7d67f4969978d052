r"""The denoiser contract and the adapters that put every model behind it.

A **denoiser** is any callable ``D(x, sigma, **cond) -> x0_hat`` where ``x`` is the *unscaled* noisy state
``x0 + sigma * eps`` of shape ``(B, ...)``, ``sigma`` a scalar or a ``(B,)`` tensor of noise levels and the result an
estimate of ``E[x0 | x]`` with ``x``'s shape (Karras et al. 2022, sec. 2; see :mod:`fastdiff.schedules`). Samplers,
objectives and evaluation only ever see this contract; conversions of timesteps, input scaling and prediction types
happen once, here.

Adapters:

* :class:`DiffusersDenoiser` -- a diffusers model (``UNet2DModel``, ``UNet2DConditionModel``,
  ``DiTTransformer2DModel``, PixArt, SD3 / Flux transformers, ...) plus its scheduler config;
* :class:`CFGDenoiser` -- classifier-free guidance with one batched call for the conditional and unconditional branch;
* :class:`PreconditionedDenoiser` with :func:`edm_precond` and :func:`consistency_precond` -- networks trained in
  sigma space, with EDM's or the consistency model's ``c_skip, c_out, c_in, c_noise``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fastdiff.errors import InputError
from fastdiff.param import Scalings, canonical_prediction_type, check_threshold, consistency_scalings, dynamic_threshold, edm_scalings, x0_from_output
from fastdiff.schedules import NoiseSchedule, batch_view, is_flow_config, schedule_from_config

__all__ = [
    "Denoiser",
    "DiffusersDenoiser",
    "CFGDenoiser",
    "ThresholdedDenoiser",
    "PreconditionedDenoiser",
    "edm_precond",
    "consistency_precond",
    "call_model",
    "as_sigma",
]


@runtime_checkable
class Denoiser(Protocol):
    """``D(x, sigma, **cond) -> x0_hat``; ``x``: ``(B, ...)`` unscaled noisy state, ``sigma``: scalar or ``(B,)``."""

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor: ...


def as_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """``sigma`` as a ``(B,)`` tensor on ``x``'s device and dtype; rejects wrong shapes, NaN, zero, negative and inf."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise InputError(f"sigma must be a scalar or of shape ({x.shape[0]},) to match x; got {tuple(sigma.shape)}")
    if not (torch.isfinite(sigma) & (sigma > 0)).all():
        raise InputError(
            f"sigma must be finite and > 0 for a model evaluation; got {sigma.min().item():.6g}..{sigma.max().item():.6g}"
            " (pure noise, sigma = inf, has no sigma-space input: start grids just below it)"
        )
    return sigma


def _model_signature(model: Callable) -> Mapping[str, inspect.Parameter]:
    forward = model.forward if isinstance(model, nn.Module) else model
    return inspect.signature(forward).parameters


def call_model(model: Callable, x: Tensor, timestep: Tensor, cond: Mapping[str, Any]) -> Tensor:
    """Call a diffusers model (``sample=`` or ``hidden_states=``) or a plain ``net(x, t, **cond)`` and return a tensor.

    Learned-variance outputs (DiT, IF: twice the input channels) are cut to their first half, the mean prediction.
    """
    params = _model_signature(model)
    if "sample" in params:
        out = model(sample=x, timestep=timestep, **cond, return_dict=False)
    elif "hidden_states" in params:
        out = model(hidden_states=x, timestep=timestep, **cond, return_dict=False)
    else:
        out = model(x, timestep, **cond)
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
    if out.ndim == 4 and x.ndim == 4 and out.shape[1] == 2 * x.shape[1]:
        out = out[:, : x.shape[1]]
    if out.shape != x.shape:
        raise InputError(f"model output has shape {tuple(out.shape)} but its input had {tuple(x.shape)}")
    return out


def _check_channels(model: nn.Module, x: Tensor) -> None:
    """For image models with a known ``config.in_channels``: ``x`` must be ``(B, C, H, W)`` with that ``C``."""
    expected = getattr(getattr(model, "config", None), "in_channels", None)
    if expected is None or "img_ids" in _model_signature(model):  # Flux takes packed (B, tokens, C) latents
        return
    if x.ndim != 4 or x.shape[1] != expected:
        raise InputError(f"{type(model).__name__} expects x of shape (B, {expected}, H, W); got {tuple(x.shape)}")


class DiffusersDenoiser(nn.Module):
    """Any diffusers model plus its noise schedule, behind the denoiser contract.

    ``D(x, sigma) = x0_from_output(model(s x, t(sigma)), ...)`` with ``s`` and ``t(sigma)`` from the schedule
    (:mod:`fastdiff.schedules`) and the prediction type converted by :func:`fastdiff.param.x0_from_output`.

    Args:
        model: a diffusers model (or any module with a diffusers-style ``forward``).
        schedule: the schedule it was trained with (:class:`~fastdiff.schedules.VPSchedule`,
            :class:`~fastdiff.schedules.FlowSchedule`, ...).
        prediction_type: ``epsilon``, ``v_prediction``, ``sample`` or ``flow`` (``flow_prediction``).
        timestep_scale: multiplies the schedule's timestep before the call. Default: 1, or
            ``1 / num_train_timesteps`` for Flux-style transformers (they take ``t in [0, 1]``).
    """

    def __init__(
        self, model: nn.Module, schedule: NoiseSchedule, prediction_type: str, timestep_scale: float | None = None
    ):
        super().__init__()
        self.model, self.schedule = model, schedule
        self.prediction_type = canonical_prediction_type(prediction_type)
        if timestep_scale is None:
            flux_style = "img_ids" in _model_signature(model)
            timestep_scale = 1 / schedule.num_train_timesteps if flux_style else 1.0
        self.timestep_scale = timestep_scale

    @classmethod
    def from_config(cls, model: nn.Module, scheduler_config: Mapping[str, Any], **kwargs: Any) -> DiffusersDenoiser:
        """Adapter for ``model`` trained with the scheduler whose config (or scheduler object) is given."""
        config = getattr(scheduler_config, "config", scheduler_config)
        default = "flow" if is_flow_config(config) else "epsilon"
        prediction_type = kwargs.pop("prediction_type", config.get("prediction_type") or default)
        return cls(model, schedule_from_config(config), prediction_type, **kwargs)

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> DiffusersDenoiser:
        """Adapter for a pipeline's ``unet`` or ``transformer`` with its scheduler's config."""
        model = getattr(pipe, "unet", None)
        model = getattr(pipe, "transformer", None) if model is None else model
        if model is None:
            raise InputError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer` component")
        return cls.from_config(model, pipe.scheduler.config, **kwargs)

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        _check_channels(self.model, x)
        sigma = as_sigma(sigma, x)
        alpha = batch_view(self.schedule.scale(sigma), x)
        beta = alpha * batch_view(sigma, x)
        x_t = alpha * x
        timestep = self.schedule.sigma_to_t(sigma) * self.timestep_scale
        dtype = next(self.model.parameters()).dtype
        out = call_model(self.model, x_t.to(dtype), timestep.to(dtype), cond).to(x.dtype)
        return x0_from_output(out, x_t, alpha, beta, self.prediction_type)


def _stack_cond(uncond: Any, cond: Any, key: str, batch: int) -> Any:
    """Concatenate unconditional and conditional inputs along the batch (tensors), recursing into dicts."""
    if isinstance(cond, Tensor):
        if not isinstance(uncond, Tensor):
            raise InputError(f"CFGDenoiser has no unconditional value for {key!r}; pass it in `uncond`")
        uncond = uncond.to(cond.device)
        if uncond.shape[0] == 1 and batch != 1:
            uncond = uncond.expand(batch, *uncond.shape[1:])
        if uncond.shape[1:] != cond.shape[1:] or uncond.shape[0] != cond.shape[0]:
            raise InputError(f"uncond[{key!r}] has shape {tuple(uncond.shape)}, cond has {tuple(cond.shape)}")
        return torch.cat([uncond, cond])
    if isinstance(cond, Mapping):
        uncond = uncond if isinstance(uncond, Mapping) else {}
        return {k: _stack_cond(uncond.get(k), v, f"{key}.{k}", batch) for k, v in cond.items()}
    return cond


class CFGDenoiser(nn.Module):
    """Classifier-free guidance ``D_u + w (D_c - D_u)`` (Ho & Salimans 2022, eq. 6) with one batched model call.

    Args:
        denoiser: the conditional denoiser.
        uncond: the unconditional inputs, keyed like the conditional ones (e.g. ``{"class_labels": tensor([10])}``
            for a null class, or negative prompt embeddings); a batch of 1 is broadcast.
        guidance_scale: ``w``; ``w = 1`` makes one conditional call only, ``w = 0`` is unconditional.
    """

    def __init__(self, denoiser: Denoiser, uncond: Mapping[str, Any], guidance_scale: float = 1.0):
        super().__init__()
        self.denoiser, self.uncond, self.guidance_scale = denoiser, dict(uncond), float(guidance_scale)

    def forward(self, x: Tensor, sigma: Tensor | float, guidance_scale: float | None = None, **cond: Any) -> Tensor:
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        if not math.isfinite(w):
            raise InputError(f"guidance_scale must be finite; got {w}")
        if w == 1.0:
            return self.denoiser(x, sigma, **cond)
        sigma = as_sigma(sigma, x)
        both = _stack_cond(self.uncond, cond, "cond", x.shape[0])
        d_uncond, d_cond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)
        return d_uncond + w * (d_cond - d_uncond)


class ThresholdedDenoiser(nn.Module):
    """A denoiser whose x0 estimates are dynamically thresholded (:func:`~fastdiff.param.dynamic_threshold`): the
    functional samplers' form of the schedulers' ``thresholding=True`` (wrap the guided denoiser, as they threshold
    the guided estimate)."""

    def __init__(self, denoiser: Denoiser, ratio: float = 0.995, max_value: float = 1.0):
        super().__init__()
        check_threshold(ratio, max_value)
        self.denoiser, self.ratio, self.max_value = denoiser, float(ratio), float(max_value)

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        return dynamic_threshold(self.denoiser(x, sigma, **cond), self.ratio, self.max_value)


class PreconditionedDenoiser(nn.Module):
    """``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` for a raw network ``F`` (Karras et al. 2022, eq. 7).

    Args:
        net: a diffusers model or ``net(x, c_noise, **cond)``, called through :func:`call_model`.
        scalings: ``sigma -> Scalings``; see :func:`edm_precond`, :func:`consistency_precond`.
    """

    def __init__(self, net: nn.Module, scalings: Callable[[Tensor], Scalings]):
        super().__init__()
        self.net, self.scalings = net, scalings

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        sigma = as_sigma(sigma, x)
        c = self.scalings(sigma)
        c_skip, c_out, c_in = (batch_view(v, x) for v in (c.c_skip, c.c_out, c.c_in))
        return c_skip * x + c_out * call_model(self.net, c_in * x, c.c_noise, cond)


def edm_precond(net: nn.Module, sigma_data: float = 0.5, noise_scale: float = 1.0) -> PreconditionedDenoiser:
    """EDM preconditioning of ``net`` (Karras et al. 2022, Table 1)."""
    return PreconditionedDenoiser(net, partial(edm_scalings, sigma_data=sigma_data, noise_scale=noise_scale))


def consistency_precond(
    net: nn.Module, sigma_min: float = 0.002, sigma_data: float = 0.5, noise_scale: float = 1.0
) -> PreconditionedDenoiser:
    """Consistency function ``f(x, sigma)`` with the boundary condition ``f(x, sigma_min) = x`` exact
    (Song et al. 2023, eq. 3 and appendix C)."""
    scalings = partial(consistency_scalings, sigma_min=sigma_min, sigma_data=sigma_data, noise_scale=noise_scale)
    return PreconditionedDenoiser(net, scalings)
