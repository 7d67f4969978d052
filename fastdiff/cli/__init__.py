"""The ``fastdiff`` command line.

Bad input (a missing file, an unknown name, a value out of range) ends with a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fastdiff.datasets import DATASETS
from fastdiff.errors import InputError


def _int_list(text: str, name: str) -> list[int]:
    """``"0,7,9"`` -> ``[0, 7, 9]``, or an error naming the option."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"{name} must be comma-separated integers, e.g. 0,7,9; got {text!r}") from None


def _load_scheduler_config(path: str) -> dict:
    """A diffusers scheduler config from a JSON file, a scheduler folder or a pipeline folder."""
    p = Path(path)
    for candidate in (p, p / "scheduler_config.json", p / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise InputError(f"{candidate} is not valid JSON: {err}") from None
    raise InputError(f"no scheduler config at {p} (looked for the file, scheduler_config.json and scheduler/scheduler_config.json)")


def cmd_schedule(args: argparse.Namespace) -> None:
    """Print the timestep / sigma grid a diffusers scheduler config gives at N steps, in fastdiff's convention."""
    from fastdiff.samplers.grids import grid_from_config
    from fastdiff.schedules import schedule_from_config

    if args.steps < 1:
        raise InputError(f"--steps must be >= 1; got {args.steps}")
    config = _load_scheduler_config(args.config)
    if args.spacing:
        config["timestep_spacing"] = args.spacing
    schedule = schedule_from_config(config)
    grid = grid_from_config(schedule, config, args.steps, mu=getattr(args, "mu", None))
    timesteps, sigmas = grid.timesteps, grid.sigmas[:-1]
    print(f"{'step':>4} {'timestep':>10} {'sigma':>12} {'scale s':>10}")
    for i, (t, s) in enumerate(zip(timesteps.tolist(), sigmas.tolist())):
        scale = schedule.scale(torch.tensor(s, dtype=torch.float64)).item()
        print(f"{i:>4} {t:>10.3f} {s:>12.6g} {scale:>10.6f}")


def cmd_data(args: argparse.Namespace) -> None:
    """Summarise a dataset and optionally write a grid of its first images."""
    from fastdiff.datasets import load_dataset

    ds = load_dataset(args.name, args.split, args.root, args.size, args.channels, args.labels, args.seed)
    counts = torch.bincount(ds.labels, minlength=ds.num_classes).tolist()
    print(f"{ds.name}: {len(ds)} items of shape {tuple(ds.data.shape[1:])}, values in "
          f"[{ds.data.min().item():.3f}, {ds.data.max().item():.3f}], {ds.num_classes} classes {counts}")
    if args.grid:
        if ds.data.ndim != 4:
            raise InputError(f"{args.name} holds 2-D points, not images; --grid needs an image dataset")
        from fastdiff.images import save_grid

        print(f"wrote {save_grid(ds.data[: args.num], args.grid, scale=4)}")


def cmd_train(args: argparse.Namespace) -> None:
    """Run a training recipe (YAML) with dotted overrides: a teacher (``objective: denoising``), a consistency
    student (``objective: ict | ilct | cd``) or an LCM-LoRA adapter (``objective: lcm-lora``)."""
    from fastdiff.training.config import load_config, recipe_objective
    from fastdiff.training.distill import DistillRecipe, run_distill
    from fastdiff.training.teacher import TeacherRecipe, train_teacher
    from fastdiff.training.trainer import TrainingStopped

    if recipe_objective(args.recipe) == "denoising":
        if args.resume:
            raise InputError("--resume applies to consistency recipes; teacher recipes continue with train.init_from")
        recipe = load_config(TeacherRecipe, args.recipe, args.set)
        print(f"saved {train_teacher(recipe, progress=not args.no_progress)}")
        return
    try:
        if recipe_objective(args.recipe) == "lcm-lora":
            from fastdiff.training.lcm_lora import LCMLoRARecipe, run_lcm_lora

            print(f"saved {run_lcm_lora(load_config(LCMLoRARecipe, args.recipe, args.set), args.resume, not args.no_progress)}")
            return
        recipe = load_config(DistillRecipe, args.recipe, args.set)
        print(f"saved {run_distill(recipe, resume=args.resume, progress=not args.no_progress)}")
    except TrainingStopped as err:
        print(f"fastdiff train: stopped: {err}", file=sys.stderr)
        raise SystemExit(3) from None


def _write_json(path: str | None, record: dict) -> None:
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


def cmd_fid(args: argparse.Namespace) -> None:
    """FID (and KID, precision/recall) between two sources, or a pipeline sampled on the fly and a reference."""
    import fastdiff
    from fastdiff.eval.sources import compare, load_source, source_features
    from fastdiff.eval.extractors import load_extractor
    from fastdiff.eval.metrics import FeatureSet

    expected = 1 if args.pipeline else 2
    if len(args.sources) != expected:
        raise InputError(
            "give two sources (GENERATED REFERENCE)" if expected == 2 else "with --pipeline give one source: the REFERENCE"
        )
    extractor = load_extractor(args.extractor, args.inception_weights)
    channels = extractor.image_shape[0] if extractor.image_shape else 3
    record: dict = {"extractor": extractor.name, "weights_sha256": extractor.weights_sha256, "resize": extractor.resize}
    ref = load_source(args.sources[-1], channels, args.size)
    if args.pipeline:
        samples, record["generated"] = _sample_for_fid(args, extractor)
        gen = FeatureSet.from_features(_features(extractor, samples.images, args))
    else:
        src = load_source(args.sources[0], channels, args.size)
        if src.stats is not None:
            raise InputError(f"{args.sources[0]}: the generated side must be images, not statistics")
        gen = source_features(src, extractor, use_cache=False, progress=not args.no_progress)
        record["generated"] = {"source": src.description}
    reference = source_features(ref, extractor, use_cache=not args.no_cache, progress=not args.no_progress)
    record["reference"] = {"source": ref.description, "content_sha256": ref.content_sha256}
    record["num_generated"], record["num_reference"] = gen.n, reference.n
    record["seed"] = args.seed
    record["metrics"] = compare(gen, reference, args.kid, args.pr, seed=args.seed)
    record["fastdiff"] = fastdiff.__version__
    _print_table([{"metric": k, "value": v} for k, v in record["metrics"].items()], ["metric", "value"])
    print(f"extractor {extractor.name} (sha256 {extractor.weights_sha256[:12]}, resize: {extractor.resize}); "
          f"{gen.n} generated vs {reference.n} reference ({ref.description})")
    if args.save_stats:
        gen.save(args.save_stats)
        print(f"wrote {args.save_stats}")
    _write_json(args.json, record)


def _features(extractor, images, args):
    from fastdiff.eval.metrics import extract_features

    return extract_features(extractor, images, progress=not args.no_progress, desc="generated")


def _sample_for_fid(args: argparse.Namespace, extractor):
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.pipelines.sampling import make_scheduler, sample_pipeline

    pipe = load_pipeline(args.pipeline)
    if extractor.image_shape is not None and tuple(pipe.image_shape) != extractor.image_shape:
        raise InputError(f"the pipeline makes images {tuple(pipe.image_shape)}; the {extractor.name} extractor takes {extractor.image_shape}")
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    samples = sample_pipeline(
        pipe, args.num_samples, args.steps, args.guidance, args.seed, args.batch_size, progress=not args.no_progress
    )
    info = {"pipeline": args.pipeline, "scheduler": type(pipe.scheduler).__name__, "steps": args.steps,
            "nfe": samples.nfe, "guidance_scale": args.guidance, "num_samples": args.num_samples}  # fmt: skip
    return samples, info


def cmd_sample(args: argparse.Namespace) -> None:
    """Sample a grid PNG and an .npz from a pipeline."""
    import numpy as np

    from fastdiff.images import save_grid, to_uint8
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.pipelines.sampling import make_scheduler, sample_pipeline

    out = Path(args.out)
    targets = [out / "grid.png", out / "samples.npz"]
    if any(p.exists() for p in targets) and not args.overwrite:
        raise InputError(f"{out} already holds grid.png / samples.npz; pass --overwrite or another --out")
    pipe = load_pipeline(args.pipeline)
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    if args.cache:
        from fastdiff.cache import apply_cache_spec, cached_model

        apply_cache_spec(cached_model(pipe), args.cache)
    labels = None
    if args.classes:
        labels = torch.tensor(_int_list(args.classes, "--classes"))
        labels = labels.repeat((args.num_samples + len(labels) - 1) // len(labels))[: args.num_samples]
    samples = sample_pipeline(pipe, args.num_samples, args.steps, args.guidance, args.seed, args.batch_size, labels,
                              progress=not args.no_progress)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    save_grid(samples.images, out / "grid.png", nrow=args.nrow, scale=args.scale)
    np.savez(out / "samples.npz", images=to_uint8(samples.images), class_labels=samples.labels.numpy(),
             seed=np.array(args.seed), steps=np.array(args.steps), guidance_scale=np.array(args.guidance),
             scheduler=np.array(type(pipe.scheduler).__name__), nfe=np.array(samples.nfe))  # fmt: skip
    print(f"wrote {out / 'grid.png'} and {out / 'samples.npz'} ({args.num_samples} images, "
          f"{type(pipe.scheduler).__name__}, {args.steps} steps = {samples.nfe:g} NFE)")


def _pipeline_for_cache(args: argparse.Namespace):
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.eval.assets import TEACHERS, teacher_path
    from fastdiff.pipelines.sampling import make_scheduler

    pipe = load_pipeline(teacher_path(args.pipeline) if args.pipeline in TEACHERS else args.pipeline)
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, dict(pipe.scheduler.config))
    return pipe


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise InputError(f"{', '.join(existing)} already exist(s); pass --overwrite or another --out")


def cmd_cache(args: argparse.Namespace) -> None:
    """Fit a TeaCache-style polynomial, or train a HarmoniCa router, for a pipeline's model and sampler."""
    from fastdiff.cache import RouterConfig, calibrate, train_router

    out = Path(args.out)
    if args.action == "calibrate":
        _refuse_overwrite([out], args.overwrite)
        pipe = _pipeline_for_cache(args)
        fit = calibrate(pipe, args.steps, degree=args.degree, generations=args.generations, batch=args.batch_size, seed=args.seed)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(fit, indent=1) + "\n")
        print(f"wrote {out}: degree {fit['degree']} polynomial, R^2 {fit['r2']:.3f} over {len(fit['probe_change'])} steps")
        print(f"use it: fastdiff sample --cache threshold:0.1:{out} ...  or  load_calibration('{out}', threshold=0.1)")
        return
    record_path = out.with_name(out.stem + "_training.json")  # never the router file itself
    _refuse_overwrite([out, record_path], args.overwrite)
    cfg = RouterConfig(steps=args.steps, iterations=args.iterations, batch_size=args.batch_size, beta=args.beta, forecast=args.forecast,
                       init_every=args.init_every, guidance_scale=args.guidance, granularity=args.granularity, seed=args.seed)  # fmt: skip
    pipe = _pipeline_for_cache(args)
    router, record = train_router(pipe, cfg, progress=not args.no_progress)
    router.save(out)
    record_path.write_text(json.dumps({"config": router.meta, "model": router.model, **record}, indent=1) + "\n")
    computed = record["computed"][-1]
    print(f"wrote {out} (router) and {record_path} (training record): {computed:.0%} of the routed units compute "
          f"at threshold {cfg.threshold}; use it: fastdiff sample --cache router:{out} --steps {cfg.steps} ...")


