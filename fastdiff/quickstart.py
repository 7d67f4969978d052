"""``fastdiff quickstart``: the main job on the embedded default -- FID against NFE for the shipped teacher.

It samples the shipped Fashion-MNIST teacher (or the digits one) with diffusers' own schedulers and fastdiff's best
sampler at a few step counts, the teacher's 50-step reference run with and without fastdiff's best feature cache, and
the distilled student shipped with the teacher (``assets/students/NAME``) at 1, 2 and 4 steps; scores each run with the
domain FID against the test split, and writes a table (stdout + JSON, with the cache's and the student's wall-clock
speed-up over the reference run), an FID-vs-NFE plot, and one picture of sample grids on the same classes and seeds:
teacher at 50 NFE | the best solver at the fewest steps | the student at one step. Everything it needs ships in the
package (``fastdiff/assets/``); nothing is downloaded.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastdiff.errors import InputError
from fastdiff.eval.assets import student_path, teacher_path
from fastdiff.eval.metrics import fid_of_samples
from fastdiff.images import save_panels

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["QuickstartConfig", "run_quickstart"]

# diffusers' main schedulers and fastdiff's solver of the setting `fastdiff bench samplers` recommends (no diverged
# image at guidance 1-10, lowest FID to the converged samples; a test ties the two), in its recommended config
# (diffusers' dynamic thresholding on: at guidance 1 it changes the FIDs by under 1%); kept to four at two step counts
# so the quickstart stays near 3 minutes with the UNet teacher on a 2-core CPU
QUICKSTART_SOLVER = "ipndm-v"
QUICKSTART_SOLVER_CONFIG = {"thresholding": True}
QUICKSTART_SCHEDULERS = ("ddim", "dpmpp-2m", "unipc", QUICKSTART_SOLVER)
# a feature cache within +5% of the uncached test FID at 50 DDIM steps on both teachers (`fastdiff bench cache` on the
# DiT, `fastdiff bench cache-unet` on the UNet; figures in BENCHMARKS.md)
QUICKSTART_CACHE = "every:4:taylor"
SHIPPED = "shipped"  # QuickstartConfig.student: the student shipped for the teacher (assets/students/NAME), if any
TEACHER_ROW = "teacher: ddim (diffusers)"
OPTIMISED_SUFFIX = " + optimised schedule (fastdiff)"
GRID = 100  # images per panel of grid.png (a 10 x 10 class grid)


@dataclass
class QuickstartConfig:
    teacher: str = "fashion-mnist"
    schedulers: tuple[str, ...] = QUICKSTART_SCHEDULERS
    steps: tuple[int, ...] = (4, 8)
    reference_steps: int = 50  # the teacher's reference run (DDIM)
    cache: str | None = QUICKSTART_CACHE  # the teacher's reference run again with this feature cache (None: skip)
    student: str | None = SHIPPED  # a student pipeline folder; SHIPPED: the one shipped for the teacher, if any; None: none
    student_steps: tuple[int, ...] = (1, 2, 4)
    optimised: bool = True  # fastdiff's solvers again on the optimised schedules shipped next to the teacher, where any match
    guidance_scale: float = 1.0
    num_samples: int = 250
    seed: int = 0
    out: str = "outputs/quickstart"


def run_quickstart(cfg: QuickstartConfig, progress: bool = True) -> dict:
    """Run the table; returns the JSON record (also written to ``cfg.out/quickstart.json``)."""
    from tqdm.auto import tqdm

    from fastdiff.cache import apply_cache_spec, cached_model, remove_cache
    from fastdiff.eval.sources import load_source, source_features
    from fastdiff.eval.extractors import load_extractor
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.pipelines.sampling import FASTDIFF_SCHEDULERS, make_scheduler, sample_pipeline

    pipe = load_pipeline(teacher_path(cfg.teacher))
    if cfg.cache:  # a bad cache setting fails now, not after minutes of sampling
        remove_cache(apply_cache_spec(cached_model(pipe), cfg.cache))
    student, student_name = _load_student(cfg, pipe)  # and a bad student folder
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    extractor = load_extractor(cfg.teacher)
    reference = source_features(load_source(f"{cfg.teacher}:test", 1), extractor, progress=progress)
    base_config = dict(pipe.scheduler.config)
    source = {name: "fastdiff" if name in FASTDIFF_SCHEDULERS else "diffusers" for name in cfg.schedulers}
    runs = [(f"{name} ({source[name]})", name, steps, None) for name in cfg.schedulers for steps in cfg.steps]
    runs += _optimised_runs(cfg, source)
    runs.append((TEACHER_ROW, "ddim", cfg.reference_steps, None))
    if cfg.cache:
        runs.append((f"teacher: ddim + cache {cfg.cache} (fastdiff)", "ddim", cfg.reference_steps, None))
    if student is not None:
        runs += [(f"student: {student_name} (fastdiff)", None, steps, None) for steps in cfg.student_steps]
    rows, shown = [], {}
    for label, name, steps, schedule in tqdm(runs, desc="quickstart", disable=not progress):
        model = student if name is None else pipe
        if name is not None:
            pipe.scheduler = make_scheduler(name, base_config, **_solver_config(name))
        if "+ cache" in label:
            apply_cache_spec(cached_model(pipe), cfg.cache)
        start = time.perf_counter()
        guidance = cfg.guidance_scale if name is not None else 1.0  # a student samples as it was distilled
        samples = sample_pipeline(model, cfg.num_samples, steps, guidance, cfg.seed, schedule=schedule)
        seconds = time.perf_counter() - start
        remove_cache(cached_model(pipe))
        rows.append({
            "sampler": label, "steps": steps, "nfe": samples.nfe, "fid": fid_of_samples(samples.images, extractor, reference),
            "seconds": round(seconds, 2),
        })  # fmt: skip
        shown[label, steps] = samples.images[:GRID]
    teacher_row = next(r for r in rows if r["sampler"] == TEACHER_ROW)
    for r in rows:
        if r["sampler"].startswith(("student", "teacher: ddim + cache")):
            r["speedup"] = round(teacher_row["seconds"] / r["seconds"], 2)
        if r["sampler"].endswith(OPTIMISED_SUFFIX):  # the gain over the same solver on its default schedule
            name = r["sampler"].removesuffix(OPTIMISED_SUFFIX)
            base = next(d for d in rows if d["sampler"] == f"{name} ({source[name]})" and d["steps"] == r["steps"])
            r["fid_gain"] = round(base["fid"] / r["fid"], 2)
    save_panels(_grid_panels(rows, shown, cfg), out / "grid.png")
    record = {
        "teacher": cfg.teacher, "extractor": extractor.name, "reference": f"{cfg.teacher}:test ({reference.n} images)",
        "student": student_name and str(cfg.student if cfg.student != SHIPPED else student_path(cfg.teacher)),
        "num_samples": cfg.num_samples, "guidance_scale": cfg.guidance_scale, "seed": cfg.seed, "rows": rows,
        "optimised_schedules": _optimised_note(cfg, runs),
        "scheduler_config": {name: _solver_config(name) for name in cfg.schedulers if _solver_config(name)},
    }  # fmt: skip
    (out / "quickstart.json").write_text(json.dumps(record, indent=2) + "\n")
    plot_fid_vs_nfe(rows, out / "fid_vs_nfe.png", f"{cfg.teacher} teacher, guidance {cfg.guidance_scale:g}, {cfg.num_samples} samples")
    return record


def _solver_config(name: str) -> dict:
    """The config overrides the scheduler ``name`` runs with here: the recommended setting's for fastdiff's solver."""
    return dict(QUICKSTART_SOLVER_CONFIG) if name == QUICKSTART_SOLVER else {}


def _optimised_runs(cfg: QuickstartConfig, source: dict[str, str]) -> list[tuple]:
    """fastdiff's solvers of ``cfg`` on the optimised schedule shipped for the teacher, solver, steps and guidance."""
    from fastdiff.eval.assets import shipped_schedule

    if not cfg.optimised:
        return []
    runs = []
    for name in (n for n in cfg.schedulers if source[n] == "fastdiff"):
        for steps in cfg.steps:
            schedule = shipped_schedule(cfg.teacher, name, steps, cfg.guidance_scale)
            if schedule is not None:
                runs.append((f"{name}{OPTIMISED_SUFFIX}", name, steps, schedule))
    return runs


