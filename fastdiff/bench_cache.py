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

__all__ = ["bench_cache", "render_cache", "plot_cache", "cache_entries", "targets"]


def _fastdiff(policy_fn: Callable[[int], Any]) -> Callable:
    def apply(model, steps):
        from fastdiff.cache import apply_cache

        apply_cache(model, policy_fn(steps))

    return apply


def _diffusers_pab(skip: int) -> Callable:
    def apply(model, steps):
        from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

        holder = {"t": 1000}
        model.register_forward_pre_hook(lambda m, a, k: holder.__setitem__("t", int(torch.as_tensor(k["timestep"]).flatten()[0])), with_kwargs=True)
        apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: holder["t"]))  # fmt: skip

    return apply


def _with_context(apply_fn: Callable, config_fn: Callable) -> Callable:
    """Apply a diffusers cache that needs a cache context, and open one ("cond", with the timestep) before every
    model call -- what pipelines with ``cache_context`` do and fastdiff's class-conditional pipeline does not."""

    def apply(model, steps):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        apply_fn(model, config_fn(steps))

        def open_context(module, args, kwargs):
            _set_cache_context(module, CacheContext("cond", timestep=float(torch.as_tensor(kwargs["timestep"]).flatten()[0])))

        model.register_forward_pre_hook(open_context, with_kwargs=True)

    return apply


def _fbc(threshold: float) -> Callable:
    from diffusers import FirstBlockCacheConfig, apply_first_block_cache

    return _with_context(apply_first_block_cache, lambda steps: FirstBlockCacheConfig(threshold=threshold))


def _taylorseer(interval: int) -> Callable:
    from diffusers import TaylorSeerCacheConfig, apply_taylorseer_cache

    return _with_context(apply_taylorseer_cache, lambda steps: TaylorSeerCacheConfig(
        cache_interval=interval, disable_cache_before_step=2, taylor_factors_dtype=torch.float32,
        cache_identifiers=[r"^transformer_blocks\.\d+\.attn1$", r"^transformer_blocks\.\d+\.ff$"]))  # fmt: skip