def cmd_quickstart(args: argparse.Namespace) -> None:
    """FID against NFE of the shipped teacher with diffusers' schedulers; a table, a grid and a plot."""
    from fastdiff.quickstart import QuickstartConfig, run_quickstart

    cfg = QuickstartConfig(teacher=args.teacher, num_samples=args.num_samples, guidance_scale=args.guidance,
                           seed=args.seed, out=args.out)  # fmt: skip
    if args.steps:
        cfg.steps = tuple(_int_list(args.steps, "--steps"))
    if args.cache:
        cfg.cache = None if args.cache == "none" else args.cache
    record = run_quickstart(cfg, progress=not args.no_progress)
    print(f"\n{cfg.teacher} teacher, domain FID vs {record['reference']}, {cfg.num_samples} samples, "
          f"guidance {cfg.guidance_scale:g}, seed {cfg.seed}")
    _print_table(record["rows"], ["sampler", "steps", "nfe", "fid", "seconds", "speedup"])
    print(f"wrote {cfg.out}/quickstart.json, {cfg.out}/fid_vs_nfe.png, {cfg.out}/grid.png")


def cmd_bench(args: argparse.Namespace) -> None:
    """Run a benchmark: JSON in benchmarks/, tables regenerated in BENCHMARKS.md."""
    from fastdiff.bench import run_bench, write_report

    if args.name == "report":
        print(f"wrote {write_report()}")
        return
    print(f"wrote {run_bench(args.name, args.quick, progress=not args.no_progress)}")


