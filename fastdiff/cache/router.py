"""A learned cache plan: the HarmoniCa router (Huang et al., ICML 2025, sec. 4), trained data-free.

The router holds one logit per (model call, unit); its score ``sigmoid(logit)`` says how much of a unit's fresh
output a step needs. A row per entry of the scheduler's ``timesteps``: one per denoising step, more for samplers
that evaluate the model twice at some steps (Heun, PLMS, F-PNDM). Units are, as in HarmoniCa, the attention and the
feed-forward of every adaLN-gated block (DiT, PixArt), reused before their gates (``granularity="attn-mlp"``), or
whole blocks (other models, or ``granularity="block"``). During training each unit returns ``s * fresh + (1 - s) *
reused`` (and refreshes its cache where ``s > threshold``); at inference the plan is ``s > threshold`` (the
straight-through threshold, 0.1 in the paper) and runs as a :class:`~fastdiff.cache.policies.StaticMask`. Step 0
always computes.

* **SDT (step-wise denoising training, sec. 4.1)**: the pipeline samples as it normally does, with the router's
  mixed outputs, so every step sees the error the cache accumulated on the steps before it; at each model call the
  cached output is compared with a full computation at the same input -- both as the sampler uses them, i.e.
  after classifier-free guidance combined the batch (HarmoniCa's ``forward_with_cfg``) -- and the router takes one
  optimiser step.
* **IEPO (image-error proxy-guided objective, sec. 4.2)**: the error at step t is weighted by ``lambda_t``, the
  change of the final image when caching is switched on at step t on top of the earlier steps (eq. 9); the proxy
  is recomputed every ``lambda_every`` rollouts. Loss per step: ``lambda_t * rel. MSE + beta * mean score`` --
  ``beta`` trades speed (fewer computed units) against quality.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import Tensor, nn

from fastdiff.cache.hooks import GRANULARITIES, apply_cache, cache_bypassed, cache_units, cached_model, main_output, model_id, remove_cache
from fastdiff.cache.policies import CachePolicy, StaticMask, StepContext
from fastdiff.errors import InputError

__all__ = ["RouterConfig", "Router", "RouterGate", "iepo_loss", "image_error_proxy", "train_router", "load_router", "apply_router",
           "class_conditional_call", "guided"]  # fmt: skip

SDT_HOOK = "fastdiff_router_sdt"


@dataclass
class RouterConfig:
    steps: int = 20  # sampler steps the plan is made for
    iterations: int = 40  # SDT rollouts of the pipeline (one optimiser step per denoising step each)
    batch_size: int = 16
    lr: float = 0.2  # Adam, one per step (each step's logits are updated once per rollout)
    beta: float = 3e-3  # weight of the mean router score: larger = more reuse, faster, lower quality
    threshold: float = 0.1  # score above which a unit computes (and refreshes its cache)
    lambda_every: int = 10  # rollouts between recomputations of the image-error proxy
    lambda_batch: int = 8
    guidance_scale: float = 1.0
    forecast: int = 0  # Taylor order of the reused features (see apply_cache)
    init: float = 0.0  # initial logit (score 0.5: everything computed and refreshed at first)
    init_every: int = 0  # > 0: start from the static every-N plan instead (logits +-3), which training then refines
    granularity: str = "attn-mlp"  # units: attention and feed-forward of adaLN-gated blocks (HarmoniCa), or "block"
    seed: int = 0

    def __post_init__(self):
        for key in ("steps", "iterations", "batch_size", "lambda_every", "lambda_batch"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise InputError(f"router config: {key} must be an integer >= 1; got {getattr(self, key)!r}")
        if self.steps < 2:
            raise InputError(f"router config: steps must be >= 2 (step 0 always computes); got {self.steps}")
        if not 0 < self.threshold < 1:
            raise InputError(f"router config: threshold is a score in (0, 1); got {self.threshold}")
        if not isinstance(self.init_every, int) or self.init_every < 0:
            raise InputError(f"router config: init_every must be an integer >= 0 (0: uniform start); got {self.init_every!r}")
        if self.beta < 0 or self.lr <= 0:
            raise InputError(f"router config: beta must be >= 0 and lr > 0; got beta={self.beta}, lr={self.lr}")
        if self.granularity not in GRANULARITIES:
            raise InputError(f"router config: granularity must be one of {', '.join(GRANULARITIES)}; got {self.granularity!r}")


class Router(nn.Module):
    """One logit per (model call, unit), tied to a model (``model``: :func:`model_id`, ``units``) and to the
    sampler's ``timesteps`` (one row each)."""

    def __init__(self, units: list[str], timesteps: list[float], model: str, init: float = 0.0, meta: dict | None = None):
        super().__init__()
        self.units, self.timesteps, self.model, self.meta = list(units), [float(t) for t in timesteps], model, dict(meta or {})
        self.rows = nn.ParameterList(nn.Parameter(torch.full((len(units),), float(init))) for _ in timesteps)

    def scores(self) -> Tensor:
        """``(calls, units)`` scores in [0, 1]; call 0 (nothing cached yet) fixed at 1."""
        s = torch.sigmoid(torch.stack(list(self.rows)))
        return torch.cat([torch.ones_like(s[:1]), s[1:]])

    def plan(self, threshold: float | None = None) -> StaticMask:
        """The inference plan: compute where the score exceeds ``threshold`` (default: the training threshold)."""
        thr = self.meta.get("threshold", 0.1) if threshold is None else threshold
        return StaticMask(self.scores().detach() > thr, model=self.model, timesteps=self.timesteps)

    def save(self, path: str | Path) -> Path:
        """safetensors: the logits, with the model, units, timesteps and training settings as metadata (atomic)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "fastdiff-cache-router", "model": self.model, "units": json.dumps(self.units),
                "timesteps": json.dumps(self.timesteps), "meta": json.dumps(self.meta)}  # fmt: skip
        tmp = path.with_name(path.name + ".tmp")
        save_file({"logits": torch.stack(list(self.rows)).detach().contiguous()}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path


def load_router(path: str | Path) -> Router:
    """Load a router saved by :meth:`Router.save` (safetensors only; nothing is unpickled)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no router file at {path}; train one with `fastdiff cache train-router`")
    try:
        with safe_open(str(path), "pt") as f:
            meta, logits = f.metadata() or {}, f.get_tensor("logits")
    except Exception as err:  # not a safetensors file, or no logits in it
        raise InputError(f"{path} is not a fastdiff router (safetensors with a 'logits' tensor): {err}") from None
    if meta.get("format") != "fastdiff-cache-router":
        raise InputError(f"{path} is a safetensors file but not a fastdiff cache router (metadata 'format' is {meta.get('format')!r})")
    router = Router(json.loads(meta["units"]), json.loads(meta["timesteps"]), meta["model"], meta=json.loads(meta["meta"]))
    with torch.no_grad():
        for row, values in zip(router.rows, logits):
            row.copy_(values)
    return router


