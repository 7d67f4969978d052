"""The one module that reaches private APIs of other libraries; the rest of fastdiff imports the wrappers below.

Each private symbol is looked up by :func:`private`, which raises an ``ImportError`` naming the library, the symbol
and the installed version when that version no longer has it -- at import for diffusers' symbols, at first use for
torchmetrics' (so that importing :mod:`fastdiff.cache` does not import torchmetrics). ``tests/test_compat.py`` checks
the behaviour each wrapper relies on against the installed versions.

* torchmetrics ``image.fid._compute_fid``: the Fréchet distance of two Gaussians -> :func:`compute_fid`.
* diffusers ``hooks._helpers.TransformerBlockRegistry``: which inputs a transformer block's outputs continue ->
  :func:`transformer_block_io`.
* diffusers' hook registry attribute on a module (set by ``HookRegistry.check_if_exists_or_initialize``) ->
  :func:`hook_registry`, :func:`remove_hook_registry`.
* diffusers ``hooks.hooks.StateManager`` / ``BaseState``: how a stateful hook receives a pipeline's cache context ->
  :class:`ContextReceiver`.
* diffusers ``hooks.hooks.CacheContext`` + the cache-context setter (``HookRegistry._set_context`` before diffusers
  0.42): open a cache context on a model -> :func:`set_cache_context`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from diffusers.hooks import HookRegistry
from torch import Tensor, nn

__all__ = ["private", "installed", "incompatible", "compute_fid", "transformer_block_io", "BlockIO", "hook_registry",
           "remove_hook_registry", "ContextReceiver", "set_cache_context"]  # fmt: skip

_REGISTRY_ATTR = "_diffusers_hook"  # where HookRegistry.check_if_exists_or_initialize keeps a module's registry


def installed(library: str) -> str:
    """The installed version of ``library`` (a distribution name), or ``"(not installed)"``."""
    try:
        return version(library)
    except PackageNotFoundError:
        return "(not installed)"


def incompatible(library: str, symbol: str, problem: str) -> str:
    """The message for a private API of ``library`` that the installed version changed: what, which version, the fix."""
    return (f"fastdiff relies on {symbol}, a private API of {library}, which {problem} in the installed {library} "
            f"{installed(library)}; install a {library} version fastdiff supports (see pyproject.toml) or update "
            f"fastdiff/_compat.py")  # fmt: skip


def private(library: str, module: str, name: str) -> Any:
    """``module.name`` from ``library``, or an ``ImportError`` naming the symbol and the installed version."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(incompatible(library, f"`{module}.{name}`", f"does not exist ({err})")) from err


def _optional(library: str, module: str, name: str) -> Any:
    """``module.name``, or None where the installed ``library`` does not have it."""
    try:
        return private(library, module, name)
    except ImportError:
        return None


_BaseState = private("diffusers", "diffusers.hooks.hooks", "BaseState")
_StateManager = private("diffusers", "diffusers.hooks.hooks", "StateManager")
_BlockRegistry = private("diffusers", "diffusers.hooks._helpers", "TransformerBlockRegistry")
_CacheContext = _optional("diffusers", "diffusers.hooks.hooks", "CacheContext")  # diffusers >= 0.42, with the setter below
_open_context = _optional("diffusers", "diffusers.hooks.hooks", "_set_cache_context")
if (_CacheContext is None or _open_context is None) and not hasattr(HookRegistry, "_set_context"):
    raise ImportError(incompatible("diffusers", "cache-context setter (`hooks.hooks._set_cache_context` + `CacheContext`, "
                                   "or `HookRegistry._set_context` before 0.42)", "does not exist"))  # fmt: skip


# -- torchmetrics -----------------------------------------------------------------------------------------------------


@functools.cache
def _fid_formula() -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    return private("torchmetrics", "torchmetrics.image.fid", "_compute_fid")


def compute_fid(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` of two Gaussians, by torchmetrics' formula
    (the one its ``FrechetInceptionDistance`` uses)."""
    return float(_fid_formula()(mu1, sigma1, mu2, sigma2))


# -- diffusers: transformer blocks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockIO:
    """Which inputs a transformer block's outputs continue: the name of its hidden-states argument and the output
    positions of the hidden states and (None if it returns none) of the encoder hidden states."""

    hidden_states_argument: str
    hidden_states_index: int
    encoder_hidden_states_index: int | None


def transformer_block_io(block_type: type) -> BlockIO | None:
    """What diffusers' transformer-block registry knows of ``block_type``; None for a class it does not list."""
    try:
        meta = _BlockRegistry.get(block_type)
    except ValueError:  # "Model class ... not registered."
        return None
    argument = getattr(meta, "hidden_states_argument_name", "hidden_states")  # older diffusers: no such field
    return BlockIO(argument, meta.return_hidden_states_index, meta.return_encoder_hidden_states_index)


# -- diffusers: hook registries -----------------------------------------------------------------------------------------


def hook_registry(module: nn.Module) -> HookRegistry | None:
    """The diffusers hook registry of ``module``, without creating one (None if it has none)."""
    return getattr(module, _REGISTRY_ATTR, None)


def remove_hook_registry(module: nn.Module) -> bool:
    """Delete ``module``'s hook registry if it holds no hooks (as before any hook was registered); True if deleted."""
    registry = hook_registry(module)
    if registry is None or registry.hooks:
        return False
    delattr(module, _REGISTRY_ATTR)
    return True


class ContextReceiver(_StateManager):
    """A stateful hook's receiver of the pipeline's cache context: diffusers hands every ``StateManager`` attribute of
    a stateful hook (``_is_stateful = True``) the context a pipeline opens and clears it after; this one passes the
    context's name (or None when cleared) to ``on_name``."""

    def __init__(self, on_name: Callable[[str | None], None]):
        super().__init__(_BaseState)
        self.on_name = on_name

    def set_context(self, context: Any) -> None:
        self.on_name(getattr(context, "name", context))  # a CacheContext, or its name in diffusers < 0.42


def set_cache_context(module: nn.Module, name: str | None, timestep: float | None = None) -> None:
    """Open the cache context ``name`` (with the step's ``timestep``; None closes it) on ``module`` and its submodules,
    as a pipeline's ``with model.cache_context(name)`` does, for pipelines and models that open none."""
    if _CacheContext is not None and _open_context is not None:
        _open_context(module, None if name is None else _CacheContext(name, timestep=timestep))
    else:
        HookRegistry.check_if_exists_or_initialize(module)._set_context(name)


def _check_registry_attribute() -> None:
    probe = nn.Module()
    registry = HookRegistry.check_if_exists_or_initialize(probe)
    if hook_registry(probe) is not registry:
        problem = "is no longer where HookRegistry.check_if_exists_or_initialize keeps the registry"
        raise ImportError(incompatible("diffusers", f"module attribute `{_REGISTRY_ATTR}`", problem))


_check_registry_attribute()
