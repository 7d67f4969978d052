"""``fastdiff quickstart``: the main job on the embedded default -- FID against NFE for the shipped teacher.

It samples the shipped Fashion-MNIST teacher (or the digits one) with diffusers' own schedulers and fastdiff's best
sampler at a few step counts, and the teacher's 50-step reference run with and without fastdiff's best feature cache;
scores each run with the domain FID against the test split, and writes a table (stdout + JSON), a sample grid and an
FID-vs-NFE plot. Everything it needs ships in the package (``fastdiff/assets/``); nothing is downloaded.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from fastdiff.eval.assets import teacher_path
from fastdiff.eval.metrics import fid_of_samples

__all__ = ["QuickstartConfig", "run_quickstart"]

# diffusers' schedulers and the best fastdiff sampler of `fastdiff bench samplers` (GHVB order 2, beta 0.8)
QUICKSTART_SCHEDULERS = ("ddim", "dpmpp-2m", "unipc", "euler", "pndm", "ghvb-1.8")
# the fastest feature cache within +5% FID of `fastdiff bench cache` (50 DDIM steps)
QUICKSTART_CACHE = "every:4:taylor"


@dataclass
class QuickstartConfig:
    teacher: str = "fashion-mnist"
    schedulers: tuple[str, ...] = QUICKSTART_SCHEDULERS
    steps: tuple[int, ...] = (4, 8, 16)
    reference_steps: int = 50  # the teacher's reference run (DDIM)
    cache: str | None = QUICKSTART_CACHE  # the teacher's reference run again with this feature cache (None: skip)
    guidance_scale: float = 1.0
    num_samples: int = 500
    seed: int = 0
    out: str = "outputs/quickstart"


def run_quickstart(cfg: QuickstartConfig, progress: bool = True) -> dict:
    """Run the table; returns the JSON record (also written to ``cfg.out/quickstart.json``)."""
    from tqdm.auto import tqdm

    from fastdiff.cache import apply_cache_spec, cached_model, remove_cache
    from fastdiff.eval.sources import load_source, source_features
    from fastdiff.eval.extractors import load_extractor
    from fastdiff.images import save_grid
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.pipelines.sampling import FASTDIFF_SCHEDULERS, make_scheduler, sample_pipeline

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(teacher_path(cfg.teacher))
    if cfg.cache:  # a bad cache setting fails now, not after minutes of sampling
        remove_cache(apply_cache_spec(cached_model(pipe), cfg.cache))
    extractor = load_extractor(cfg.teacher)
    reference = source_features(load_source(f"{cfg.teacher}:test", 1), extractor, progress=progress)
    base_config = dict(pipe.scheduler.config)
    source = {name: "fastdiff" if name in FASTDIFF_SCHEDULERS else "diffusers" for name in cfg.schedulers}
    runs = [(f"{name} ({source[name]})", name, steps) for name in cfg.schedulers for steps in cfg.steps]
    runs.append(("teacher: ddim (diffusers)", "ddim", cfg.reference_steps))
    if cfg.cache:
        runs.append((f"teacher: ddim + cache {cfg.cache} (fastdiff)", "ddim", cfg.reference_steps))
    rows = []
    for label, name, steps in tqdm(runs, desc="quickstart", disable=not progress):
        pipe.scheduler = make_scheduler(name, base_config)
        if "+ cache" in label:
            apply_cache_spec(cached_model(pipe), cfg.cache)
        start = time.perf_counter()
        samples = sample_pipeline(pipe, cfg.num_samples, steps, cfg.guidance_scale, cfg.seed)
        seconds = time.perf_counter() - start
        remove_cache(cached_model(pipe))
        rows.append({
            "sampler": label, "steps": steps, "nfe": samples.nfe, "fid": fid_of_samples(samples.images, extractor, reference),
            "seconds": round(seconds, 2),
        })  # fmt: skip
        if label == "teacher: ddim (diffusers)":
            save_grid(samples.images[:100], out / "grid.png", nrow=10, scale=3)
    teacher_row = next(r for r in rows if r["sampler"] == "teacher: ddim (diffusers)")
    for r in rows:
        if "+ cache" in r["sampler"]:
            r["speedup"] = round(teacher_row["seconds"] / r["seconds"], 2)
    record = {
        "teacher": cfg.teacher, "extractor": extractor.name, "reference": f"{cfg.teacher}:test ({reference.n} images)",
        "num_samples": cfg.num_samples, "guidance_scale": cfg.guidance_scale, "seed": cfg.seed, "rows": rows,
    }  # fmt: skip
    (out / "quickstart.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_fid_vs_nfe(rows, out / "fid_vs_nfe.png", f"{cfg.teacher} teacher, guidance {cfg.guidance_scale:g}, {cfg.num_samples} samples")
    return record


def plot_fid_vs_nfe(rows: list[dict], path: Path, title: str) -> Path:
    """One line per sampler; reference runs (``teacher: ...``) as a dashed horizontal line."""
    from matplotlib.figure import Figure  # no pyplot: the caller's plotting backend stays as it is

    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r["nfe"], r["fid"]) for r in rows if r["sampler"] == sampler)
        if sampler.startswith("teacher"):
            ax.axhline(pts[0][1], ls="--", color="gray", label=f"{sampler} @ {pts[0][0]:g} NFE")
        else:
            ax.plot(*zip(*pts), marker="o", label=sampler)
    ax.set(xlabel="NFE (model evaluations per image)", ylabel="domain FID (lower is better)", title=title, yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path
