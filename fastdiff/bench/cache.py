"""``fastdiff bench cache``: feature-cache policies against the uncached teacher and diffusers' own caches, in one run.

On the shipped Fashion-MNIST DiT teacher at 20 and 50 DDIM steps: wall-clock speed-up against the uncached pipeline
(same process, same seeds), domain FID against the test split and against the uncached samples, per-image error to
the uncached samples and the reuse statistics, for every fastdiff policy over a sweep of its knob and for the
diffusers caches that apply to ``DiTTransformer2DModel`` (Pyramid Attention Broadcast; First Block Cache and
TaylorSeer with the cache context fastdiff sets for them, since neither the model nor the pipeline opens one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["bench_cache", "bench_cache_unet", "render_cache", "plot_cache", "cache_entries", "unet_cache_entries", "targets"]


def _fastdiff(policy_fn: Callable[[int], Any], forecast: int = 0) -> Callable:
    def apply(pipe, steps):
        from fastdiff.cache import apply_cache, cached_model

        apply_cache(cached_model(pipe), policy_fn(steps), forecast=forecast)

    return apply


def _diffusers_pab(skip: int) -> Callable:
    def apply(pipe, steps):
        from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        model, holder = pipe.transformer, {"t": 1000}
        model.register_forward_pre_hook(lambda m, a, k: holder.__setitem__("t", int(torch.as_tensor(k["timestep"]).flatten()[0])), with_kwargs=True)
        apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: holder["t"]))  # fmt: skip

    return apply


def _with_context(apply_fn: Callable, config_fn: Callable) -> Callable:
    """Apply a diffusers cache that needs a cache context, and open one ("cond", with the timestep) before every
    model call -- what pipelines with ``cache_context`` do and fastdiff's class-conditional pipeline does not."""

    def apply(pipe, steps):
        from fastdiff._compat import set_cache_context

        apply_fn(pipe.transformer, config_fn(steps))

        def open_context(module, args, kwargs):
            set_cache_context(module, "cond", timestep=float(torch.as_tensor(kwargs["timestep"]).flatten()[0]))

        pipe.transformer.register_forward_pre_hook(open_context, with_kwargs=True)

    return apply


def _fbc(threshold: float) -> Callable:
    from diffusers import FirstBlockCacheConfig, apply_first_block_cache

    return _with_context(apply_first_block_cache, lambda steps: FirstBlockCacheConfig(threshold=threshold))


def _taylorseer(interval: int) -> Callable:
    from diffusers import TaylorSeerCacheConfig, apply_taylorseer_cache

    return _with_context(apply_taylorseer_cache, lambda steps: TaylorSeerCacheConfig(
        cache_interval=interval, disable_cache_before_step=2, taylor_factors_dtype=torch.float32,
        cache_identifiers=[r"^transformer_blocks\.\d+\.attn1$", r"^transformer_blocks\.\d+\.ff$"]))  # fmt: skip


_PREPARED: dict = {}  # (kind, steps, knob) -> calibration coefficients / trained router, shared by the rows that need it


def _prepared(key: tuple, make: Callable) -> tuple[Any, float]:
    if key not in _PREPARED:
        start = time.perf_counter()
        _PREPARED[key] = (make(), time.perf_counter() - start)
    return _PREPARED[key]


def _calibrated(threshold: float) -> Callable:
    """Residual threshold with the polynomial ``fastdiff cache calibrate`` fits (TeaCache), fitted in the run."""

    def apply(pipe, steps):
        from fastdiff.cache import ResidualThreshold, apply_cache, calibrate

        fit, seconds = _prepared(("calibration", steps), lambda: calibrate(pipe, steps, degree=4, generations=4, batch=16))
        apply_cache(pipe.transformer, ResidualThreshold(threshold=threshold, coefficients=tuple(fit["coefficients"])))
        return {"setup_seconds": seconds, "calibration_r2": fit["r2"]}

    return apply


