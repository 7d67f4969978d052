"""fastdiff/_compat.py against the installed torchmetrics and diffusers: every private API it wraps still exists and
still behaves as fastdiff relies on; a failure names the library, the symbol and the installed version. Also: the
plotting functions leave the caller's matplotlib backend alone (no backend selection in the library)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_flux
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

import fastdiff._compat as compat
from fastdiff._compat import (
    BlockIO,
    ContextReceiver,
    compute_fid,
    hook_registry,
    incompatible,
    remove_hook_registry,
    set_cache_context,
    transformer_block_io,
)

ROOT = Path(__file__).resolve().parent.parent


def _expect(ok: bool, library: str, symbol: str, problem: str) -> None:
    """Fail loudly, naming the library, the symbol and the installed version, unless ``ok``."""
    if not ok:
        pytest.fail(incompatible(library, symbol, problem), pytrace=False)


# -- torchmetrics: the Fréchet distance ---------------------------------------------------------------------------------


def _closed_form_fid(mu1, s1, mu2, s2) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1^(1/2) S2 S1^(1/2))^(1/2))`` with symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def test_compute_fid_is_the_frechet_distance_of_two_gaussians():
    """1-D: ``(m1 - m2)^2 + (s1 - s2)^2``; 2-D with covariances that do not commute: the closed form."""
    one_d = compute_fid(torch.tensor([0.5], dtype=torch.float64), torch.tensor([[4.0]], dtype=torch.float64),
                        torch.tensor([-1.0], dtype=torch.float64), torch.tensor([[0.25]], dtype=torch.float64))  # fmt: skip
    _expect(math.isclose(one_d, 1.5**2 + (2.0 - 0.5) ** 2, rel_tol=1e-9), "torchmetrics", "`torchmetrics.image.fid._compute_fid`",
            f"no longer gives the Fréchet distance of two 1-D Gaussians (got {one_d})")  # fmt: skip
    c, s = math.cos(0.7), math.sin(0.7)
    rot = np.array([[c, -s], [s, c]])
    mu1, mu2, s1, s2 = np.array([1.0, -2.0]), np.array([0.0, 0.5]), np.diag([2.0, 0.5]), rot @ np.diag([3.0, 0.2]) @ rot.T
    two_d = compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2)))
    expected = _closed_form_fid(mu1, s1, mu2, s2)
    _expect(math.isclose(two_d, expected, rel_tol=1e-7), "torchmetrics", "`torchmetrics.image.fid._compute_fid`",
            f"no longer gives the Fréchet distance of two 2-D Gaussians (got {two_d}, expected {expected})")  # fmt: skip
    _expect(isinstance(one_d, float), "torchmetrics", "`torchmetrics.image.fid._compute_fid`", "no longer returns a number")


# -- diffusers: transformer-block registry ------------------------------------------------------------------------------


def test_transformer_block_registry_knows_which_inputs_the_outputs_continue():
    """DiT / PixArt blocks return the hidden states; Flux's double blocks return (encoder, hidden) states."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    symbol = "`diffusers.hooks._helpers.TransformerBlockRegistry`"
    basic, flux = transformer_block_io(BasicTransformerBlock), transformer_block_io(FluxTransformerBlock)
    _expect(basic == BlockIO("hidden_states", 0, None), "diffusers", symbol, f"describes BasicTransformerBlock as {basic}")
    _expect(flux == BlockIO("hidden_states", 1, 0), "diffusers", symbol, f"describes FluxTransformerBlock as {flux}")
    _expect(transformer_block_io(nn.Linear) is None, "diffusers", symbol, "no longer refuses an unregistered class with ValueError")


# -- diffusers: hook registries ------------------------------------------------------------------------------------------


def test_hook_registry_lives_on_the_module_and_can_be_removed():
    symbol = f"module attribute `{compat._REGISTRY_ATTR}`"
    module = nn.Linear(2, 2)
    assert hook_registry(module) is None
    registry = HookRegistry.check_if_exists_or_initialize(module)
    _expect(hook_registry(module) is registry, "diffusers", symbol,
            "is no longer where HookRegistry.check_if_exists_or_initialize keeps the registry")  # fmt: skip
    registry.register_hook(ModelHook(), "probe")
    assert not remove_hook_registry(module) and hook_registry(module) is registry  # hooks left: the registry stays
    registry.remove_hook("probe", recurse=False)
    assert remove_hook_registry(module) and hook_registry(module) is None
    _expect(HookRegistry.check_if_exists_or_initialize(module) is not registry, "diffusers", symbol,
            "is not read back by HookRegistry.check_if_exists_or_initialize (deleting it does not reset the module)")  # fmt: skip


# -- diffusers: stateful hooks receive the pipeline's cache context --------------------------------------------------------


class _Stateful(ModelHook):
    _is_stateful = True

    def __init__(self):
        super().__init__()
        self.names: list[str | None] = []
        self.receiver = ContextReceiver(self.names.append)

    def reset_state(self, module):
        return module