def cmd_info(args: argparse.Namespace) -> None:
    """Versions and the time convention."""
    import diffusers

    import fastdiff

    print(f"fastdiff {fastdiff.__version__}  torch {torch.__version__}  diffusers {diffusers.__version__}")
    print("time convention: x_t = s(t) * (x0 + sigma * eps); samplers work on x = x0 + sigma * eps, indexed by sigma")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdiff",
        description="Make diffusion models fast: few-step solvers, feature caching and distillation on diffusers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="versions and the time convention")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="run a training recipe (also: accelerate launch scripts/train.py RECIPE)")
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/teacher_digits.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=2e-4")
    p.add_argument("--resume", metavar="latest|DIR", help="consistency recipes: continue from the newest intact checkpoint "
                   "in output_dir (`latest`) or from a checkpoint folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    from fastdiff.cache.spec import CACHE_SPEC_HELP
    from fastdiff.eval.extractors import EXTRACTORS
    from fastdiff.pipelines.sampling import SCHEDULERS

    def add_pipeline_args(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--pipeline", required=required, metavar="PATH", help="a fastdiff/diffusers pipeline folder, e.g. assets/teachers/fashion-mnist")
        p.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="swap in this diffusers scheduler (default: the folder's)")
        p.add_argument("--steps", type=int, default=20, help="inference steps (default 20)")
        p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1: off)")
        p.add_argument("--num-samples", type=int, default=1000, help="images to draw (default 1000)")
        p.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i), not on the batch size")
        p.add_argument("--batch-size", type=int, default=250, help="images per pipeline call (default 250)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("sample", help="sample a PNG grid and an .npz from a pipeline")
    add_pipeline_args(p, required=True)
    p.add_argument("--classes", help="comma-separated class labels, cycled (default: all classes in turn)")
    p.add_argument("--out", default="outputs/samples", help="output folder (default outputs/samples)")
    p.add_argument("--nrow", type=int, help="images per grid row")
    p.add_argument("--scale", type=int, default=4, help="grid upscaling factor (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace grid.png / samples.npz in --out")
    p.add_argument("--cache", metavar="SPEC", help=f"feature cache: {CACHE_SPEC_HELP}")
    p.set_defaults(func=cmd_sample, num_samples=64)

    p = sub.add_parser("cache", help="feature caches: fit a TeaCache-style polynomial or train a HarmoniCa router")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("calibrate", "fit the polynomial from the first block's change to the output's change (TeaCache)"),
                         ("train-router", "train a HarmoniCa router (SDT rollouts + IEPO) for this model, scheduler and step count")):
        a = actions.add_parser(action, help=text, description=text)
        a.add_argument("pipeline", help="a fastdiff class-conditional pipeline folder, or a shipped teacher: fashion-mnist, digits")
        a.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="swap in this scheduler (default: the folder's)")
        a.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        a.add_argument("--no-progress", action="store_true")
        a.add_argument("--seed", type=int, default=0)
    a = actions.choices["calibrate"]
    a.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    a.add_argument("--degree", type=int, default=4, help="polynomial degree (default 4, as TeaCache)")
    a.add_argument("--generations", type=int, default=4, help="pipeline calls to fit over (default 4)")
    a.add_argument("--batch-size", type=int, default=16, help="images per call (default 16)")
    a.add_argument("--out", default="outputs/cache/calibration.json", help="JSON with the coefficients (default %(default)s)")
    a.set_defaults(func=cmd_cache)
    a = actions.choices["train-router"]
    a.add_argument("--steps", type=int, default=20, help="sampler steps the router is for (default 20)")
    a.add_argument("--beta", type=float, default=0.01, help="speed/quality trade-off: weight of the mean router score (default 0.01)")
    a.add_argument("--iterations", type=int, default=40, help="SDT rollouts (default 40)")
    a.add_argument("--batch-size", type=int, default=16, help="images per rollout (default 16)")
    a.add_argument("--forecast", type=int, default=0, choices=(0, 1), help="1: Taylor-forecast the reused features")
    a.add_argument("--init-every", type=int, default=0, metavar="N", help="start from the static every-N plan (default 0: uniform scores)")
    a.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale of the rollouts (default 1)")
    a.add_argument("--granularity", default="attn-mlp",
                   help="router units: attn-mlp (attention and feed-forward of adaLN-gated blocks -- DiT, PixArt -- as HarmoniCa) or block (default %(default)s)")
    a.add_argument("--out", default="outputs/cache/router.safetensors", help="router file (default %(default)s)")
    a.set_defaults(func=cmd_cache)

    p = sub.add_parser("fid", help="FID / KID / precision-recall of images against a reference",
                       description="Sources: an image folder, an .npz (images under `images`/`arr_0`, or mu/sigma "
                       "statistics), or a data set split such as fashion-mnist:test. "
                       "`fastdiff fid GENERATED REFERENCE` or `fastdiff fid --pipeline PATH ... REFERENCE`.")  # fmt: skip
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    add_pipeline_args(p, required=False)
    p.add_argument("--extractor", default="inception", help=f"{', '.join(EXTRACTORS)} or an extractor folder (default inception)")
    p.add_argument("--inception-weights", metavar="PATH", help="torch-fidelity's Inception weights (offline machines)")
    p.add_argument("--kid", action="store_true", help="also KID (unbiased, mean and std over subsets)")
    p.add_argument("--pr", action="store_true", help="also precision/recall (k-NN manifolds, k=3)")
    p.add_argument("--size", type=int, help="resize folder images: shorter side to SIZE, centre crop (default: error on mixed sizes)")
    p.add_argument("--json", metavar="OUT", help="write the result and its settings as JSON")
    p.add_argument("--save-stats", metavar="OUT.npz", help="save the generated side's mu/sigma/features")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached reference features")
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("quickstart", help="the main job: FID vs NFE of the shipped teacher (a few CPU minutes)")
    p.add_argument("--teacher", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    p.add_argument("--num-samples", type=int, default=500, help="images per run (default 500)")
    p.add_argument("--steps", help="comma-separated step counts (default 4,8,16)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/quickstart", help="folder for the JSON, grid and plot")
    p.add_argument("--cache", help=f"feature cache for the teacher's second reference run: {CACHE_SPEC_HELP}, or none "
                   "(default: the benchmark's best)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("bench", help="benchmarks: JSON in benchmarks/ and the tables of BENCHMARKS.md")
    p.add_argument("name", choices=("teachers", "samplers", "distill", "cache", "cache-unet", "report"),
                   help="teachers: FID of the shipped teachers; samplers: every sampler side by side (Fashion-MNIST teacher, "
                        "Gaussian-mixture oracle, scheduler overhead); distill: consistency students vs their teacher and the "
                        "trainer's overhead; cache: feature-cache policies vs uncached and diffusers' caches (DiT); cache-unet: "
                        "DeepCache-style caching of the digits UNet; report: only "
                        "regenerate BENCHMARKS.md")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a CI-sized run (JSON only, BENCHMARKS.md untouched)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("schedule", help="print a diffusers scheduler config's timestep/sigma grid")
    p.add_argument("config", help="scheduler_config.json, a scheduler folder or a pipeline folder")
    p.add_argument("--steps", type=int, default=10, help="number of inference steps (default 10)")
    p.add_argument("--spacing", choices=("leading", "trailing", "linspace"), help="override timestep_spacing")
    p.add_argument("--mu", type=float, help="Flux's resolution shift, needed by use_dynamic_shifting configs")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("data", help="summarise a dataset and write a preview grid")
    p.add_argument("name", choices=DATASETS)
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--root", help="folder of Fashion-MNIST IDX files, or the image folder for `folder`")
    p.add_argument("--size", type=int, help="image folder: resize the shorter side and centre-crop to SIZE")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="image folder: 1 or 3 channels")
    p.add_argument("--labels", action="store_true", help="image folder: labels from subfolders")
    p.add_argument("--seed", type=int, help="shuffle with this seed (default: file order)")
    p.add_argument("--grid", metavar="PNG", help="write a grid of the first --num images here")
    p.add_argument("--num", type=int, default=64, help="images in the grid (default 64)")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except InputError as err:
        print(f"fastdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
