"""``fastdiff bench samplers``: every fastdiff sampler and diffusers' schedulers side by side, in one run.

* the shipped Fashion-MNIST teacher at several guidance scales and NFE budgets: domain FID against the test split
  and against the teacher's own converged samples (same guidance), per-image error to the same-seed converged sample,
  and the divergence-artifact rate;
* the exact Gaussian-mixture oracle: error against the reference ODE solution vs NFE, fitted orders, guided error;
* the per-step cost of each scheduler relative to one teacher forward.

Divergence is measured on the raw samples, before any clipping: a sample is *out of range* when some pixel has
``|x| > 1.5`` (data live in [-1, 1]); it has *diverged* when its largest ``|x|`` exceeds ``max(1.5, 2 x`` that of the
converged sample from the same noise``)`` -- at high guidance the converged samples themselves leave [-1, 1], so
only the second is a solver failure.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fastdiff.pipelines import make_scheduler

__all__ = ["SAMPLER_ENTRIES", "OPTIMISED_ENTRIES", "bench_samplers", "render_samplers", "plot_samplers"]

# (label, scheduler name in fastdiff.pipelines.sampling.SCHEDULERS, config overrides, extra model calls beyond one per step)
SAMPLER_ENTRIES: list[tuple[str, str, dict, int]] = [
    ("GHVB 3.8 (order 4, beta 0.8)", "ghvb", {"solver_order": 4, "momentum": 0.8}, 0),
    ("GHVB 1.8 (order 2, beta 0.8)", "ghvb", {"solver_order": 2, "momentum": 0.8}, 0),
    ("GHVB 1.5 (order 2, beta 0.5)", "ghvb", {"solver_order": 2, "momentum": 0.5}, 0),
    ("HB-PLMS (order 4, beta 0.8)", "hb-plms", {"solver_order": 4, "momentum": 0.8}, 0),
    ("HB-PLMS (order 2, beta 0.8)", "hb-plms", {"solver_order": 2, "momentum": 0.8}, 0),
    ("NT-PLMS (order 4, beta 0.8)", "nt-plms", {"solver_order": 4, "momentum": 0.8}, 0),
    ("HB-DPM-Solver++(2M) (beta 0.8)", "hb-dpmpp-2m", {"momentum": 0.8}, 0),
    ("UniPC-HB (order 2, beta 0.8)", "unipc-hb", {"solver_order": 2, "momentum": 0.8}, 0),
    ("iPNDM", "ipndm", {}, 0),
    ("iPNDM-v (variable-step)", "ipndm-v", {}, 0),
    ("PLMS", "plms", {}, 1),
    ("S-PNDM", "s-pndm", {}, 1),
    ("F-PNDM", "f-pndm", {}, 9),
    ("DDIM", "ddim", {}, 0),
    ("DPM-Solver++(2M)", "dpmpp-2m", {}, 0),
    ("UniPC", "unipc", {}, 0),
    ("Euler", "euler", {}, 0),
    ("PNDM (skip_prk, = PLMS)", "pndm", {}, 1),
    # diffusers' thresholding=True (Imagen's dynamic thresholding of each x0 estimate, ratio 0.995, bound 1): the remedy
    # for the images high guidance blows up, honoured by every fastdiff scheduler; the recommended solver and the three
    # diffusers schedulers that offer it
    ("iPNDM-v (variable-step), thresholded", "ipndm-v", {"thresholding": True}, 0),
    ("DDIM, thresholded", "ddim", {"thresholding": True}, 0),
    ("DPM-Solver++(2M), thresholded", "dpmpp-2m", {"thresholding": True}, 0),
    ("UniPC, thresholded", "unipc", {"thresholding": True}, 0),
]
MIN_STEPS = {"f-pndm": 4}
# the optimised-schedule part (issue 17): one GITS calibration per guidance scale serves every NFE and solver; these
# solvers run on it -- fastdiff's momentum / multistep solvers and every diffusers scheduler that takes a custom grid
# (DDIM and PNDM take none; UniPC takes sigmas= only with use_flow_sigmas)
OPTIMISED_NFE = (4, 6, 8, 10)
OPTIMISED_ENTRIES = ("GHVB 3.8 (order 4, beta 0.8)", "GHVB 1.8 (order 2, beta 0.8)", "NT-PLMS (order 4, beta 0.8)",
                     "HB-DPM-Solver++(2M) (beta 0.8)", "UniPC-HB (order 2, beta 0.8)", "iPNDM", "iPNDM-v (variable-step)",
                     "DPM-Solver++(2M)", "Euler", "iPNDM-v (variable-step), thresholded", "DPM-Solver++(2M), thresholded")  # fmt: skip
# the solvers whose DP schedule is then fitted to the solver itself (refine_schedule: coordinate descent on its end-to-end
# error, 8 calibration images: 4-25 s per row at w = 1, less than the row's 250-image evaluation): fastdiff's order-4
# and order-2 GHVB (the first loses on the DP schedule at w = 1, the second is the never-diverging candidate) and
# diffusers' best, DPM-Solver++(2M), so the comparison stays like for like; REFINE: (images, sweeps)
REFINED_ENTRIES = ("GHVB 3.8 (order 4, beta 0.8)", "GHVB 1.8 (order 2, beta 0.8)", "DPM-Solver++(2M)")
REFINE = (8, 2)
REFERENCE = ("DPM-Solver++(2M)", "dpmpp-2m", 50)  # the converged samples each guidance scale is compared with


def _source(name: str) -> str:
    from fastdiff.pipelines.sampling import FASTDIFF_SCHEDULERS

    return "fastdiff" if name in FASTDIFF_SCHEDULERS else "diffusers"


def _divergence(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    peak, ref_peak = images.abs().flatten(1).amax(1), reference.abs().flatten(1).amax(1)
    return float((peak > 1.5).float().mean()), float((peak > torch.clamp(2 * ref_peak, min=1.5)).float().mean())


def bench_samplers(quick: bool = False, progress: bool = True, num_samples: int | None = None, cells: Any = None) -> dict:
    """The whole sampler benchmark (see the module docstring); returns the JSON record. ``cells``: a
    :class:`fastdiff.bench.common.Cells` that keeps each finished cell (``fastdiff bench samplers --resume``)."""
    from tqdm.auto import tqdm

    from fastdiff.bench.common import Cells, machine
    from fastdiff.bench.oracle import bench_samplers_oracle
    from fastdiff.eval.sources import load_source, source_features
    from fastdiff.eval.extractors import load_extractor
    from fastdiff.eval.metrics import FeatureSet, extract_features, fid
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.eval.assets import teacher_path
    from fastdiff.pipelines.sampling import sample_pipeline
    from fastdiff.samplers import SAMPLERS
    from fastdiff.samplers.schedule_search import METHOD

    cells = cells or Cells(None)
    n = num_samples or (8 if quick else 250)
    guidances, nfes = ((1.0, 6.0), (6, 15)) if quick else ((1.0, 3.0, 6.0, 10.0), (4, 6, 8, 10))
    pipe = load_pipeline(teacher_path("fashion-mnist"))
    base = dict(pipe.scheduler.config)
    extractor = load_extractor("fashion-mnist")
    test = source_features(load_source("fashion-mnist:test", 1), extractor, progress=progress)

    def features(images):  # of the images users see: clipped to [-1, 1]
        return FeatureSet.from_features(extract_features(extractor, images.clamp(-1, 1)))

    def cell(g, ref, ref_features, label, name, overrides, extra, nfe, schedule=None) -> dict:
        pipe.scheduler = make_scheduler(name, base, **overrides)
        start = time.perf_counter()
        s = sample_pipeline(pipe, n, nfe - extra, g, seed=0, schedule=schedule)
        seconds = time.perf_counter() - start
        feats = features(s.images)
        out_of_range, diverged = _divergence(s.images, ref.images)
        return {
            "sampler": label, "source": _source(name), "guidance": g, "nfe": s.nfe, "steps": nfe - extra,
            "fid_test": fid(feats, test), "fid_converged": fid(feats, ref_features),
            "rmse_to_converged": float((s.images - ref.images).flatten(1).pow(2).mean(1).sqrt().mean()),
            "out_of_range": out_of_range, "diverged": diverged, "seconds": round(seconds, 2),
        }  # fmt: skip

    runs = [(entry, nfe) for entry in SAMPLER_ENTRIES for nfe in nfes if nfe - entry[3] >= MIN_STEPS.get(entry[1], 1)]
    opt_nfes = [k for k in OPTIMISED_NFE if k in nfes] if not quick else [nfes[0]]
    opt_entries = [e for e in SAMPLER_ENTRIES if e[0] in OPTIMISED_ENTRIES]
    refined_entries = [e for e in SAMPLER_ENTRIES if e[0] in REFINED_ENTRIES]
    per_guidance = len(runs) + 1 + (len(opt_entries) + len(refined_entries)) * len(opt_nfes) + 1
    bar = tqdm(total=per_guidance * len(guidances), desc="samplers", disable=not progress)
    rows, references, ref_cache = [], {}, {}

    def reference(g):  # the converged samples of guidance g and their features, drawn once (where a cell needs them)
        if g not in ref_cache:
            pipe.scheduler = make_scheduler(REFERENCE[1], base)
            ref = sample_pipeline(pipe, n, REFERENCE[2], g, seed=0)
            ref_cache[g] = ref, features(ref.images)
        return ref_cache[g]

    for g in guidances:
        keys = [f"n={n} w={g} {entry[0]} nfe={nfe}" for entry, nfe in runs]
        if all(k in cells.found for k in keys):  # a resumed run: this guidance scale is finished, its reference too
            rows += [cells(k, dict) for k in keys]
            references[str(g)] = cells(f"n={n} w={g} reference", dict)
            bar.update(len(runs) + 1)
            continue
        ref, ref_features = reference(g)
        references[str(g)] = cells(f"n={n} w={g} reference", lambda: {
            "sampler": REFERENCE[0], "nfe": ref.nfe, "fid_test": fid(ref_features, test), "out_of_range": _divergence(ref.images, ref.images)[0]})  # fmt: skip
        bar.update()
        for key, ((label, name, overrides, extra), nfe) in zip(keys, runs):
            rows.append(cells(key, lambda: cell(g, ref, ref_features, label, name, overrides, extra, nfe)))  # noqa: B023 (called at once)
            bar.update()
    optimised = {"nfe": opt_nfes, "method": METHOD, "calibration": {}, "schedules": {}, "rows": []}
    full: dict = {}  # guidance -> the calibration with its step costs, where this process made it (the cell keeps the schedules)
    for g in guidances:  # the same solvers on the GITS-optimised schedule of each (guidance, NFE)
        record = cells(f"n={n} w={g} calibration ({METHOD})", lambda: _optimised_schedules(pipe, g, opt_nfes, quick, full), every_shard=True)  # noqa: B023
        optimised["calibration"][str(g)], optimised["schedules"][str(g)] = record["calibration"], record["schedules"]
        bar.update()
        for (label, name, overrides, extra), nfe in ((e, k) for e in opt_entries for k in opt_nfes):
            schedule = record["schedules"][str(nfe)]

            def compute():
                return {**cell(g, *reference(g), label, name, overrides, extra, nfe, schedule), "schedule": "optimised"}  # noqa: B023

            optimised["rows"].append(cells(f"n={n} w={g} {label} nfe={nfe} optimised ({METHOD})", compute))
            bar.update()
    calibrations: dict = {}  # guidance -> (calibration, refinement reference), made where a fitted cell needs them
    optimised["refined_rows"] = []
    for g in guidances:  # the DP schedule fitted to each solver itself
        for (label, name, overrides, extra), nfe in ((e, k) for e in refined_entries for k in opt_nfes):

            def fitted():
                if g not in calibrations:  # noqa: B023
                    calibrations[g] = _refinement_inputs(pipe, g, base, quick, full.get(g))  # noqa: B023
                record = _fitted_schedule(pipe, *calibrations[g], name, overrides, nfe, base, quick)  # noqa: B023
                grid = {"sigmas": record["sigmas"], "timesteps": record["timesteps"]}
                return {**cell(g, *reference(g), label, name, overrides, extra, nfe, grid), "schedule": "fitted",  # noqa: B023
                        "sigmas": record["sigmas"], "refined": record["calibration"]["refined"]}  # fmt: skip

            optimised["refined_rows"].append(cells(f"n={n} w={g} {label} nfe={nfe} fitted ({METHOD}; refine {REFINE})", fitted))
            bar.update()
    bar.close()
    return {
        "machine": machine(), "quick": quick, "teacher": "fashion-mnist", "num_samples": n, "guidance": list(guidances),
        "nfe": list(nfes), "reference": references, "rows": rows, "optimised": optimised,
        "overhead": cells(f"overhead quick={quick}", lambda: scheduler_overhead(pipe, base, quick)),
        "oracle": cells(f"oracle quick={quick} samplers={','.join(SAMPLERS)}", lambda: bench_samplers_oracle(quick=quick, progress=progress)),
    }  # fmt: skip


def _optimised_schedules(pipe: Any, guidance: float, nfes: list[int], quick: bool, keep: dict | None = None) -> dict:
    """One GITS calibration of ``pipe`` at ``guidance`` (32 noises, 80-point fine grid; 4 and 12 when ``quick``) and the
    optimal schedule of each NFE in ``nfes`` from it; its wall-clock seconds."""
    from fastdiff.pipelines.schedule_files import calibrate_pipeline, schedule_from_calibration

    samples, fine = (4, 12) if quick else (32, 80)
    calibration = calibrate_pipeline(pipe, guidance, samples, seed=1, fine_points=fine)  # seed 1: not the evaluation noise
    if keep is not None:
        keep[guidance] = calibration
    schedules = {str(k): schedule_from_calibration(pipe, calibration, "fashion-mnist", "any", k) for k in nfes}
    kept = {k: calibration[k] for k in ("samples", "fine_points", "seconds")}
    return {"calibration": kept, "schedules": {k: {"sigmas": v["sigmas"], "timesteps": v["timesteps"]} for k, v in schedules.items()}}


def _refinement_inputs(pipe: Any, guidance: float, config: dict, quick: bool, calibration: dict | None) -> tuple[dict, Any]:
    """The calibration of :func:`_optimised_schedules` (same noise and grid, so its DP paths are the table's; made
    again where a resumed run has only its cell) with its step costs, and the reference the schedules are fitted to."""
    from fastdiff.pipelines.schedule_files import calibrate_pipeline, refinement_reference

    samples, fine = (4, 12) if quick else (32, 80)
    calibration = calibration or calibrate_pipeline(pipe, guidance, samples, seed=1, fine_points=fine)
    return calibration, refinement_reference(pipe, guidance, 2 if quick else REFINE[0], 1, config)


def _fitted_schedule(pipe, calibration, reference, name, overrides, nfe, config, quick) -> dict:
    from fastdiff.pipelines.schedule_files import refine_schedule, schedule_from_calibration

    record = schedule_from_calibration(pipe, calibration, "fashion-mnist", name, nfe)
    images, sweeps = (2, 1) if quick else REFINE
    return refine_schedule(pipe, calibration, record, overrides, images, sweeps, seed=1, config=config, reference=reference)


def scheduler_overhead(pipe: Any, config: dict, quick: bool = False, batch: int = 250, steps: int = 10) -> dict:
    """Mean wall time of one ``scale_model_input`` + ``step`` on a batch of ``batch`` images, next to one teacher forward on the same
    batch (median of repeats); the step receives a fixed random model output, so only the scheduler is timed."""
    from fastdiff.denoisers import call_model

    x = torch.randn(batch, *pipe.image_shape, generator=torch.Generator().manual_seed(0))
    cond = {"class_labels": torch.arange(batch) % pipe.num_classes}
    repeats = 2 if quick else 5
    t0 = torch.full((batch,), 500)
    with torch.no_grad():
        call_model(pipe.model, x, t0, cond)  # warm-up
        forward = []
        for _ in range(repeats):
            start = time.perf_counter()
            call_model(pipe.model, x, t0, cond)
            forward.append(time.perf_counter() - start)
    forward_s = sorted(forward)[len(forward) // 2]
    out = {"batch": batch, "teacher_forward_ms": 1000 * forward_s, "rows": []}
    seen = set()
    for label, name, overrides, _ in SAMPLER_ENTRIES:
        if name in seen:
            continue
        seen.add(name)
        scheduler = make_scheduler(name, config, **overrides)
        times = []
        for _ in range(repeats):
            scheduler.set_timesteps(steps)
            sample, model_output = x.clone(), torch.randn_like(x) * 0.1
            start = time.perf_counter()
            for t in scheduler.timesteps:
                scheduler.scale_model_input(sample, t)
                sample = scheduler.step(model_output, t, sample, return_dict=False)[0]
            times.append((time.perf_counter() - start) / len(scheduler.timesteps))
        step_s = sorted(times)[len(times) // 2]
        out["rows"].append({"scheduler": type(scheduler).__name__, "name": name, "source": _source(name),
                            "step_ms": 1000 * step_s, "ratio_to_forward": step_s / forward_s})  # fmt: skip
    return out


# -- the report ---------------------------------------------------------------------------------------------------


def _cells(data: dict, g: float) -> dict[str, dict[int, dict]]:
    table: dict[str, dict[int, dict]] = {}
    for r in data["rows"]:
        if r["guidance"] == g:
            table.setdefault(r["sampler"], {})[round(r["nfe"])] = r
    return table


DIVERGED_TOLERANCE = 0.01  # a row with more diverged images than this never counts as a cell's best


def _sound(row: dict) -> bool:
    return row["diverged"] <= DIVERGED_TOLERANCE


def _best(rows: list[dict], metric: str = "fid_test") -> dict | None:
    """The row with the lowest ``metric`` among the :func:`_sound` ones: a sampler that blows images up does not win a
    cell by the FID of the rest (at high guidance those rows score a *lower* test FID: fewer images carry the guidance)."""
    rows = [r for r in rows if _sound(r)]
    return min(rows, key=lambda r: r[metric]) if rows else None


def targets(data: dict) -> dict:
    """The issue's targets, evaluated on the JSON: high guidance / low NFE against diffusers, guidance 1, PLMS
    divergence, scheduler overhead. Rows with diverged images never count as a cell's best (:func:`_best`)."""
    import math

    high = [(g, k) for g in data["guidance"] if g >= 6 for k in data["nfe"] if k <= 10]
    fast = sorted({r["sampler"] for r in data["rows"] if r["source"] == "fastdiff"})

    def best(g, k, source):
        return _best([r for r in data["rows"] if r["guidance"] == g and round(r["nfe"]) == k and r["source"] == source])

    def mean_ratio(sampler):  # geometric mean of FID / best diffusers FID over the high-guidance cells; inf if one diverges
        pairs = [(_cells(data, g).get(sampler, {}).get(k), best(g, k, "diffusers")) for g, k in high]
        if any(a is None or not _sound(a) for a, _ in pairs):
            return math.inf
        ratios = [a["fid_test"] / b["fid_test"] for a, b in pairs if b]
        return math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else math.inf

    ranked = sorted(fast, key=mean_ratio)
    champion = ranked[0] if ranked and math.isfinite(mean_ratio(ranked[0])) else None
    cells = []
    for g, k in high:
        f, d = best(g, k, "fastdiff"), best(g, k, "diffusers")
        c = _cells(data, g).get(champion, {}).get(k)
        plms = [r for r in data["rows"] if r["guidance"] == g and round(r["nfe"]) == k and r["sampler"] in ("PLMS", "PNDM (skip_prk, = PLMS)")]
        cells.append({"guidance": g, "nfe": k, "best_fastdiff": f and f["sampler"], "best_fastdiff_fid": f and f["fid_test"],
                      "best_diffusers": d and d["sampler"], "best_diffusers_fid": d and d["fid_test"],
                      "champion_fid": c["fid_test"] if c else None, "champion_diverged": c["diverged"] if c else None,
                      "plms_diverged": max((r["diverged"] for r in plms), default=0.0)})  # fmt: skip
    guidance1 = []
    for k in data["nfe"]:
        top = _best([r for r in data["rows"] if r["guidance"] == 1.0 and round(r["nfe"]) == k])
        if top:
            c = _cells(data, 1.0).get(champion, {}).get(k)
            guidance1.append({"nfe": k, "best_fid": top["fid_test"], "champion_fid": c["fid_test"] if c else None})
    overhead = max((r["ratio_to_forward"] for r in data["overhead"]["rows"] if r["source"] == "fastdiff"), default=0.0)
    return {"champion": champion, "high_guidance": cells, "guidance_1": guidance1, "max_fastdiff_overhead": overhead}


