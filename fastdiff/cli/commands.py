"""The commands behind ``fastdiff COMMAND``: each reads its parsed arguments, calls library functions and prints
what they wrote. Computation lives in the library (``fastdiff.pipelines.runs``, ``fastdiff.eval.records``,
``fastdiff.samplers.table``, ``fastdiff.cache.files``, ``fastdiff.bench``), so a script gets the same results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastdiff.errors import InputError

__all__ = ["cmd_info", "cmd_train", "cmd_sample", "cmd_cache", "cmd_fid", "cmd_quickstart", "cmd_bench", "cmd_schedule", "cmd_data"]


def _int_list(text: str, name: str) -> list[int]:
    """``"0,7,9"`` -> ``[0, 7, 9]``, or an error naming the option."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"{name} must be comma-separated integers, e.g. 0,7,9; got {text!r}") from None


def _write_json(path: str | None, record: dict) -> None:
    """Write ``record`` as JSON to ``path`` (when given) and say so."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")


def _print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain aligned table (numbers to 4 significant digits)."""
    cells = [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _settings(args: argparse.Namespace):
    """The sampling settings of ``--num-samples --steps --guidance --seed --batch-size``."""
    from fastdiff.pipelines.runs import SampleSettings

    return SampleSettings(args.num_samples, args.steps, args.guidance, args.seed, args.batch_size)


def cmd_info(args: argparse.Namespace) -> None:
    """Versions and the time convention."""
    from importlib.metadata import version

    import fastdiff

    print(f"fastdiff {fastdiff.__version__}  torch {version('torch')}  diffusers {version('diffusers')}")
    print("time convention: x_t = s(t) * (x0 + sigma * eps); samplers work on x = x0 + sigma * eps, indexed by sigma")
    from fastdiff.machine import cpu_summary

    print(cpu_summary())


def cmd_train(args: argparse.Namespace) -> None:
    """Run a training recipe (YAML) with dotted overrides: a teacher (``objective: denoising``), a consistency
    student (``objective: ict | ilct | cd | scott | dmd2 | f_distill | ctm | reflow``) or a Stable Diffusion LoRA (``objective: lcm-lora |
    scott-lora | dmd2-lora``)."""
    from fastdiff.training.config import load_config, recipe_objective
    from fastdiff.training.distill import DistillRecipe, run_distill
    from fastdiff.training.teacher import TeacherRecipe, train_teacher
    from fastdiff.training.trainer import TrainingStopped

    if args.lpips_weights and recipe_objective(args.recipe) != "ctm":
        raise InputError(f"--lpips-weights is for CTM recipes (objective: ctm); {args.recipe} is objective "
                         f"{recipe_objective(args.recipe)}")  # fmt: skip
    try:
        if recipe_objective(args.recipe) == "denoising":
            recipe = load_config(TeacherRecipe, args.recipe, args.set)
            print(f"saved {train_teacher(recipe, resume=args.resume, progress=not args.no_progress)}")
            return
        if recipe_objective(args.recipe) in ("lcm-lora", "scott-lora", "dmd2-lora"):
            from fastdiff.training.sd_lora import SDLoRARecipe, run_sd_lora

            print(f"saved {run_sd_lora(load_config(SDLoRARecipe, args.recipe, args.set), args.resume, not args.no_progress)}")
            return
        lpips = [f"ctm.lpips_weights={args.lpips_weights}"] if args.lpips_weights else []
        recipe = load_config(DistillRecipe, args.recipe, [*args.set, *lpips])
        print(f"saved {run_distill(recipe, resume=args.resume, progress=not args.no_progress)}")
    except TrainingStopped as err:
        print(f"fastdiff train: stopped: {err}", file=sys.stderr)
        raise SystemExit(3) from None


def cmd_pairs(args: argparse.Namespace) -> None:
    """Make (or finish) reflow's training pairs from a teacher (:func:`fastdiff.training.pairs.generate_pairs`)."""
    from fastdiff.training.pairs import generate_pairs, load_pairs

    out = generate_pairs(args.teacher, args.out, args.num, args.scheduler, args.steps, args.guidance, args.seed, args.shard_size,
                         progress=not args.no_progress)  # fmt: skip
    manifest = load_pairs(out)[3]
    print(f"{out}: {manifest['num']} pairs from {manifest['teacher']} ({manifest['scheduler_class']}, {manifest['steps']} steps = "
          f"{manifest['nfe']:g} NFE), {manifest['minutes']:.1f} minutes")  # fmt: skip


def cmd_sample(args: argparse.Namespace) -> None:
    """Sample a pipeline: a preview grid PNG (at most ``--preview`` images) and every image in an .npz."""
    from fastdiff.eval.assets import pipeline_path
    from fastdiff.pipelines.runs import check_out_folder, cycle_labels, draw, open_pipeline, save_samples

    check_out_folder(args.out, args.overwrite)
    if args.preview < 1:  # before sampling, not after
        raise InputError(f"--preview must be >= 1 (images in grid.png); got {args.preview}")
    labels = cycle_labels(_int_list(args.classes, "--classes"), args.num_samples) if args.classes else None
    schedule = None
    if args.schedule:  # checked before the pipeline loads
        from fastdiff.pipelines.schedule_files import check_schedule, read_schedule

        schedule = read_schedule(args.schedule)
        check_schedule(schedule, args.pipeline, args.scheduler, args.steps, args.schedule)
    pipe = open_pipeline(pipeline_path(args.pipeline), args.scheduler, args.cache)
    settings = _settings(args)
    samples = draw(pipe, settings, labels, progress=not args.no_progress, schedule=schedule)
    scheduler = type(pipe.scheduler).__name__
    grid, npz = save_samples(samples, args.out, settings, scheduler, nrow=args.nrow, scale=args.scale, preview=args.preview)
    shown = min(args.preview, args.num_samples)
    print(f"wrote {grid} (the first {shown}) and {npz} ({args.num_samples} images, {scheduler}, {args.steps} steps = {samples.nfe:g} NFE)")


def cmd_cache(args: argparse.Namespace) -> None:
    """Fit a TeaCache-style polynomial, or train a HarmoniCa router, for a pipeline's model and sampler."""
    from fastdiff.cache import RouterConfig, calibrate, train_router
    from fastdiff.cache.files import refuse_overwrite, router_record_path, save_calibration, save_router
    from fastdiff.eval.assets import pipeline_path
    from fastdiff.pipelines.runs import open_pipeline

    out = Path(args.out)
    if args.action == "calibrate":
        refuse_overwrite([out], args.overwrite)
        pipe = open_pipeline(pipeline_path(args.pipeline), args.scheduler)
        fit = calibrate(pipe, args.steps, degree=args.degree, generations=args.generations, batch=args.batch_size, seed=args.seed)
        save_calibration(fit, out)
        print(f"wrote {out}: degree {fit['degree']} polynomial, R^2 {fit['r2']:.3f} over {len(fit['probe_change'])} steps")
        print(f"use it: fastdiff sample --cache threshold:0.1:{out} ...  or  load_calibration('{out}', threshold=0.1)")
        return
    refuse_overwrite([out, router_record_path(out)], args.overwrite)
    cfg = RouterConfig(steps=args.steps, iterations=args.iterations, batch_size=args.batch_size, beta=args.beta, forecast=args.forecast,
                       init_every=args.init_every, guidance_scale=args.guidance, granularity=args.granularity, seed=args.seed)  # fmt: skip
    pipe = open_pipeline(pipeline_path(args.pipeline), args.scheduler)
    router, record = train_router(pipe, cfg, progress=not args.no_progress)
    record_path = save_router(router, record, out)
    print(f"wrote {out} (router) and {record_path} (training record): {record['computed'][-1]:.0%} of the routed units compute "
          f"at threshold {cfg.threshold}; use it: fastdiff sample --cache router:{out} --steps {cfg.steps} ...")


def cmd_fid(args: argparse.Namespace) -> None:
    """FID (and KID, precision/recall) between two sources, or a pipeline sampled on the fly and a reference."""
    from fastdiff.eval.extractors import load_extractor
    from fastdiff.eval.records import check_fid_sources, score_fid

    check_fid_sources(args.sources, bool(args.pipeline))
    extractor = load_extractor(args.extractor, args.inception_weights)
    result = score_fid(args.sources, extractor, args.pipeline, args.scheduler, _settings(args), args.kid, args.pr, args.size,
                       use_cache=not args.no_cache, progress=not args.no_progress)  # fmt: skip
    record = result.record
    _print_table([{"metric": k, "value": v} for k, v in record["metrics"].items()], ["metric", "value"])
    print(f"extractor {extractor.name} (sha256 {extractor.weights_sha256[:12]}, resize: {extractor.resize}); "
          f"{record['num_generated']} generated vs {record['num_reference']} reference ({record['reference']['source']})")
    if args.save_stats:
        result.generated.save(args.save_stats)
        print(f"wrote {args.save_stats}")
    _write_json(args.json, record)


def quickstart_config(args: argparse.Namespace):
    """The :class:`~fastdiff.quickstart.QuickstartConfig` of ``fastdiff quickstart``'s options (no option: its defaults)."""
    from fastdiff.quickstart import QuickstartConfig

    cfg = QuickstartConfig(teacher=args.teacher, num_samples=args.num_samples, guidance_scale=args.guidance,
                           seed=args.seed, out=args.out, optimised=not args.no_optimised_schedules)  # fmt: skip
    if args.steps:
        cfg.steps = tuple(_int_list(args.steps, "--steps"))
    if args.cache:
        cfg.cache = None if args.cache == "none" else args.cache
    if args.student:
        cfg.student = None if args.student == "none" else args.student
    return cfg


def cmd_quickstart(args: argparse.Namespace) -> None:
    """FID against NFE of the shipped teacher with diffusers' schedulers, its cache and its student; a table, grids, a plot."""
    from fastdiff.quickstart import run_quickstart

    cfg = quickstart_config(args)
    record = run_quickstart(cfg, progress=not args.no_progress)
    print(f"\n{cfg.teacher} teacher, domain FID vs {record['reference']}, {cfg.num_samples} samples, "
          f"guidance {cfg.guidance_scale:g}, seed {cfg.seed}")
    _print_table(record["rows"], ["sampler", "steps", "nfe", "fid", "seconds", "speedup", "fid_gain"])
    print(f"optimised schedules: {record['optimised_schedules']}")
    print(f"wrote {cfg.out}/quickstart.json, {cfg.out}/fid_vs_nfe.png, {cfg.out}/grid.png")


def cmd_bench(args: argparse.Namespace) -> None:
    """Run a benchmark: JSON in ``--out``, tables regenerated in ``--report`` and ``--readme``'s marked section."""
    from fastdiff.bench import run_bench, write_report

    if args.name == "report":
        print(f"wrote {write_report(Path(args.out), Path(args.report), Path(args.readme))}")
        return
    from fastdiff.training.trainer import TrainingStopped

    try:
        path = run_bench(args.name, args.quick, progress=not args.no_progress, out_dir=Path(args.out), report=Path(args.report),
                         readme=Path(args.readme), recipes=Path(args.recipes), resume=args.resume, shard=args.shard, rows=args.rows,
                         finished_only=args.finished_only)  # fmt: skip
    except TrainingStopped as err:  # a training of the benchmark: its checkpoint is written, --resume continues it
        print(f"fastdiff bench: stopped: {err} (the benchmark: rerun it with --resume)", file=sys.stderr)
        raise SystemExit(3) from None
    print(f"wrote {path}" if path else f"shard {args.shard[0]}/{args.shard[1]} done; its cells are in {args.out}/{args.name}.partial.jsonl")


def cmd_schedule(args: argparse.Namespace) -> None:
    """Print the timestep / sigma grid a diffusers scheduler config gives at N steps, in fastdiff's convention."""
    from fastdiff.samplers.table import load_scheduler_config, schedule_table

    rows = schedule_table(load_scheduler_config(args.config), args.steps, args.spacing, args.mu)
    print(f"{'step':>4} {'timestep':>10} {'sigma':>12} {'scale s':>10}")
    for r in rows:
        print(f"{r['step']:>4} {r['timestep']:>10.3f} {r['sigma']:>12.6g} {r['scale']:>10.6f}")


def _schedule_outputs(args: argparse.Namespace) -> dict[int, Path]:
    """Step count -> output file of ``schedule optimize``, refused before any work where one would be overwritten."""
    steps = list(dict.fromkeys(args.steps))
    if len(steps) > 1 and "{steps}" not in args.out:
        raise InputError(f"several --steps ({', '.join(map(str, steps))}) need {{steps}} in --out, e.g. schedule-{{steps}}.json; got {args.out}")
    outs = {n: Path(args.out.replace("{steps}", str(n))) for n in steps}
    existing = [str(p) for p in outs.values() if p.exists()]
    if existing and not args.overwrite:
        raise InputError(f"{', '.join(existing)} already exists; pass --overwrite or another --out")
    return outs


def cmd_schedule_optimize(args: argparse.Namespace) -> None:
    """Optimise the schedules of a pipeline, solver and guidance for one or more step counts (one calibration serves
    them all); write each as JSON."""
    from fastdiff.eval.assets import pipeline_path
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.pipelines.sampling import make_scheduler
    from fastdiff.pipelines.schedule_files import calibrate_pipeline, check_steps, refine_schedule, schedule_from_calibration, write_schedule

    outs = _schedule_outputs(args)
    check_steps(list(outs), args.fine)
    pipe = load_pipeline(pipeline_path(args.pipeline))
    config = dict(pipe.scheduler.config)  # the pipeline's own: --refine builds its solvers from it
    pipe.scheduler = make_scheduler(args.scheduler, config)
    calibration = calibrate_pipeline(pipe, args.guidance, args.samples, args.seed, args.fine, progress=not args.no_progress,
                                     sigma_data=args.sigma_data)  # fmt: skip
    for n, out in outs.items():
        record = schedule_from_calibration(pipe, calibration, args.pipeline, args.scheduler, n)
        if args.refine:
            record = refine_schedule(pipe, calibration, record, config=config, progress=not args.no_progress)
            r = record["calibration"]["refined"]
            print(f"refined for {args.scheduler}: end-to-end error {r['dp_error']:.4g} -> {r['error']:.4g} ({r['seconds']:.1f} s)")
        path = write_schedule(record, out)
        print(f"wrote {path}: {n} steps for {args.scheduler} on {args.pipeline} (guidance {args.guidance:g}), "
              f"sigmas {', '.join(f'{s:.4g}' for s in record['sigmas'])}")  # fmt: skip
    print(f"calibration: {calibration['samples']} samples on {calibration['fine_points']} fine points, {calibration['seconds']:.1f} s")


def cmd_data(args: argparse.Namespace) -> None:
    """Summarise a dataset and optionally write a grid of its first images."""
    from fastdiff.datasets import load_dataset
    from fastdiff.eval.records import dataset_summary

    ds = load_dataset(args.name, args.split, args.root, args.size, args.channels, args.labels, args.seed)
    s = dataset_summary(ds)
    print(f"{s['name']}: {s['items']} items of shape {s['shape']}, values in [{s['min']:.3f}, {s['max']:.3f}], "
          f"{s['num_classes']} classes {s['counts']}")
    if args.grid:
        if ds.data.ndim != 4:
            raise InputError(f"{args.name} holds 2-D points, not images; --grid needs an image dataset")
        from fastdiff.images import save_grid

        print(f"wrote {save_grid(ds.data[: args.num], args.grid, scale=4)}")