def test_state_manager_receives_the_cache_context():
    """What a pipeline's ``with model.cache_context("cond")`` opens reaches a stateful hook's receiver (on the model
    and on a block), and :func:`set_cache_context` opens and closes one on a model without ``cache_context``."""
    symbol = "`diffusers.hooks.hooks.StateManager` (set by the cache-context setter)"
    model = tiny_flux()
    top, block = _Stateful(), _Stateful()
    HookRegistry.check_if_exists_or_initialize(model).register_hook(top, "top")
    HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0]).register_hook(block, "block")
    with model.cache_context("cond"):
        pass
    for hook, where in ((top, "the model"), (block, "a block")):
        _expect(hook.names == ["cond", None], "diffusers", symbol,
                f"no longer hands the pipeline's cache context to {where}'s stateful hook (it saw {hook.names})")  # fmt: skip
    plain, hook = nn.Sequential(nn.Linear(2, 2)), _Stateful()
    HookRegistry.check_if_exists_or_initialize(plain[0]).register_hook(hook, "hook")
    set_cache_context(plain, "uncond", timestep=500.0)
    set_cache_context(plain, None)
    _expect(hook.names == ["uncond", None], "diffusers", "`diffusers.hooks.hooks._set_cache_context`",
            f"no longer sets the cache context of stateful hooks under a module (they saw {hook.names})")  # fmt: skip


# -- a missing private symbol fails at import ------------------------------------------------------------------------------


def _import_compat_afresh():
    spec = importlib.util.spec_from_file_location("fastdiff_compat_probe", ROOT / "fastdiff" / "_compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["StateManager", "BaseState"])
def test_a_missing_private_symbol_is_an_import_error_naming_it_and_the_version(name, monkeypatch):
    import diffusers
    import diffusers.hooks.hooks

    monkeypatch.delattr(diffusers.hooks.hooks, name)
    with pytest.raises(ImportError, match=rf"`diffusers\.hooks\.hooks\.{name}`, a private API of diffusers.*diffusers {diffusers.__version__}"):
        _import_compat_afresh()


def test_missing_torchmetrics_symbol_and_a_moved_registry_are_import_errors(monkeypatch):
    import torchmetrics

    with pytest.raises(ImportError, match=rf"`torchmetrics\.image\.fid\._gone`.*torchmetrics {torchmetrics.__version__}"):
        compat.private("torchmetrics", "torchmetrics.image.fid", "_gone")
    monkeypatch.setattr(compat, "_REGISTRY_ATTR", "_moved_elsewhere")
    with pytest.raises(ImportError, match="module attribute `_moved_elsewhere`"):
        compat._check_registry_attribute()


# -- the caller's matplotlib backend -------------------------------------------------------------------------------------


def _plot_data() -> dict:
    quick = [{"sampler": "teacher: ddim", "nfe": 50, "fid": 3.0}, {"sampler": "ghvb", "nfe": 5, "fid": 9.0},
             {"sampler": "ghvb", "nfe": 10, "fid": 5.0}]  # fmt: skip
    samplers = {"guidance": [1.0], "reference": {"1.0": {"fid_test": 3.0}}, "rows": [
        {"guidance": 1.0, "sampler": "ghvb", "source": "fastdiff", "nfe": n, "fid_test": 9.0 / n, "fid_converged": 4.0 / n}
        for n in (5, 10)]}  # fmt: skip
    cache = {"steps": [20], "uncached": {"20": {"fid_test": 3.0}}, "rows": [
        {"steps": 20, "source": "fastdiff", "method": "FORA", "speedup": k, "fid_test": 3.0 + k} for k in (1.5, 2.0)]}  # fmt: skip
    return {"quickstart": quick, "samplers": samplers, "cache": cache}


def test_plots_leave_the_callers_matplotlib_backend_alone(tmp_path, monkeypatch):
    """The library draws on a ``matplotlib.figure.Figure``: it never calls ``matplotlib.use``, never imports pyplot
    (which would pick a backend; blocked here) and leaves the backend setting as it was."""
    import matplotlib

    from fastdiff.bench.cache import plot_cache
    from fastdiff.bench.samplers import plot_samplers
    from fastdiff.quickstart import plot_fid_vs_nfe

    def refuse(*args, **kwargs):
        raise AssertionError(f"the library selected a matplotlib backend: matplotlib.use{args}")

    monkeypatch.setattr(matplotlib, "use", refuse)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # `import matplotlib.pyplot` now raises ImportError
    before = matplotlib.rcParams._get("backend")
    data = _plot_data()
    plot_fid_vs_nfe(data["quickstart"], tmp_path / "q.png", "title")
    plot_samplers(data["samplers"], tmp_path / "s.png")
    plot_cache(data["cache"], tmp_path / "c.png")
    assert matplotlib.rcParams._get("backend") == before
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("q.png", "s.png", "c.png"))