def render_samplers(data: dict) -> list[str]:
    from fastdiff.bench.common import fmt as _fmt
    from fastdiff.bench.oracle import render_samplers_oracle as _render_samplers_oracle

    n, ref = data["num_samples"], data["reference"]
    lines = [
        "## Samplers",
        "",
        f"All in one run of `fastdiff bench samplers`: the shipped Fashion-MNIST teacher, {n} images per cell with the same",
        "per-image seeds everywhere, classifier-free guidance w; NFE = model evaluations per image (a guided call counts once;",
        "PLMS/S-PNDM/PNDM spend one extra evaluation on their warm-up and F-PNDM nine, so they run fewer steps at equal NFE).",
        "Each cell: **domain FID against the test split** / FID against the teacher's converged samples at the same guidance",
        f"({ref[next(iter(ref))]['sampler']} at {ref[next(iter(ref))]['nfe']:g} NFE, same seeds); `†p%`: share of images that",
        "diverged (peak |x| before clipping above max(1.5, twice the converged image's)). Lowest test FID per column among the",
        "samplers with at most 1% diverged images in bold: at w > 1 a sampler that diverges or under-converges scores a *lower* test",
        "FID than the converged samples (its images carry less guidance), so the FID to the converged samples is the measure",
        "of solving the model's ODE.",
        "",
        "![FID vs NFE per guidance scale](benchmarks/samplers_fid_vs_nfe.png)",
        "",
    ]
    for g in data["guidance"]:
        cells = _cells(data, g)
        r0 = ref[str(g)]
        lines += [f"**Guidance {g:g}** -- converged samples: test FID {_fmt(r0['fid_test'])}, out of [-1.5, 1.5] "
                  f"before clipping: {r0['out_of_range']:.0%}", "",
                  "| sampler | " + " | ".join(f"NFE {k}" for k in data["nfe"]) + " |",
                  "|---|" + "---|" * len(data["nfe"])]  # fmt: skip
        best = {k: _best([c[k] for c in cells.values() if k in c]) for k in data["nfe"]}
        for sampler, row in cells.items():
            src = row[next(iter(row))]["source"]
            parts = []
            for k in data["nfe"]:
                if k not in row:
                    parts.append("-")
                    continue
                r = row[k]
                text = f"{_fmt(r['fid_test'])} / {_fmt(r['fid_converged'])}" + (f" †{r['diverged']:.0%}" if r["diverged"] > 0 else "")
                parts.append(f"**{text}**" if r is best[k] else text)
            lines.append(f"| {sampler} ({src}) | " + " | ".join(parts) + " |")
        lines.append("")
    lines += _render_targets(data)
    ov = data["overhead"]
    lines += ["", f"Per-step cost of each scheduler (batch {ov['batch']}, mean over a 10-step run) against one teacher forward "
              f"on the same batch ({ov['teacher_forward_ms']:.0f} ms):", "", "| scheduler | source | ms per step | share of a forward |",
              "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['scheduler']} | {r['source']} | {r['step_ms']:.2f} | {r['ratio_to_forward']:.2%} |" for r in ov["rows"]]
    return lines + [""] + _render_optimised(data) + _render_samplers_oracle(data["oracle"])