def _router(beta: float, forecast: int, init_every: int, quick: bool, granularity: str = "attn-mlp") -> Callable:
    """The learned HarmoniCa router (SDT + IEPO), trained in the run for this step count; ``granularity``: its units
    (attention and feed-forward of each block, as HarmoniCa, or whole blocks)."""

    def apply(pipe, steps):
        from fastdiff.cache import RouterConfig, apply_router, train_router

        cfg = RouterConfig(steps=steps, beta=beta, forecast=forecast, init_every=init_every, batch_size=4 if quick else 16,
                           iterations=2 if quick else 40, lambda_batch=2 if quick else 8, granularity=granularity)  # fmt: skip
        key = ("router", steps, beta, forecast, init_every, granularity)
        (router, record), seconds = _prepared(key, lambda: train_router(pipe, cfg, progress=False))
        apply_router(pipe.transformer, router)
        return {"setup_seconds": seconds, "router_computed": record["computed"][-1]}

    return apply


def _router_entries(quick: bool, granularity: str) -> list[tuple[str, str, str, Callable]]:
    suffix = "" if granularity == "attn-mlp" else ", per block"
    entries = [("fastdiff", f"learned router (HarmoniCa){suffix}", "beta=0.01", _router(0.01, 0, 0, quick, granularity))]
    entries += [("fastdiff", f"learned router + Taylor, from every-3{suffix}", f"beta={b:g}", _router(b, 1, 3, quick, granularity))
                for b in (0.003, 0.01)]  # fmt: skip
    return entries