def apply_router(model: nn.Module, router: Router | str | Path, threshold: float | None = None) -> nn.Module:
    """Cache ``model`` with a trained router's plan (and the units and feature forecast it was trained with)."""
    router = load_router(router) if isinstance(router, (str, Path)) else router
    return apply_cache(model, router.plan(threshold), forecast=int(router.meta.get("forecast", 0)), granularity=_granularity(router))


def _granularity(router: Router) -> str:
    return router.meta.get("granularity", "block")  # routers saved before attn-mlp units existed are per block


@dataclass
class RouterGate(CachePolicy):
    """The router as a training policy: units mix fresh and reused outputs with the router's scores on steps before
    ``until`` (all steps by default) and compute fully from ``until`` on."""

    router: Router
    threshold: float = 0.1
    until: int | None = None
    _scores: Tensor | None = None  # this step's scores, computed once per model call (with autograd where enabled)

    def bind(self, units: list[str], model: str) -> None:
        if units != self.router.units:
            raise InputError(f"the router's units ({len(self.router.units)}: {self.router.units[0]} ...) are not the model's "
                             f"({len(units)}: {units[0]} ...)")  # fmt: skip

    def begin_step(self, ctx: StepContext) -> None:
        self._scores = self.router.scores()[ctx.step] if self._routed(ctx.step) else None

    def _routed(self, step: int) -> bool:
        return 0 < step < len(self.router.rows) and (self.until is None or step < self.until)

    def gate(self, ctx: StepContext, unit: int) -> Tensor | None:
        return None if self._scores is None else self._scores[unit]

    def should_compute(self, ctx: StepContext, unit: int) -> bool:
        return self._scores is None or bool(self._scores[unit] > self.threshold)