def _beats(a: float | None, b: float | None) -> bool:
    """``a`` (a FID, ``None``: no row without diverged images) is lower than ``b``."""
    return a is not None and (b is None or a < b)


def _named(name: str | None, fid: float | None) -> str:
    from fastdiff.bench.common import fmt as _fmt

    return f"{name} {_fmt(fid)}".strip() if fid is not None else "- (every row diverged)" if name is None else "-"


def _render_targets(data: dict) -> list[str]:
    from fastdiff.bench.common import fmt as _fmt

    t = targets(data)
    hi = t["high_guidance"]
    wins = sum(_beats(c["best_fastdiff_fid"], c["best_diffusers_fid"]) for c in hi)
    champ_wins = sum(c["champion_diverged"] is not None and c["champion_diverged"] <= DIVERGED_TOLERANCE and _beats(c["champion_fid"], c["best_diffusers_fid"]) for c in hi)
    plms_div = [c for c in hi if c["plms_diverged"] > 0]
    safe = sum(c["champion_diverged"] == 0 for c in plms_div)
    close = [c for c in t["guidance_1"] if c["champion_fid"] is not None and c["champion_fid"] <= 1.05 * c["best_fid"]]
    lines = ["**Targets** (computed from this run):", "",
             f"- guidance >= 6, NFE <= 10, rows with at most {DIVERGED_TOLERANCE:.0%} diverged images: the best fastdiff sampler of each cell beats every diffusers scheduler in {wins} of "
             f"{len(hi)} cells; the best single fastdiff sampler over these cells, **{t['champion']}**, in {champ_wins} of {len(hi)}:",
             ""]  # fmt: skip
    lines += ["  | guidance | NFE | best fastdiff | best diffusers | " + f"{t['champion']} |", "  |---|---|---|---|---|"]
    lines += [f"  | {c['guidance']:g} | {c['nfe']} | {_named(c['best_fastdiff'], c['best_fastdiff_fid'])} | "
              f"{_named(c['best_diffusers'], c['best_diffusers_fid'])} | {_named('', c['champion_fid'])} |" for c in hi]  # fmt: skip
    lines += ["",
              f"- divergence: PLMS (fastdiff or diffusers) diverges in {len(plms_div)} of these cells; {t['champion']} has no "
              f"diverged image in {safe} of them.",
              f"- guidance 1: {t['champion']} within 5% of the best test FID at {len(close)} of {len(t['guidance_1'])} NFE budgets.",
              f"- scheduler overhead: at most {t['max_fastdiff_overhead']:.2%} of a teacher forward for fastdiff's schedulers (target < 2%)."]  # fmt: skip
    return lines


