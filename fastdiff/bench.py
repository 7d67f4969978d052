"""``fastdiff bench``: benchmarks that write JSON to ``benchmarks/`` and regenerate ``BENCHMARKS.md`` from it.

Numbers are never typed into the report: every table is rendered from the JSON a benchmark run wrote, and every
section names the command that regenerates it and the machine it ran on.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["machine", "bench_teachers", "write_report", "BENCH_DIR"]

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "device": "cuda" if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def bench_teachers(quick: bool = False, seeds: tuple[int, ...] = (0, 1, 2), progress: bool = True) -> dict:
    """Each shipped teacher's domain FID at 50 NFE against the test split, the train-vs-test floor at the same sample
    count, the FID of a set against itself, the spread over seeds, and the Inception path end to end."""
    from fastdiff.evaluation import load_source, source_features
    from fastdiff.extractors import ASSETS, load_extractor
    from fastdiff.metrics import fid
    from fastdiff.pipelines import load_pipeline
    from fastdiff.quickstart import fid_of_samples, teacher_path
    from fastdiff.sampling import make_scheduler, sample_pipeline

    result = {"machine": machine(), "quick": quick, "teachers": {}}
    for name, n_full in (("digits", 360), ("fashion-mnist", 2000)):
        n = 100 if quick else n_full
        extractor = load_extractor(name)
        test = source_features(load_source(f"{name}:test", 1), extractor, progress=progress)
        train_images = load_source(f"{name}:train", 1).images
        pipe = load_pipeline(teacher_path(name))
        pipe.scheduler = make_scheduler("ddim", dict(pipe.scheduler.config))
        teacher, floor = [], []
        start = time.perf_counter()
        for seed in seeds:
            samples = sample_pipeline(pipe, n, 50, 1.0, seed, progress=progress)
            teacher.append(fid_of_samples(samples.images, extractor, test))
        seconds = (time.perf_counter() - start) / len(seeds)
        for seed in seeds:
            pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:n]
            floor.append(fid_of_samples(train_images[pick], extractor, test))
        training = json.loads((teacher_path(name) / "training.json").read_text())
        extractor_record = json.loads((ASSETS / "extractors" / name / "config.json").read_text())
        result["teachers"][name] = {
            "num_samples": n, "reference": f"{name}:test ({test.n} images)", "nfe": samples.nfe,
            "teacher_fid_50nfe": _mean_std(teacher), "train_vs_test_floor": _mean_std(floor),
            "self_fid": fid(test, test), "sampling_seconds_per_seed": round(seconds, 1),
            "teacher_params": training["parameters"], "teacher_train_minutes": training["wall_minutes"],
            "teacher_steps": training["steps"], "model": training["recipe"]["model"]["kind"],
            "extractor_test_accuracy": extractor_record["test_accuracy"],
        }  # fmt: skip
    result["inception"] = _inception_path()
    return result


def _inception_path() -> dict:
    """FID through the standard Inception extractor with a weights file made locally (random init)."""
    from fastdiff.evaluation import load_source
    from fastdiff.extractors import load_extractor
    from fastdiff.metrics import FeatureSet, extract_features, fid
    from fastdiff.testing import write_random_inception_weights

    with tempfile.TemporaryDirectory() as tmp:
        weights = write_random_inception_weights(Path(tmp) / "inception.pth")
        extractor = load_extractor("inception", weights)
        start = time.perf_counter()
        fa, fb = (FeatureSet.from_features(extract_features(extractor, load_source(f"digits:{split}", 3).images[:32]))
                  for split in ("train", "test"))  # fmt: skip
        value = fid(fa, fb)
        return {"fid_digits_train32_vs_test32": value, "self_fid": fid(fa, fa), "feature_dim": fa.dim,
                "resize": extractor.resize, "seconds": round(time.perf_counter() - start, 1),
                "weights": "random init written by fastdiff.testing.write_random_inception_weights (not the real weights)"}  # fmt: skip


# Global order of each sampler on a uniform sigma grid, where fixed multistep coefficients are exact (see the report).
THEORY_ORDER = {"euler": 1, "heun": 2, "dpmpp-2m": 2, "plms": 4, "s-pndm": 2, "f-pndm": 4, "ipndm": 4, "hb-plms": 1,
                "ghvb": 4, "hb-dpmpp-2m": 1}  # fmt: skip


def bench_samplers_oracle(quick: bool = False, progress: bool = True) -> dict:
    """Every fastdiff ODE sampler on the exact Gaussian-mixture oracle: error against the reference probability-flow
    solution vs NFE on a Karras grid (what people sample with) and on a uniform sigma grid (where linear multistep
    reaches its theoretical order), the fitted orders, and the error at high guidance (w = 6) against the exact
    guided ODE."""
    from tqdm.auto import tqdm

    from fastdiff.oracle import GaussianMixture
    from fastdiff.samplers import SAMPLERS, karras_sigmas
    from fastdiff.testing import CountingDenoiser

    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.2], [0.8, 1.0]], dtype=torch.float64)
    gmm = GaussianMixture(means, torch.tensor([0.3, 0.4, 0.25, 0.35]), labels=torch.tensor([0, 1, 0, 1]))
    sigma_max, sigma_min, n_points = 10.0, 0.05, 64
    x = torch.randn(n_points, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigma_max
    ref = gmm.ode_solve(x, sigma_max, sigma_min)
    labels = torch.arange(n_points) % 2
    guided = _GuidedOracle(gmm, labels, 6.0)
    ref_guided = gmm.ode_solve(x, sigma_max, sigma_min, class_labels=labels, guidance_scale=6.0)
    uniform = (3.0, 0.3)
    x_u = x * uniform[0] / sigma_max
    ref_u = gmm.ode_solve(x_u, *uniform)
    steps = (5, 10, 20) if quick else (5, 10, 20, 40, 80)  # F-PNDM needs >= 4
    steps_u = (10, 20, 40) if quick else (40, 80, 160, 320)
    rows = []
    for name, fn in tqdm(SAMPLERS.items(), desc="oracle", disable=not progress):
        errors, nfes = [], []
        for n in steps:
            counter = CountingDenoiser(gmm)
            out = fn(counter, x.clone(), karras_sigmas(n + 1, sigma_min, sigma_max)[:-1])  # n steps
            errors.append((out - ref).norm(dim=1).mean().item())
            nfes.append(counter.calls)
        errors_u = [(fn(gmm, x_u.clone(), torch.linspace(*uniform, n + 1, dtype=torch.float64)) - ref_u).norm(dim=1).mean().item()
                    for n in steps_u]  # fmt: skip
        guided_out = fn(guided, x.clone(), karras_sigmas(11, sigma_min, sigma_max)[:-1])
        rows.append({"sampler": name, "nfe": nfes, "error": errors, "fitted_order": _order(errors, nfes),
                     "uniform_error": errors_u, "uniform_order": _order(errors_u, steps_u), "theory_order": THEORY_ORDER.get(name),
                     "guided_w6_error_10_steps": (guided_out - ref_guided).norm(dim=1).mean().item()})  # fmt: skip
    return {"machine": machine(), "quick": quick, "grid": f"Karras rho=7, sigma {sigma_max} -> {sigma_min}", "steps": list(steps),
            "uniform_grid": f"uniform in sigma, {uniform[0]} -> {uniform[1]}", "uniform_steps": list(steps_u),
            "points": n_points, "rows": rows}  # fmt: skip


def _order(errors: list[float], nfes) -> float:
    """Slope of log error against log NFE between the two finest runs."""
    import math

    return -math.log(errors[-1] / errors[-2]) / math.log(nfes[-1] / nfes[-2])


class _GuidedOracle:
    """The oracle under classifier-free guidance, with fixed labels."""

    def __init__(self, gmm, labels, w):
        self.gmm, self.labels, self.w = gmm, labels, w

    def __call__(self, x, sigma):
        null = torch.full_like(self.labels, self.gmm.num_classes)
        d_u = self.gmm(x, sigma, null)
        return d_u + self.w * (self.gmm(x, sigma, self.labels) - d_u)


def _render_samplers_oracle(data: dict) -> list[str]:
    nfe_header = " | ".join(f"err, {n} steps" for n in data["steps"])
    lines = [
        "### Convergence on the exact Gaussian-mixture oracle",
        "",
        f"Mean error against the reference probability-flow ODE solution ({data['points']} points). Karras grid "
        f"({data['grid']}): NFE = model evaluations at each step count (Heun and the PNDM warm-ups cost more per step);",
        "fitted order = slope of log error against log NFE between the two finest runs. On Karras (and VP-timestep) grids the",
        "step size changes from step to step, so fixed-coefficient linear multistep (PLMS, iPNDM, GHVB, the PNDM family) is",
        f"second order there; on a uniform grid ({data.get('uniform_grid', '')}, {', '.join(map(str, data.get('uniform_steps', [])))} steps)",
        "it reaches its theoretical order, next to which the theory column stands (heavy ball with beta < 1: first order, as",
        "the momentum paper proves; GHVB keeps the order of its multistep). Last column: error at 10 steps under",
        "classifier-free guidance w = 6 against the exact guided ODE.",
        "",
        f"| sampler | NFE (Karras) | {nfe_header} | order, Karras | order, uniform | theory | guided w=6 error |",
        "|---|---|" + "---|" * len(data["steps"]) + "---|---|---|---|",
    ]
    for r in data["rows"]:
        errs = " | ".join(_fmt(e) for e in r["error"])
        uniform = f"{r['uniform_order']:.2f}" if "uniform_order" in r else "-"
        lines.append(f"| {r['sampler']} | {', '.join(map(str, r['nfe']))} | {errs} | {r['fitted_order']:.2f} | {uniform} | "
                     f"{r.get('theory_order') or '-'} | {_fmt(r['guided_w6_error_10_steps'])} |")  # fmt: skip
    return lines


# -- the report -------------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def _render_teachers(data: dict) -> list[str]:
    lines = [
        "## Teachers and the evaluator",
        "",
        "Domain FID (the shipped extractors' 128-d features) at 50 NFE (DDIM, no guidance) against the test split,",
        "next to the floor: FID of the same number of *real* training images against the same test split. Mean ± std",
        "over seeds (teacher: sampling seeds; floor: random training subsets).",
        "",
        "| teacher | model | params | trained | samples | teacher FID @ 50 NFE | train-vs-test floor | teacher / floor | FID(test, test) | extractor test acc. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in data["teachers"].items():
        t, f = r["teacher_fid_50nfe"], r["train_vs_test_floor"]
        lines.append(
            f"| {name} | {r['model']} | {r['teacher_params'] / 1e6:.2f} M | {r['teacher_steps']} steps, "
            f"{r['teacher_train_minutes']:.0f} CPU-min | {r['num_samples']} | {_fmt(t['mean'])} ± {_fmt(t['std'])} | "
            f"{_fmt(f['mean'])} ± {_fmt(f['std'])} | {t['mean'] / f['mean']:.1f}x | {_fmt(r['self_fid'])} | "
            f"{r['extractor_test_accuracy']:.2%} |"
        )
    inc = data["inception"]
    lines += [
        "",
        f"Inception path, end to end offline ({inc['weights']}): FID of 32 digits-train vs 32 digits-test images "
        f"= {_fmt(inc['fid_digits_train32_vs_test32'])}, self-FID = {_fmt(inc['self_fid'])}, {inc['feature_dim']}-d "
        f"features, resize {inc['resize']}, {inc['seconds']} s. With torch-fidelity's real weights "
        "(`--inception-weights`) the same command gives the standard numbers.",
    ]
    return lines


def _render_samplers(data: dict) -> list[str]:
    from fastdiff.bench_samplers import render_samplers

    return render_samplers(data)


def _plot_samplers(data: dict, path: Path) -> Path:
    from fastdiff.bench_samplers import plot_samplers

    return plot_samplers(data, path)


def _render_distill(data: dict) -> list[str]:
    from fastdiff.bench_distill import render_distill

    return render_distill(data)


def _render_cache(data: dict) -> list[str]:
    from fastdiff.bench_cache import render_cache

    return render_cache(data)


def _plot_cache(data: dict, path: Path) -> Path:
    from fastdiff.bench_cache import plot_cache

    return plot_cache(data, path)


RENDERERS: dict[str, Callable[[dict], list[str]]] = {
    "teachers": _render_teachers, "samplers": _render_samplers, "distill": _render_distill, "cache": _render_cache,
    "cache-unet": _render_cache,
}  # fmt: skip
PLOTS: dict[str, tuple[str, Callable[[dict, Path], Path]]] = {
    "samplers": ("samplers_fid_vs_nfe.png", _plot_samplers), "cache": ("cache_frontier.png", _plot_cache),
    "cache-unet": ("cache-unet_frontier.png", _plot_cache),
}  # fmt: skip
COMMANDS = {name: f"fastdiff bench {name}" for name in RENDERERS}


README_START, README_END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
FID_SCORED_AS = "uint8 pixels, as saved"  # recorded in every benchmark JSON (see fastdiff.images.to_pixels)


def write_report(bench_dir: Path = BENCH_DIR, out: Path = ROOT / "BENCHMARKS.md", readme: Path | None = ROOT / "README.md") -> Path:
    """Regenerate ``BENCHMARKS.md`` from every ``benchmarks/<name>.json`` that exists, and the same tables between
    the benchmark markers of the README."""
    lines = []
    for name, render in RENDERERS.items():
        path = Path(bench_dir) / f"{name}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        if name in PLOTS:
            PLOTS[name][1](data, Path(bench_dir) / PLOTS[name][0])
        m = data["machine"]
        lines += render(data)
        if data.get("fid_scored_as") != FID_SCORED_AS:
            lines += ["", "*FIDs in this section were scored before fastdiff scored the saved uint8 pixels (then: floats "
                      "clipped to [-1, 1]); they move by up to a few percent when regenerated.*"]  # fmt: skip
        lines += [
            "",
            f"*Regenerate: `{COMMANDS[name]}`{' --quick' if data.get('quick') else ''}. Machine: {m['cpu']}, "
            f"{m['cores']} cores, {m['device']}, torch {m['torch']}, {m['date']}.*",
            "",
        ]
    header = ["# Benchmarks", "", "Generated by `fastdiff bench ...` from the JSON files in `benchmarks/`; do not edit by hand.", ""]
    _atomic_write(Path(out), "\n".join(header + lines))
    if readme is not None and Path(readme).is_file():
        text = Path(readme).read_text()
        if README_START in text and README_END in text:
            start, end = text.index(README_START) + len(README_START), text.index(README_END)
            body = "\n".join(line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in lines)
            _atomic_write(Path(readme), text[:start] + "\n" + body + "\n" + text[end:])
    return Path(out)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_bench(name: str, quick: bool, progress: bool = True) -> Path:
    """Run benchmark ``name``, write its JSON and regenerate the report."""
    from fastdiff.bench_cache import bench_cache, bench_cache_unet
    from fastdiff.bench_distill import bench_distill
    from fastdiff.bench_samplers import bench_samplers

    runners = {"teachers": bench_teachers, "samplers": bench_samplers, "distill": bench_distill, "cache": bench_cache,
               "cache-unet": bench_cache_unet}  # fmt: skip
    data = {**runners[name](quick=quick, progress=progress), "fid_scored_as": FID_SCORED_AS}
    BENCH_DIR.mkdir(exist_ok=True)
    path = BENCH_DIR / f"{name}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    if not quick:
        write_report()
    return path