def iepo_loss(pred: Tensor, target: Tensor, scores: Tensor, lam: float | Tensor, beta: float) -> dict[str, Tensor]:
    """HarmoniCa's per-step objective (eq. 10): the proxy-weighted error of the cached output against the full
    one (relative MSE, so ``beta`` does not depend on the output's scale) and the mean score of the routed units."""
    error = (pred - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
    return {"error": lam * error, "l1": beta * scores.mean()}


def _detached(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(o.detach() if isinstance(o, Tensor) else o for o in out)
    out["sample"] = out["sample"].detach()  # diffusers' model outputs
    return out


class _SDTHook(ModelHook):
    """On every model call of a rollout: the full output (cache untouched), the router-mixed output, both as the
    sampler uses them (``combine``: classifier-free guidance of a batched call), the IEPO loss and one optimiser step
    of that call's logits; the pipeline continues with the mixed output."""

    def __init__(self, router: Router, cfg: RouterConfig, lam: Tensor, combine: Callable[[Tensor], Tensor], log: Callable[[dict], None]):
        super().__init__()
        self.router, self.cfg, self.lam, self.combine, self.log = router, cfg, lam, combine, log
        self.optims = [torch.optim.Adam([row], lr=cfg.lr) for row in router.rows]

    def new_forward(self, module, *args, **kwargs):
        with torch.no_grad(), cache_bypassed(module):
            target = self.combine(main_output(self.fn_ref.original_forward(*args, **kwargs)))
        with torch.enable_grad():
            out = self.fn_ref.original_forward(*args, **kwargs)
            step = module._fastdiff_cache.ctx.step
            if 0 < step < len(self.router.rows):
                pred = self.combine(main_output(out))
                terms = iepo_loss(pred.float(), target.float(), self.router.scores()[step], float(self.lam[step]), self.cfg.beta)
                sum(terms.values()).backward()
                self.optims[step].step()
                self.optims[step].zero_grad(set_to_none=True)
                with torch.no_grad():
                    self.router.rows[step].clamp_(-5.0, 5.0)  # as HarmoniCa: bounded logits stay trainable
                self.log({k: float(v.detach()) for k, v in terms.items()})
        return _detached(out)


def class_conditional_call(pipe, steps: int, batch: int, seed: int, guidance_scale: float = 1.0) -> Tensor:
    """One generation of fastdiff's class-conditional pipeline (random labels, per-image seeds): the default
    ``call`` of router training and calibration. Other pipelines pass their own ``call(pipe, steps, batch, seed)``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, pipe.num_classes, (batch,), generator=g)
    gens = [torch.Generator(pipe.device).manual_seed(seed * 1000 + i) for i in range(batch)]
    return pipe(labels, steps, guidance_scale, gens, output_type="latent").images


def guided(out: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``D_u + w (D_c - D_u)`` of a batched call ``[unconditional; conditional]``, as
    :class:`~fastdiff.pipelines.class_conditional.ClassConditionalPipeline` combines its model output before the scheduler step."""
    out_u, out_c = out.chunk(2)
    return out_u + scale * (out_c - out_u)


def _call(call: Callable | None, cfg: RouterConfig) -> Callable:
    return call or partial(class_conditional_call, guidance_scale=cfg.guidance_scale)


def _combine(call: Callable | None, combine: Callable | None, cfg: RouterConfig) -> Callable[[Tensor], Tensor]:
    """What the sampler makes of a model output: given, or the default pipeline's guidance, or the output itself."""
    if combine is not None:
        return combine
    if call is None and cfg.guidance_scale != 1.0:
        return partial(guided, scale=cfg.guidance_scale)
    return lambda out: out


def _timesteps(pipe, steps: int) -> list[float]:
    pipe.scheduler.set_timesteps(steps)
    return [float(t) for t in pipe.scheduler.timesteps]


def image_error_proxy(pipe, router: Router, cfg: RouterConfig, call: Callable | None = None, seed: int = 10_000) -> Tensor:
    """IEPO's ``lambda_t`` (HarmoniCa eq. 9), one per router row (model call), with a fixed noise: sample with every
    unit computed, then switch the router's (soft) caching on call by call, t = 1, 2, ..., and take the mean squared
    change of the final images each call adds. Normalised to mean 1 over calls 1, 2, ... (call 0 always computes)."""
    call = _call(call, cfg)
    model = cached_model(pipe)
    if getattr(model, "_fastdiff_cache", None) is not None:
        raise InputError("the pipeline's model already has a cache; remove_cache(model) before computing the image-error proxy")
    lam = torch.zeros(len(router.rows))
    gate = RouterGate(router, cfg.threshold, until=1)
    apply_cache(model, gate, forecast=cfg.forecast, granularity=_granularity(router))
    try:
        with torch.no_grad():
            prev = call(pipe, cfg.steps, cfg.lambda_batch, seed).float()
            for t in range(1, len(router.rows)):
                gate.until = t + 1
                images = call(pipe, cfg.steps, cfg.lambda_batch, seed).float()
                lam[t], prev = (images - prev).pow(2).mean(), images
    finally:
        remove_cache(model)
    return lam / lam[1:].mean().clamp_min(1e-12)


def train_router(pipe, cfg: RouterConfig, call: Callable | None = None, progress: bool = True,
                 combine: Callable[[Tensor], Tensor] | None = None) -> tuple[Router, dict]:  # fmt: skip
    """Train a HarmoniCa router for ``pipe``'s model and scheduler at ``cfg.steps`` steps. ``call(pipe, steps,
    batch, seed)`` runs one generation (default: fastdiff's class-conditional pipeline at ``cfg.guidance_scale``); any
    diffusers pipeline works with a matching ``call``. ``combine(model_output)``: what the sampler makes of a model
    output, where the loss is taken (default: the class-conditional pipeline's guidance, see :func:`guided`; the
    output itself with a custom ``call``). Returns the router and a training record.

    The model comes back as it was given: its parameters' ``requires_grad`` flags are restored (also when training
    fails), and the global random number generators, seeded with ``cfg.seed`` during training (for a ``call`` that
    draws from them), are back in the caller's state."""
    combine, call = _combine(call, combine, cfg), _call(call, cfg)
    model = cached_model(pipe)
    if getattr(model, "_fastdiff_cache", None) is not None:
        raise InputError("the pipeline's model already has a cache; remove_cache(model) before training a router")
    units = [n for n, _, _ in cache_units(model, granularity=cfg.granularity)]
    router = Router(units, _timesteps(pipe, cfg.steps), model_id(model), cfg.init,
                    meta={**asdict(cfg), "scheduler": type(pipe.scheduler).__name__})  # fmt: skip
    if cfg.init_every:
        with torch.no_grad():
            for step, row in enumerate(router.rows):
                row.fill_(3.0 if step % cfg.init_every == 0 else -3.0)
    with _frozen(model), torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        record = _sdt(pipe, model, router, cfg, call, combine, progress)
    if not all(math.isfinite(v) for v in record["error"]):
        raise InputError("router training diverged (non-finite error); lower lr or check the model")
    return router, record


@contextmanager
def _frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with no parameter requiring gradients inside; every parameter's own ``requires_grad`` back after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _sdt(pipe, model: nn.Module, router: Router, cfg: RouterConfig, call: Callable, combine: Callable, progress: bool) -> dict:
    """``cfg.iterations`` SDT rollouts of ``call`` training ``router`` in place (IEPO weights refreshed every
    ``cfg.lambda_every``); the training record."""
    from tqdm.auto import tqdm

    record: dict[str, list] = {"error": [], "l1": [], "lambda": [], "computed": []}
    lam = torch.ones(len(router.rows))
    bar = tqdm(range(cfg.iterations), desc="router (SDT)", disable=not progress)
    for it in bar:
        if it % cfg.lambda_every == 0:
            lam = image_error_proxy(pipe, router, cfg, call)
            record["lambda"].append(lam.tolist())
        terms = _rollout(pipe, model, router, cfg, call, combine, lam, seed=cfg.seed * 100_000 + it)
        for k in ("error", "l1"):  # mean over the routed model calls
            record[k].append(sum(t[k] for t in terms) / max(len(terms), 1))
        record["computed"].append(float(router.plan(cfg.threshold).mask[1:].float().mean()))
        bar.set_postfix(error=f"{record['error'][-1]:.3g}", computed=f"{record['computed'][-1]:.0%}")
    bar.close()
    return record


def _rollout(pipe, model: nn.Module, router: Router, cfg: RouterConfig, call: Callable, combine: Callable, lam: Tensor,
             seed: int) -> list[dict]:  # fmt: skip
    """One generation with the router's mixed outputs and an optimiser step per model call; the loss terms."""
    terms: list[dict] = []
    apply_cache(model, RouterGate(router, cfg.threshold), forecast=cfg.forecast, granularity=cfg.granularity)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(_SDTHook(router, cfg, lam, combine, terms.append), SDT_HOOK)
    try:
        call(pipe, cfg.steps, cfg.batch_size, seed)
    finally:
        registry.remove_hook(SDT_HOOK, recurse=False)
        remove_cache(model)
    return terms