def optimised_targets(data: dict) -> dict | None:
    """Issue 17's targets on the optimised-schedule part of the JSON (``None`` before it ran): per (guidance, NFE) and
    per measure (test FID, the issue's; FID to the converged samples, the solver's accuracy), the best fastdiff solver on
    either schedule against diffusers' best on its default schedule and on the same optimised one, rows with diverged
    images left out (:func:`_best`); the recommended fastdiff setting: of the solver + schedule pairs with no diverged
    image in any cell (where none has that: none beyond :data:`DIVERGED_TOLERANCE`), the lowest geometric-mean FID to the
    converged samples (test FID rewards under-guided images; a thresholded setting pays for its clipped x0 estimates
    there, as the converged samples are not thresholded)."""
    import math

    opt = data.get("optimised") or {}
    if not opt.get("rows"):
        return None
    tuned_rows = opt["rows"] + opt.get("refined_rows", [])  # the DP's schedule, and the schedule fitted to each solver
    grid = [(g, k) for g in data["guidance"] for k in opt["nfe"]]

    def at(rows, g, k, source):
        return [r for r in rows if r["guidance"] == g and round(r["nfe"]) == k and r["source"] == source]

    def setting(r):
        return f"{r['sampler']}" + {"optimised": " + optimised schedule", "fitted": " + fitted schedule"}.get(r.get("schedule"), "")

    cells = []
    for g, k in grid:
        cell = {"guidance": g, "nfe": k}
        for metric in ("fid_test", "fid_converged"):
            f = _best(at(data["rows"], g, k, "fastdiff") + at(tuned_rows, g, k, "fastdiff"), metric)
            d, do = _best(at(data["rows"], g, k, "diffusers"), metric), _best(at(tuned_rows, g, k, "diffusers"), metric)
            cell[metric] = {"fastdiff": f and setting(f), "fastdiff_fid": f and f[metric], "diffusers": d and d["sampler"],
                            "diffusers_fid": d and d[metric], "diffusers_optimised": do and do["sampler"],
                            "diffusers_optimised_fid": do and do[metric]}  # fmt: skip
        cells.append(cell)
    scores: dict[str, list[dict]] = {}
    for r in data["rows"] + tuned_rows:
        if r["source"] == "fastdiff" and (r["guidance"], round(r["nfe"])) in grid:
            scores.setdefault(setting(r), []).append(r)
    sound = {name: rs for name, rs in scores.items() if len(rs) == len(grid) and all(map(_sound, rs))}
    never = {name: rs for name, rs in sound.items() if all(r["diverged"] == 0 for r in rs)}
    safe = never or sound  # the target is no diverged image at all; the tolerance only where no setting meets it
    recommended = min(safe, key=lambda name: sum(math.log(r["fid_converged"]) for r in safe[name])) if safe else None
    return {
        "cells": cells, "recommended": recommended, "recommended_rows": safe.get(recommended, []),
        "recommended_diverged": max((r["diverged"] for r in safe.get(recommended, [])), default=None),
        "never_diverge": sorted(safe), "none_diverged": bool(never),
        "calibration_seconds": {g: c["seconds"] for g, c in opt["calibration"].items()},
    }  # fmt: skip