def _optimised_note(cfg: QuickstartConfig, runs: list[tuple]) -> str:
    used = sorted({(r[1], r[2]) for r in runs if r[3] is not None})
    if used:
        return "shipped for " + ", ".join(f"{name} at {steps} steps" for name, steps in used) + f" (guidance {cfg.guidance_scale:g})"
    return (f"none ships for the {cfg.teacher} teacher at these steps and guidance {cfg.guidance_scale:g}; make one with "
            f"`fastdiff schedule optimize {cfg.teacher} --scheduler S --steps N --guidance W --out F` and sample with "
            "`fastdiff sample --schedule F`")


def _load_student(cfg: QuickstartConfig, teacher):
    """The student pipeline of ``cfg`` (``None`` where there is none) and its name: the objective its
    ``training.json`` records, else its scheduler's class. Refused unless it makes the teacher's images and classes."""
    from fastdiff.pipelines.class_conditional import load_pipeline

    path = student_path(cfg.teacher) if cfg.student == SHIPPED else cfg.student
    if path is None:
        return None, None
    if not cfg.student_steps or min(cfg.student_steps) < 1:
        raise InputError(f"student steps must be >= 1; got {cfg.student_steps}")
    student = load_pipeline(path)
    made = (getattr(student, "num_classes", None), tuple(student.model_config.get(k) for k in ("in_channels", "sample_size")))
    wanted = (teacher.num_classes, tuple(teacher.model_config.get(k) for k in ("in_channels", "sample_size")))
    if made != wanted:
        raise InputError(f"the student {path} makes (classes, (channels, size)) = {made}, the {cfg.teacher} teacher {wanted}; "
                         "pass a student distilled from this teacher (--student PATH) or --student none")  # fmt: skip
    training = Path(path) / "training.json"
    recipe = json.loads(training.read_text()).get("recipe", {}) if training.is_file() else {}
    return student, recipe.get("objective") or type(student.scheduler).__name__


def _grid_panels(rows: list[dict], shown: dict, cfg: QuickstartConfig) -> list[tuple[str, Tensor]]:
    """teacher at the reference NFE | the best solver at the fewest steps | the student at its fewest steps: the
    same classes and seeds in every panel."""
    solvers = [r for r in rows if r["steps"] == min(cfg.steps) and not r["sampler"].startswith(("teacher", "student"))]
    picks = [next(r for r in rows if r["sampler"] == TEACHER_ROW)]
    picks += sorted(solvers, key=lambda r: r["fid"])[:1]
    picks += sorted((r for r in rows if r["sampler"].startswith("student")), key=lambda r: r["steps"])[:1]
    return [(f"{r['sampler']}\n{r['nfe']:g} NFE, FID {r['fid']:.2f}", shown[r["sampler"], r["steps"]]) for r in picks]


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