def cache_entries() -> list[tuple[str, str, str, Callable]]:
    """``(source, method, knob, apply(model, steps))`` of every setting the benchmark runs."""
    from fastdiff.cache import EveryN, ResidualThreshold, StageSwitch

    entries = [("fastdiff", "every-N", f"N={n}", _fastdiff(lambda s, n=n: EveryN(interval=n))) for n in (2, 3, 4)]
    entries.append(("fastdiff", "stage switch (Delta-DiT)", "N=2", _fastdiff(lambda s: StageSwitch(split=3, switch_step=s // 2))))
    entries += [("fastdiff", "residual threshold", f"{t:g}", _fastdiff(lambda s, t=t: ResidualThreshold(threshold=t)))
                for t in (0.05, 0.1, 0.2, 0.4)]  # fmt: skip
    entries += [("diffusers", "PyramidAttentionBroadcast", f"skip={k}", _diffusers_pab(k)) for k in (2, 3)]
    entries += [("diffusers", "FirstBlockCache", f"{t:g}", _fbc(t)) for t in (0.05, 0.1, 0.2)]
    entries += [("diffusers", "TaylorSeer", f"interval={k}", _taylorseer(k)) for k in (2, 4)]
    return entries



def bench_cache(quick: bool = False, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from fastdiff.bench import machine
    from fastdiff.evaluation import load_source, source_features
    from fastdiff.extractors import load_extractor
    from fastdiff.metrics import FeatureSet, extract_features, fid
    from fastdiff.pipelines import load_pipeline
    from fastdiff.quickstart import teacher_path
    from fastdiff.sampling import make_scheduler, sample_pipeline

    n = 8 if quick else 250
    step_counts = (6,) if quick else (20, 50)
    extractor = load_extractor("fashion-mnist")
    test = source_features(load_source("fashion-mnist:test", 1), extractor, progress=progress)

    def features(images):
        return FeatureSet.from_features(extract_features(extractor, images.clamp(-1, 1)))

    def fresh():
        pipe = load_pipeline(teacher_path("fashion-mnist"))
        pipe.scheduler = make_scheduler("ddim", dict(pipe.scheduler.config))
        return pipe

    repeats = 1 if quick else 2

    def run(pipe, steps):  # images of the first run; the fastest of `repeats` timings (less scheduling noise)
        times, images = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            s = sample_pipeline(pipe, n, steps, 1.0, seed=0)
            times.append(time.perf_counter() - start)
            images = s.images if images is None else images
        return images, min(times)

    entries = cache_entries()
    rows, baselines = [], {}
    bar = tqdm(total=len(step_counts) * (len(entries) + 1), desc="cache", disable=not progress)
    for steps in step_counts:
        pipe = fresh()
        run(pipe, 2)  # warm-up
        ref, ref_s = run(pipe, steps)
        ref_f = features(ref)
        baselines[str(steps)] = {"seconds": ref_s, "fid_test": fid(ref_f, test)}
        bar.update()
        for source, method, knob, apply in entries:
            pipe = fresh()
            apply(pipe.transformer, steps)
            images, seconds = run(pipe, steps)
            stats = _stats(pipe.transformer)
            f = features(images)
            rows.append({"source": source, "method": method, "knob": knob, "steps": steps, "seconds": seconds,
                         "speedup": ref_s / seconds, "fid_test": fid(f, test), "fid_uncached": fid(f, ref_f),
                         "rmse_to_uncached": float((images - ref).flatten(1).pow(2).mean(1).sqrt().mean()), **stats})  # fmt: skip
            bar.update()
        again = run(fresh(), steps)[1]  # the uncached timing again at the end: drift shows as a difference
        baselines[str(steps)]["seconds_end"] = again
    bar.close()
    return {"machine": machine(), "quick": quick, "teacher": "fashion-mnist", "num_samples": n, "steps": list(step_counts),
            "repeats": repeats, "uncached": baselines, "rows": rows}  # fmt: skip


def _stats(model) -> dict:
    from fastdiff.cache import cache_stats

    if getattr(model, "_fastdiff_cache", None) is None:
        return {"reuse_rate": None, "macs_saved": None}
    s = cache_stats(model)
    return {"reuse_rate": s["reuse_rate"], "macs_saved": s["macs_saved"]}


def targets(data: dict) -> dict:
    """Per step count: the fastest fastdiff setting within +5% test FID of the uncached run, and diffusers' likewise."""
    out = {}
    for steps in data["steps"]:
        limit = 1.05 * data["uncached"][str(steps)]["fid_test"]
        ok = [r for r in data["rows"] if r["steps"] == steps and r["fid_test"] <= limit]
        best = {src: max((r for r in ok if r["source"] == src), key=lambda r: r["speedup"], default=None) for src in ("fastdiff", "diffusers")}
        out[str(steps)] = {"fid_limit": limit, **{f"best_{k}": v and {"method": f"{v['method']} {v['knob']}", "speedup": v["speedup"],
                                                                      "fid_test": v["fid_test"]} for k, v in best.items()}}  # fmt: skip
    return out


def render_cache(data: dict) -> list[str]:
    from fastdiff.bench import _fmt

    lines = ["## Feature caching", "",
             f"`fastdiff bench cache`: the shipped Fashion-MNIST DiT teacher (6 blocks), DDIM, {data['num_samples']} images per row with",
             f"the same seeds; speed-up = wall-clock of the uncached pipeline / this row (fastest of {data.get('repeats', 1)} timing(s) each), "
             "measured in the same run; FID against the",
             "test split and against the uncached samples; MACs saved = fastdiff's estimate from the reuse plan (Linear/Conv layers).",
             "", "![speed vs FID](benchmarks/cache_frontier.png)", ""]  # fmt: skip
    for steps in data["steps"]:
        u = data["uncached"][str(steps)]
        end = f" ({u['seconds_end']:.1f} s when timed again at the end)" if "seconds_end" in u else ""
        lines += [f"**{steps} steps** -- uncached: {u['seconds']:.1f} s{end}, test FID {_fmt(u['fid_test'])}", "",
                  "| source | method | knob | speed-up | test FID | FID vs uncached | RMSE to uncached | reuse | MACs saved |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in (r for r in data["rows"] if r["steps"] == steps):
            reuse = "-" if r["reuse_rate"] is None else f"{r['reuse_rate']:.0%}"
            saved = "-" if r["macs_saved"] is None else f"{r['macs_saved']:.0%}"
            lines.append(f"| {r['source']} | {r['method']} | {r['knob']} | {r['speedup']:.2f}x | {_fmt(r['fid_test'])} | "
                         f"{_fmt(r['fid_uncached'])} | {_fmt(r['rmse_to_uncached'])} | {reuse} | {saved} |")  # fmt: skip
        lines.append("")
    lines += ["**Targets** (computed from this run): fastest setting within +5% of the uncached test FID --"]
    for steps, t in targets(data).items():
        f, d = t["best_fastdiff"], t["best_diffusers"]
        fmt = lambda b: f"{b['method']} at {b['speedup']:.2f}x (FID {_fmt(b['fid_test'])})" if b else "none"  # noqa: E731
        lines.append(f"- {steps} steps: fastdiff {fmt(f)}; diffusers {fmt(d)}; target >= 2x.")
    lines.append("- the learned (HarmoniCa) router is not built yet, so 'learned dominates static' is not measured.")
    return lines


def plot_cache(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data["steps"]), figsize=(6 * len(data["steps"]), 4.5), dpi=110, squeeze=False)
    for ax, steps in zip(axes[0], data["steps"]):
        for method in dict.fromkeys((r["source"], r["method"]) for r in data["rows"]):
            pts = sorted((r["speedup"], r["fid_test"]) for r in data["rows"] if r["steps"] == steps and (r["source"], r["method"]) == method)
            ax.plot(*zip(*pts), "-o" if method[0] == "fastdiff" else "--s", label=f"{method[1]} ({method[0]})")
        ax.axhline(data["uncached"][str(steps)]["fid_test"] * 1.05, color="gray", ls=":", label="uncached FID + 5%")
        ax.set(title=f"{steps} DDIM steps", xlabel="wall-clock speed-up vs uncached", ylabel="domain FID (test)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