def _fid_or_dash(row: dict, k: int, metric: str = "fid_test") -> str:
    from fastdiff.bench.common import fmt as _fmt

    return _fmt(row[k][metric]) if k in row else "-"


def _render_optimised(data: dict) -> list[str]:
    from fastdiff.bench.common import fmt as _fmt

    t = optimised_targets(data)
    if t is None:
        return []
    opt, cells = data["optimised"], t["cells"]
    secs = ", ".join(f"w={g}: {s:.0f} s" for g, s in t["calibration_seconds"].items())
    method = opt.get("method", "DP over DDIM local errors (GITS)")  # runs before the weighting recorded no method
    lines = ["### Optimised schedules", "",
             "The same solvers on the schedule `fastdiff schedule optimize` finds (dynamic programming over an 80-point Karras",
             f"grid against reference trajectories of 32 calibration noises: {method}; other noises than the evaluation's).",
             "One calibration per guidance scale serves every NFE and solver; its cost on this machine (one thread): " + secs + ".",
             "Each cell: test FID on the solver's default schedule -> on the optimised one / the same for the FID to the",
             "converged samples (same seeds as above).", ""]  # fmt: skip
    fits = [r["refined"]["seconds"] for r in opt.get("refined_rows", []) if "refined" in r]
    if fits:
        lines[-1:-1] = ["Rows *schedule fitted to it*: that DP schedule fitted to the solver itself (`--refine`: coordinate descent on the",
                        f"solver's end-to-end error against DPM-Solver++(2M) at 50 NFE on {REFINE[0]} calibration images, {REFINE[1]} sweeps), "
                        f"{min(fits):.0f}-{max(fits):.0f} s per (solver, NFE, guidance) on top of the calibration."]  # fmt: skip
    for g in data["guidance"]:
        default, tuned = _cells(data, g), {}
        for r in opt["rows"] + opt.get("refined_rows", []):
            if r["guidance"] == g:
                name = r["sampler"] + (", schedule fitted to it" if r.get("schedule") == "fitted" else "")
                tuned.setdefault(name, {})[round(r["nfe"])] = r
        lines += [f"**Guidance {g:g}**", "", "| sampler | " + " | ".join(f"NFE {k}" for k in opt["nfe"]) + " |",
                  "|---|" + "---|" * len(opt["nfe"])]  # fmt: skip
        for sampler, row in tuned.items():
            before = default.get(row[next(iter(row))]["sampler"], {})
            parts = [" / ".join(f"{_fid_or_dash(before, k, m)} -> {_fid_or_dash(row, k, m)}" for m in ("fid_test", "fid_converged"))
                     + (f" †{row[k]['diverged']:.0%}" if row.get(k, {}).get("diverged") else "") for k in opt["nfe"]]  # fmt: skip
            lines.append(f"| {sampler} ({row[next(iter(row))]['source']}) | " + " | ".join(parts) + " |")
        lines.append("")
    lines += [f"**Targets** (computed from this run; rows with more than {DIVERGED_TOLERANCE:.0%} diverged images never count as a cell's best):", ""]
    for metric, name in (("fid_test", "test FID (the issue's measure)"), ("fid_converged", "FID to the converged samples")):
        won = [c[metric] for c in cells]
        beat_default = sum(_beats(c["fastdiff_fid"], c["diffusers_fid"]) for c in won)
        beat_tuned = sum(_beats(c["fastdiff_fid"], c["diffusers_optimised_fid"]) for c in won)
        lines.append(f"- by {name}: fastdiff's best (solver + schedule) beats every diffusers scheduler on its default schedule in "
                     f"{beat_default} of {len(won)} cells (target: all), and diffusers' best on the same optimised schedule in "
                     f"{beat_tuned} of {len(won)} (target: 12 of 16);")  # fmt: skip
    rec = {(r["guidance"], round(r["nfe"])): r for r in t["recommended_rows"]}
    worst = t["recommended_diverged"]
    among = "no diverged image in any cell" if t.get("none_diverged") else f"at most {DIVERGED_TOLERANCE:.0%} diverged images in every cell"
    lines += [f"- recommended setting (of the {len(t['never_diverge'])} fastdiff settings with {among}, "
              f"the lowest geometric-mean FID to the converged samples): **{t['recommended']}**; its worst cell: "
              + (f"{worst:.1%} diverged images (target: none)" if worst is not None else "-") + ";", "",
              "  | guidance | NFE | best fastdiff (test FID) | best diffusers, default | best diffusers, optimised | "
              "best fastdiff (FID to converged) | best diffusers, default | best diffusers, optimised | recommended: test / converged |",
              "  |---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in cells:
        parts = [f"{_named(m['fastdiff'], m['fastdiff_fid'])} | {_named(m['diffusers'], m['diffusers_fid'])} | "
                 f"{_named(m['diffusers_optimised'], m['diffusers_optimised_fid'])}" for m in (c["fid_test"], c["fid_converged"])]
        r = rec.get((c["guidance"], c["nfe"]))
        lines.append(f"  | {c['guidance']:g} | {c['nfe']} | " + " | ".join(parts) + " | "
                     + (f"{_fmt(r['fid_test'])} / {_fmt(r['fid_converged'])}" if r else "-") + " |")  # fmt: skip
    return lines + [""]


def plot_samplers(data: dict, path: Path) -> Path:
    """Test FID (top) and FID to the converged samples (bottom) against NFE, one column per guidance scale."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: the caller's plotting backend stays as it is

    gs = data["guidance"]
    names = list(dict.fromkeys(r["sampler"] for r in data["rows"]))
    colors = {name: colormaps["tab20"](i % 20) for i, name in enumerate(names)}  # one colour per sampler
    fig = Figure(figsize=(4 * len(gs), 7), dpi=110)
    axes = fig.subplots(2, len(gs), squeeze=False)
    for j, g in enumerate(gs):
        for sampler, row in _cells(data, g).items():
            pts = sorted((r["nfe"], r["fid_test"], r["fid_converged"]) for r in row.values())
            style = "-" if row[next(iter(row))]["source"] == "fastdiff" else "--"
            for ax, k in ((axes[0, j], 1), (axes[1, j], 2)):
                ax.plot([p[0] for p in pts], [p[k] for p in pts], style, marker=".", color=colors[sampler], label=sampler)
        axes[0, j].axhline(data["reference"][str(g)]["fid_test"], color="gray", ls=":", label="converged (50 NFE)")
        axes[0, j].set(title=f"guidance {g:g}", ylabel="FID vs test split", yscale="log")
        axes[1, j].set(xlabel="NFE", ylabel="FID vs converged samples", yscale="log")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path)
    return path
