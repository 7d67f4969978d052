"""A second time input for diffusers UNets: CTM's ``g_theta(x_t, t, s)`` without forking the model class.

CTM (Kim et al., ICLR 2024, sec. 3; official ``sony/ctm`` ``code/cm/unet.py``) gives its network the target time
``s`` through an extra embedding added to the time embedding. :class:`TwoTimeModel` does this around any diffusers
model that has the UNets' ``time_proj`` / ``time_embedding`` pair (``UNet2DModel``, ``UNet2DConditionModel``):

* the base model is held unchanged (``model.base``); a forward hook on its ``time_embedding`` -- registered by the
  wrapper and removable with :meth:`TwoTimeModel.remove_hook` -- adds ``s_embedding(time_proj(s))`` to the time
  embedding of each call;
* ``s_embedding`` has the shape of the base's ``TimestepEmbedding`` and its last layer starts at zero, so a fresh
  :meth:`TwoTimeModel.from_base` computes exactly what the base computes, for every ``s`` (CTM starts from the
  teacher: ``g(x, t, s) = D_teacher(x, t)``);
* ``forward(sample, timestep, s_timestep=None, ...)`` takes ``s`` in the base's timestep units; without it
  ``s = t``, the denoiser ``D(x, t) = g(x, t, t)``.

It is a diffusers ``ModelMixin``: ``save_pretrained`` / ``from_pretrained`` write and read one safetensors file (base
weights under ``base.``, the new embedding under ``s_embedding.``), and a pipeline folder lists it as
``["fastdiff.two_time", "TwoTimeModel"]``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin  # noqa: F401 (diffusers' pipeline loader looks them up in this module)
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from fastdiff.errors import InputError

__all__ = ["TwoTimeModel", "check_two_time_base", "build_base"]

_BASES = ("UNet2DModel", "UNet2DConditionModel")


def build_base(base_class: str, base_config: dict | None, allowed: tuple[str, ...] = _BASES) -> nn.Module:
    """The diffusers model ``base_class`` (one of ``allowed``) from its config: what a wrapper model holds as ``base``."""
    import diffusers

    if base_class not in allowed:
        raise InputError(f"base_class must be one of {', '.join(allowed)}; got {base_class!r}")
    return getattr(diffusers, base_class).from_config(dict(base_config or {}))


def base_config(net: nn.Module) -> dict:
    """``net``'s diffusers config as a wrapper model stores it: without ``_name_or_path``, the folder it was loaded from
    (a path of the machine that trained it, which a shipped student must not carry)."""
    return {k: v for k, v in dict(net.config).items() if k != "_name_or_path"}


def check_two_time_base(net: nn.Module) -> None:
    """``net`` must be a diffusers UNet with ``time_proj`` and ``time_embedding`` (where the ``s`` embedding goes)."""
    name = type(net).__name__
    if name not in _BASES or not hasattr(net, "time_embedding") or not hasattr(net, "time_proj"):
        raise InputError(f"CTM's second time input needs a diffusers {' or '.join(_BASES)} (a `time_embedding` to add "
                         f"the s embedding to); got {name}")  # fmt: skip


class TwoTimeModel(ModelMixin, ConfigMixin):
    """A diffusers UNet with a second timestep ``s`` (see the module docstring).

    Args:
        base_class: ``"UNet2DModel"`` or ``"UNet2DConditionModel"``.
        base_config: the base model's config (``dict(unet.config)``).
    """

    @register_to_config
    def __init__(self, base_class: str = "UNet2DModel", base_config: dict | None = None):
        super().__init__()
        self.base = build_base(base_class, base_config)
        check_two_time_base(self.base)
        linear_1, linear_2 = self.base.time_embedding.linear_1, self.base.time_embedding.linear_2
        self.s_embedding = nn.Sequential(nn.Linear(linear_1.in_features, linear_1.out_features), nn.SiLU(),
                                         nn.Linear(linear_2.in_features, linear_2.out_features))  # fmt: skip
        nn.init.zeros_(self.s_embedding[2].weight)
        nn.init.zeros_(self.s_embedding[2].bias)
        self._s: Tensor | None = None
        self._hook = self.base.time_embedding.register_forward_hook(self._add_s)

    @classmethod
    def from_base(cls, net: nn.Module) -> TwoTimeModel:
        """A two-time copy of ``net`` that computes exactly what ``net`` does until the ``s`` embedding is trained."""
        check_two_time_base(net)
        model = cls(type(net).__name__, base_config(net))
        model.base.load_state_dict(net.state_dict())
        model = model.to(net.device)
        return model if net.dtype == model.dtype else model.to(dtype=net.dtype)

    def _add_s(self, module: nn.Module, args: Any, emb: Tensor) -> Tensor:
        if self._s is None:
            return emb
        s_emb = self.s_embedding(self.base.time_proj(self._s).to(emb.dtype))
        return emb + s_emb

    def remove_hook(self) -> None:
        """Detach the ``s`` embedding: the base then runs as the plain model it is."""
        self._hook.remove()

    def forward(self, sample: Tensor, timestep: Tensor | float, s_timestep: Tensor | float | None = None, **kwargs: Any):
        t = torch.as_tensor(timestep, device=sample.device)
        s = t if s_timestep is None else torch.as_tensor(s_timestep, device=sample.device)
        self._s = (s if s.ndim else s[None]) * torch.ones(sample.shape[0], dtype=s.dtype, device=sample.device)
        try:
            return self.base(sample, timestep, **kwargs)
        finally:
            self._s = None
