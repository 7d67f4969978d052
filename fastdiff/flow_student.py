"""A VP teacher's network as a flow-matching model: the start of a reflow (2-rectified-flow) student.

2-RF++ (Lee, Lin & Fanti, NeurIPS 2024; official ``sangyun884/rfpp``, ``EDMPrecondVel``) initialises the rectified flow
from the diffusion model through the change of variables between the two time conventions (reference notes 1.1):
flow time ``t`` and the VP noise level ``sigma`` are ``sigma = t / (1 - t)``, and the flow state ``z_t = (1 - t) x0 +
t eps`` is the sigma-space state ``x = z_t / (1 - t)``. :class:`VPFlowModel` wraps a diffusers VP UNet so that it *is*
a flow-matching model in diffusers' convention:

* ``forward(sample=z_t, timestep=1000 t)`` returns the velocity ``v = (z_t - x0_hat) / t`` with ``x0_hat`` the VP
  network's clean-sample estimate at ``sigma`` (:class:`~fastdiff.denoisers.DiffusersDenoiser` on the base with the
  teacher's schedule), so ``FlowMatchEulerDiscreteScheduler`` (``prediction_type`` flow) samples it and, untrained, it
  follows the teacher's probability-flow ODE exactly;
* ``t`` is clipped to the VP schedule's range (``sigma <= sigma_max``, e.g. ``t <= 0.9937`` for DDPM's linear betas):
  pure noise at ``t = 1`` is read as the teacher's noisiest level, as diffusers' pipelines start VP models there.

A diffusers ``ModelMixin``: ``save_pretrained`` / ``from_pretrained`` (one safetensors file, weights under ``base.``);
pipeline folders list it as ``["fastdiff.flow_student", "VPFlowModel"]``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin  # noqa: F401 (diffusers' pipeline loader looks them up in this module)
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import Tensor, nn

from fastdiff.denoisers import DiffusersDenoiser
from fastdiff.schedules import VPSchedule, batch_view
from fastdiff.two_time import base_config, build_base

__all__ = ["VPFlowModel"]


class VPFlowModel(ModelMixin, ConfigMixin):
    """A VP network (``base_class`` / ``base_config``) trained with the DDPM-style scheduler config ``vp_config``,
    exposed as a flow-matching velocity model (see the module docstring)."""

    @register_to_config
    def __init__(self, base_class: str = "UNet2DModel", base_config: dict | None = None, vp_config: dict | None = None):
        super().__init__()
        self.base = build_base(base_class, base_config, ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel"))
        self.vp = VPSchedule.from_config(dict(vp_config or {}))
        self.prediction_type = (vp_config or {}).get("prediction_type", "epsilon")

    @classmethod
    def from_base(cls, net: nn.Module, vp_config: dict) -> VPFlowModel:
        """A flow-matching copy of the VP network ``net`` that computes the teacher's velocity until it is trained."""
        keep = {k: v for k, v in dict(vp_config).items() if not k.startswith("_")}
        model = cls(type(net).__name__, base_config(net), keep)
        model.base.load_state_dict(net.state_dict())
        model = model.to(net.device)
        return model if net.dtype == model.dtype else model.to(dtype=net.dtype)

    def flow_time_range(self) -> tuple[float, float]:
        """The flow times the VP network covers: ``sigma_min / (1 + sigma_min)`` to ``sigma_max / (1 + sigma_max)``."""
        lo, hi = self.vp.sigma_min, self.vp.sigma_max
        return lo / (1 + lo), hi / (1 + hi)

    def forward(self, sample: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None, return_dict: bool = True,
                **kwargs: Any):  # fmt: skip
        t = torch.as_tensor(timestep, device=sample.device, dtype=torch.float64) / 1000
        t = (t if t.ndim else t[None]).expand(sample.shape[0])
        lo, hi = self.flow_time_range()
        t = t.clamp(lo, hi)
        sigma = t / (1 - t)
        cond = {**kwargs, **({} if class_labels is None else {"class_labels": class_labels})}
        x = sample.double() / batch_view(1 - t, sample)  # sigma-space state
        x0 = DiffusersDenoiser(self.base, self.vp, self.prediction_type)(x.to(sample.dtype), sigma.to(sample.dtype), **cond)
        v = ((sample.double() - x0.double()) / batch_view(t, sample)).to(sample.dtype)
        return UNet2DOutput(sample=v) if return_dict else (v,)