def cache_entries(quick: bool = False, router_granularities: tuple[str, ...] = ("attn-mlp",)) -> list[tuple[str, str, str, Callable]]:
    """``(source, method, knob, apply(pipe, steps))`` of every setting the benchmark runs; the learned-router rows
    once per granularity in ``router_granularities`` (``attn-mlp``: HarmoniCa's units; ``block``: ", per block")."""
    from fastdiff.cache import EveryN, ResidualThreshold, StageSwitch

    entries = [("fastdiff", "every-N", f"N={n}", _fastdiff(lambda s, n=n: EveryN(interval=n))) for n in (2, 3)]
    entries += [("fastdiff", "every-N + Taylor forecast", f"N={n}", _fastdiff(lambda s, n=n: EveryN(interval=n), forecast=1))
                for n in (2, 3, 4)]  # fmt: skip
    entries.append(("fastdiff", "stage switch (Delta-DiT)", "N=2", _fastdiff(lambda s: StageSwitch(split=3, switch_step=s // 2))))
    entries += [("fastdiff", "residual threshold", f"{t:g}", _fastdiff(lambda s, t=t: ResidualThreshold(threshold=t)))
                for t in (0.05, 0.1, 0.2)]  # fmt: skip
    entries += [("fastdiff", "residual threshold, calibrated", f"{t:g}", _calibrated(t)) for t in (0.05, 0.1, 0.2)]
    entries += [e for g in router_granularities for e in _router_entries(quick, g)]
    entries += [("diffusers", "PyramidAttentionBroadcast", f"skip={k}", _diffusers_pab(k)) for k in (2, 3)]
    entries += [("diffusers", "FirstBlockCache", f"{t:g}", _fbc(t)) for t in (0.05, 0.1, 0.2)]
    entries += [("diffusers", "TaylorSeer", f"interval={k}", _taylorseer(k)) for k in (2, 3, 4, 5)]
    return entries


def unet_cache_entries() -> list[tuple[str, str, str, Callable]]:
    """The UNet teacher's rows: DeepCache-style every-N (diffusers has no UNet cache to compare with)."""
    from fastdiff.cache import EveryN

    entries = [("fastdiff", "every-N (DeepCache)", f"N={n}", _fastdiff(lambda s, n=n: EveryN(interval=n))) for n in (2, 3, 4)]
    entries += [("fastdiff", "every-N (DeepCache) + Taylor forecast", f"N={n}", _fastdiff(lambda s, n=n: EveryN(interval=n), forecast=1))
                for n in (2, 3, 4)]  # fmt: skip
    return entries


def bench_cache_unet(quick: bool = False, progress: bool = True) -> dict:
    """``fastdiff bench cache-unet``: the same measurement on the shipped Fashion-MNIST UNet teacher (DeepCache-style)."""
    return bench_cache(quick, progress, teacher="fashion-mnist")


def bench_cache(quick: bool = False, progress: bool = True, only: str | None = None, teacher: str = "fashion-mnist-dit",
                step_counts: tuple[int, ...] | None = None, router_granularities: tuple[str, ...] = ("attn-mlp",)) -> dict:  # fmt: skip
    """``only``: run just the rows whose method contains one of these comma-separated texts (for exploring);
    ``teacher``: a shipped teacher; a DiT (fashion-mnist-dit) gets fastdiff's and diffusers' transformer caches, a
    UNet (fashion-mnist, digits) the DeepCache-style ones;
    ``step_counts``: default 20 and 50; ``router_granularities``: see :func:`cache_entries` (e.g. ``only="learned
    router", step_counts=(20,), router_granularities=("block", "attn-mlp")`` compares the router's units)."""
    from tqdm.auto import tqdm

    from fastdiff.bench.common import machine
    from fastdiff.cache import cached_model
    from fastdiff.eval.sources import load_source, source_features
    from fastdiff.eval.extractors import load_extractor
    from fastdiff.eval.metrics import FeatureSet, extract_features, fid
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.eval.assets import teacher_dataset, teacher_path
    from fastdiff.pipelines.sampling import make_scheduler, sample_pipeline

    n = 8 if quick else 250
    step_counts = tuple(step_counts or ((6,) if quick else (20, 50)))
    repeats = 1 if quick else 2
    extractor = load_extractor(teacher_dataset(teacher))
    test = source_features(load_source(f"{teacher_dataset(teacher)}:test", 1), extractor, progress=progress)
    _PREPARED.clear()

    def features(images):
        return FeatureSet.from_features(extract_features(extractor, images.clamp(-1, 1)))

    def fresh():
        pipe = load_pipeline(teacher_path(teacher))
        pipe.scheduler = make_scheduler("ddim", dict(pipe.scheduler.config))
        return pipe

    def timed(pipe, steps):
        start = time.perf_counter()
        images = sample_pipeline(pipe, n, steps, 1.0, seed=0).images
        return images, time.perf_counter() - start

    dit = not type(fresh().model).__name__.startswith("UNet")
    entries = cache_entries(quick, router_granularities) if dit else unet_cache_entries()
    entries = [e for e in entries if only is None or any(o in e[1] for o in only.split(","))]
    rows, baselines = [], {}
    bar = tqdm(total=len(step_counts) * len(entries), desc="cache", disable=not progress)
    for steps in step_counts:
        plain = fresh()
        timed(plain, 2)  # warm-up
        ref, _ = timed(plain, steps)
        ref_f = features(ref)
        baselines[str(steps)] = {"fid_test": fid(ref_f, test), "seconds": []}
        for source, method, knob, apply in entries:
            pipe = fresh()
            extra = apply(pipe, steps) or {}
            u, c, images = [], [], None
            for _ in range(repeats):  # uncached and cached timed back to back: the ratio sees the same machine state
                u.append(timed(plain, steps)[1])
                out, seconds = timed(pipe, steps)
                c.append(seconds)
                images = out if images is None else images
            baselines[str(steps)]["seconds"] += u
            f = features(images)
            rows.append({"source": source, "method": method, "knob": knob, "steps": steps, "seconds": min(c),
                         "uncached_seconds": min(u), "speedup": min(u) / min(c), "fid_test": fid(f, test),
                         "fid_uncached": fid(f, ref_f), "rmse_to_uncached": float((images - ref).flatten(1).pow(2).mean(1).sqrt().mean()),
                         **_stats(cached_model(pipe)), **extra})  # fmt: skip
            bar.update()
        baselines[str(steps)]["seconds_min"] = min(baselines[str(steps)]["seconds"])
    bar.close()
    result = {"machine": machine(), "quick": quick, "teacher": teacher, "model": "dit" if dit else "unet", "num_samples": n, "steps": list(step_counts),
              "repeats": repeats, "uncached": baselines, "rows": rows}  # fmt: skip
    if dit and only is None and step_counts == (20, 50):  # the full benchmark
        result["router_units"] = router_units(progress=progress)
    return result


def router_units(steps: int = 20, progress: bool = True) -> dict:
    """The learned-router rows at ``steps`` steps with both kinds of units side by side in one run: whole blocks
    (residual reuse) and HarmoniCa's attention / feed-forward reused before their adaLN gates (issue 11, item 14)."""
    data = bench_cache(progress=progress, only="learned router", step_counts=(steps,), router_granularities=("block", "attn-mlp"))
    return {"steps": steps, "machine": data["machine"], "uncached": data["uncached"][str(steps)], "rows": data["rows"]}


def _stats(model) -> dict:
    from fastdiff.cache import cache_stats

    if getattr(model, "_fastdiff_cache", None) is None:
        return {"reuse_rate": None, "macs_saved": None}
    s = cache_stats(model)
    return {"reuse_rate": s["reuse_rate"], "macs_saved": s["macs_saved"]}


def targets(data: dict) -> dict:
    """Per step count: the fastest fastdiff and diffusers settings within +5% test FID of the uncached run, and for
    each learned-router row the fastest static (every-N) row at no worse FID."""
    out = {}
    for steps in data["steps"]:
        rows = [r for r in data["rows"] if r["steps"] == steps]
        limit = 1.05 * data["uncached"][str(steps)]["fid_test"]
        ok = [r for r in rows if r["fid_test"] <= limit]
        best = {src: max((r for r in ok if r["source"] == src), key=lambda r: r["speedup"], default=None) for src in ("fastdiff", "diffusers")}
        static = [r for r in rows if r["method"].startswith("every-N")]
        learned = []
        for r in (r for r in rows if r["method"].startswith("learned router")):
            rival = max((s for s in static if s["fid_test"] <= r["fid_test"]), key=lambda s: s["speedup"], default=None)
            learned.append({"router": f"{r['method']} {r['knob']}", "speedup": r["speedup"], "fid_test": r["fid_test"],
                            "best_static": rival and f"{rival['method']} {rival['knob']}", "static_speedup": rival and rival["speedup"],
                            "dominates": rival is None or r["speedup"] > rival["speedup"]})  # fmt: skip
        out[str(steps)] = {"fid_limit": limit, "learned_vs_static": learned,
                           **{f"best_{k}": v and {"method": f"{v['method']} {v['knob']}", "speedup": v["speedup"],
                                                   "fid_test": v["fid_test"]} for k, v in best.items()}}  # fmt: skip
    return out


def render_cache(data: dict) -> list[str]:
    from fastdiff.bench.common import fmt as _fmt

    unet = data.get("model", "unet" if data.get("teacher") == "digits" else "dit") == "unet"
    model = (f"the shipped {data['teacher']} UNet teacher (DeepCache-style: the inner blocks reused, the outermost down and "
             "up blocks always fresh)") if unet else f"the shipped {data['teacher']} DiT teacher (6 blocks)"  # fmt: skip
    lines = ["## Feature caching" + (" on a UNet" if unet else ""), "",
             f"`fastdiff bench {'cache-unet' if unet else 'cache'}`: {model}, DDIM, {data['num_samples']} images per row with",
             "the same seeds; speed-up = wall-clock of the uncached pipeline / this row, each the fastest of "
             f"{data.get('repeats', 1)} timing(s) taken back to back with the row's (same machine state); FID against the",
             "test split and against the uncached samples; MACs saved = fastdiff's estimate from the reuse plan (Linear/Conv layers);",
             "setup = calibration or router training in the same run (once per step count, shared by a method's rows).",
             f"A test FID from {data['num_samples']} images moves by several percent with the seed (some cached rows score *below* the",
             "uncached run); 'FID vs uncached' and the RMSE measure the cache's own error.",
             "", f"![speed vs FID](benchmarks/{'cache-unet' if unet else 'cache'}_frontier.png)", ""]  # fmt: skip
    for steps in data["steps"]:
        u = data["uncached"][str(steps)]
        timing = f"{u['seconds_min']:.1f}-{max(u['seconds']):.1f} s" if isinstance(u.get("seconds"), list) else f"{u['seconds']:.1f} s"
        lines += [f"**{steps} steps** -- uncached: {timing}, test FID {_fmt(u['fid_test'])}", "",
                  "| source | method | knob | speed-up | test FID | FID vs uncached | RMSE to uncached | reuse | MACs saved | setup |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in (r for r in data["rows"] if r["steps"] == steps):
            reuse = "-" if r["reuse_rate"] is None else f"{r['reuse_rate']:.0%}"
            saved = "-" if r["macs_saved"] is None else f"{r['macs_saved']:.0%}"
            setup = f"{r['setup_seconds']:.0f} s" if r.get("setup_seconds") else "-"
            lines.append(f"| {r['source']} | {r['method']} | {r['knob']} | {r['speedup']:.2f}x | {_fmt(r['fid_test'])} | "
                         f"{_fmt(r['fid_uncached'])} | {_fmt(r['rmse_to_uncached'])} | {reuse} | {saved} | {setup} |")  # fmt: skip
        lines.append("")
    lines += _render_router_units(data.get("router_units"))
    lines += ["**Targets** (computed from this run): fastest setting within +5% of the uncached test FID --"]
    fmt = lambda b: f"{b['method']} at {b['speedup']:.2f}x (FID {_fmt(b['fid_test'])})" if b else "none"  # noqa: E731
    for steps, t in targets(data).items():
        rival = "" if unet else f"; diffusers {fmt(t['best_diffusers'])}"
        lines.append(f"- {steps} steps: fastdiff {fmt(t['best_fastdiff'])}{rival}; target >= 2x.")
        for r in t.get("learned_vs_static", []):
            rival = f"{r['best_static']} {r['static_speedup']:.2f}x" if r["best_static"] else "no static row"
            verdict = "dominates" if r["dominates"] else "does not dominate"
            lines.append(f"  - {r['router']}: {r['speedup']:.2f}x at FID {_fmt(r['fid_test'])}; fastest static schedule at no worse FID: "
                         f"{rival} -> {verdict}")  # fmt: skip
    return lines


def _render_router_units(units: dict | None) -> list[str]:
    """The router's units side by side: per block vs attention / feed-forward (one run, same seeds)."""
    from fastdiff.bench.common import fmt

    if not units:
        return []
    lines = [f"**Router units** ({units['steps']} steps, one run, each router trained in it): whole blocks vs HarmoniCa's "
             f"attention and feed-forward reused before their adaLN gates; uncached test FID {fmt(units['uncached']['fid_test'])}.", "",
             "| router | knob | speed-up | test FID | FID vs uncached | reuse | MACs saved | setup |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in units["rows"]:
        lines.append(f"| {r['method']} | {r['knob']} | {r['speedup']:.2f}x | {fmt(r['fid_test'])} | {fmt(r['fid_uncached'])} | "
                     f"{r['reuse_rate']:.0%} | {r['macs_saved']:.0%} | {r.get('setup_seconds', 0):.0f} s |")  # fmt: skip
    pairs = _unit_pairs(units["rows"])
    if pairs:
        block_better = sum(b["fid_uncached"] < a["fid_uncached"] for b, a in pairs)
        faster = sum(a["speedup"] > b["speedup"] for b, a in pairs)
        lines += ["", f"Same method and knob: per-block units err less (FID vs uncached) in {block_better} of {len(pairs)} pairs; "
                      f"attention / feed-forward units are faster in {faster} of {len(pairs)}."]  # fmt: skip
    return lines + [""]


def _unit_pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(per-block row, attention / feed-forward row) of the same method and knob."""
    suffix = ", per block"
    attn = {(r["method"], r["knob"]): r for r in rows if not r["method"].endswith(suffix)}
    return [(r, attn[(r["method"][: -len(suffix)], r["knob"])]) for r in rows
            if r["method"].endswith(suffix) and (r["method"][: -len(suffix)], r["knob"]) in attn]  # fmt: skip


def plot_cache(data: dict, path: Path) -> Path:
    """Test FID against wall-clock speed-up, one panel per step count, with the uncached FID + 5% as a dotted line."""
    from matplotlib.figure import Figure  # no pyplot: the caller's plotting backend stays as it is

    fig = Figure(figsize=(6 * len(data["steps"]), 4.5), dpi=110)
    axes = fig.subplots(1, len(data["steps"]), squeeze=False)
    for ax, steps in zip(axes[0], data["steps"]):
        for method in dict.fromkeys((r["source"], r["method"]) for r in data["rows"]):
            pts = sorted((r["speedup"], r["fid_test"]) for r in data["rows"] if r["steps"] == steps and (r["source"], r["method"]) == method)
            ax.plot(*zip(*pts), "-o" if method[0] == "fastdiff" else "--s", label=f"{method[1]} ({method[0]})")
        ax.axhline(data["uncached"][str(steps)]["fid_test"] * 1.05, color="gray", ls=":", label="uncached FID + 5%")
        ax.set(title=f"{data.get('teacher', 'fashion-mnist')} teacher, {steps} DDIM steps", xlabel="wall-clock speed-up vs uncached", ylabel="domain FID (test)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path
