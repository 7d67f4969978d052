"""The ``fastdiff`` argument parser: one ``_add_<command>`` function per subcommand, each binding its command from
:mod:`fastdiff.cli.commands`."""

from __future__ import annotations

import argparse

from fastdiff.cli import commands

__all__ = ["build_parser", "BENCH_NAMES"]

# fastdiff.bench.BENCHMARKS' names (kept here so that parsing imports no compute module; a test checks they agree)
BENCH_NAMES = ("teachers", "samplers", "distill", "distill-fashion-mnist", "cache", "cache-unet", "dmd2-layouts")

Subparsers = "argparse._SubParsersAction[argparse.ArgumentParser]"  # what add_subparsers returns (for type hints)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``fastdiff``; each subcommand sets ``func`` to its command."""
    parser = argparse.ArgumentParser(
        prog="fastdiff",
        description="Make diffusion models fast: few-step solvers, feature caching and distillation on diffusers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_info, _add_train, _add_pairs, _add_sample, _add_cache, _add_fid, _add_quickstart, _add_bench, _add_schedule, _add_data):
        add(sub)
    return parser


def _add_info(sub: Subparsers) -> None:
    p = sub.add_parser("info", help="versions and the time convention")
    p.set_defaults(func=commands.cmd_info)


def _add_train(sub: Subparsers) -> None:
    p = sub.add_parser("train", help="run a training recipe (also: accelerate launch scripts/train.py RECIPE)")
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/teacher_digits.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=2e-4")
    p.add_argument("--resume", metavar="latest|DIR", help="continue from the newest intact checkpoint "
                   "in output_dir (`latest`) or from a checkpoint folder")
    p.add_argument("--lpips-weights", metavar="PATH", help="CTM with ctm.distance=lpips: torchvision's VGG-16 weights file "
                   "(vgg16-397923af.pth), read offline; the same as --set ctm.lpips_weights=PATH")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=commands.cmd_train)


def _add_pipeline_args(p: argparse.ArgumentParser, required: bool, num_samples: int) -> None:
    """The options of a sampling run, shared by ``sample`` and ``fid``."""
    from fastdiff.pipelines.sampling import SCHEDULERS

    p.add_argument("--pipeline", required=required, metavar="PATH",
                   help="a fastdiff/diffusers pipeline folder, or a shipped teacher: fashion-mnist, digits")  # fmt: skip
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="swap in this diffusers scheduler (default: the folder's)")
    p.add_argument("--steps", type=int, default=20, help="inference steps (default 20)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1: off)")
    p.add_argument("--num-samples", type=int, default=num_samples, help=f"images to draw (default {num_samples})")
    p.add_argument("--seed", type=int, default=0, help="image i depends only on (seed, i), not on the batch size")
    p.add_argument("--batch-size", type=int, default=250, help="images per pipeline call (default 250)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_sample(sub: Subparsers) -> None:
    from fastdiff.cache.spec import CACHE_SPEC_HELP
    from fastdiff.pipelines.runs import PREVIEW

    p = sub.add_parser("sample", help="sample a PNG grid and an .npz from a pipeline",
                       description="Sample a pipeline: every image goes to OUT/samples.npz (uint8, with labels and settings); "
                       f"OUT/grid.png previews the first --preview of them (default {PREVIEW}).")  # fmt: skip
    _add_pipeline_args(p, required=True, num_samples=64)
    p.add_argument("--classes", help="comma-separated class labels, cycled (default: all classes in turn)")
    p.add_argument("--out", default="outputs/samples", help="output folder (default outputs/samples)")
    p.add_argument("--nrow", type=int, help="images per grid row")
    p.add_argument("--scale", type=int, default=4, help="grid upscaling factor (default 4)")
    p.add_argument("--preview", type=int, default=PREVIEW, metavar="N",
                   help=f"images shown in grid.png: the first N (default {PREVIEW}); samples.npz holds them all")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace grid.png / samples.npz in --out")
    p.add_argument("--cache", metavar="SPEC", help=f"feature cache: {CACHE_SPEC_HELP}")
    p.add_argument("--schedule", metavar="JSON", help="an optimised schedule (`fastdiff schedule optimize`) for this "
                   "pipeline, --scheduler and --steps")
    p.set_defaults(func=commands.cmd_sample)


def _add_cache(sub: Subparsers) -> None:
    from fastdiff.pipelines.sampling import SCHEDULERS

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
        a.set_defaults(func=commands.cmd_cache)
    _add_calibrate_args(actions.choices["calibrate"])
    _add_router_args(actions.choices["train-router"])


def _add_calibrate_args(a: argparse.ArgumentParser) -> None:
    a.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    a.add_argument("--degree", type=int, default=4, help="polynomial degree (default 4, as TeaCache)")
    a.add_argument("--generations", type=int, default=4, help="pipeline calls to fit over (default 4)")
    a.add_argument("--batch-size", type=int, default=16, help="images per call (default 16)")
    a.add_argument("--out", default="outputs/cache/calibration.json", help="JSON with the coefficients (default %(default)s)")


def _add_router_args(a: argparse.ArgumentParser) -> None:
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


def _add_fid(sub: Subparsers) -> None:
    from fastdiff.eval.extractors import EXTRACTORS

    p = sub.add_parser("fid", help="FID / KID / precision-recall of images against a reference",
                       description="Sources: an image folder, an .npz (images under `images`/`arr_0`, or mu/sigma "
                       "statistics), or a data set split such as fashion-mnist:test. "
                       "`fastdiff fid GENERATED REFERENCE` or `fastdiff fid --pipeline PATH ... REFERENCE`.")  # fmt: skip
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    _add_pipeline_args(p, required=False, num_samples=1000)
    p.add_argument("--extractor", default="inception", help=f"{', '.join(EXTRACTORS)} or an extractor folder (default inception)")
    p.add_argument("--inception-weights", metavar="PATH", help="torch-fidelity's Inception weights (offline machines)")
    p.add_argument("--kid", action="store_true", help="also KID (unbiased, mean and std over subsets)")
    p.add_argument("--pr", action="store_true", help="also precision/recall (k-NN manifolds, k=3)")
    p.add_argument("--size", type=int, help="resize folder images: shorter side to SIZE, centre crop (default: error on mixed sizes)")
    p.add_argument("--json", metavar="OUT", help="write the result and its settings as JSON")
    p.add_argument("--save-stats", metavar="OUT.npz", help="save the generated side's mu/sigma/features")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached reference features")
    p.set_defaults(func=commands.cmd_fid)


def _add_quickstart(sub: Subparsers) -> None:
    from fastdiff.cache.spec import CACHE_SPEC_HELP
    from fastdiff.quickstart import QuickstartConfig

    default = QuickstartConfig()  # one set of defaults: the options show and pass the library's
    p = sub.add_parser("quickstart", help="the main job: FID vs NFE of the shipped teacher's solvers, its feature cache "
                       "and its distilled student (a few CPU minutes)")
    p.add_argument("--teacher", choices=("fashion-mnist", "digits"), default=default.teacher)
    p.add_argument("--num-samples", type=int, default=default.num_samples, help=f"images per run (default {default.num_samples})")
    p.add_argument("--steps", help=f"comma-separated step counts (default {','.join(map(str, default.steps))})")
    p.add_argument("--guidance", type=float, default=default.guidance_scale,
                   help=f"classifier-free guidance scale (default {default.guidance_scale:g}: off)")
    p.add_argument("--seed", type=int, default=default.seed)
    p.add_argument("--out", default=default.out, help=f"folder for the JSON, grid and plot (default {default.out})")
    p.add_argument("--cache", help=f"feature cache for the teacher's second reference run: {CACHE_SPEC_HELP}, or none "
                   "(default: the benchmark's best)")
    p.add_argument("--student", metavar="PATH", help="a distilled student's pipeline folder for the student rows, or none "
                   "(default: the student shipped with the teacher, if any)")
    p.add_argument("--no-optimised-schedules", action="store_true",
                   help="skip the rows of fastdiff's solvers on the optimised schedules shipped next to the teacher")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=commands.cmd_quickstart)


def _add_bench(sub: Subparsers) -> None:
    p = sub.add_parser("bench", help="benchmarks: JSON in benchmarks/ and the tables of BENCHMARKS.md",
                       description="Every output goes where the options say, relative to the current directory: run it "
                       "from a checkout's root to regenerate the repository's benchmarks/, BENCHMARKS.md and README.md.")  # fmt: skip
    p.add_argument("name", choices=(*BENCH_NAMES, "report"),
                   help="teachers: FID of the shipped teachers; samplers: every sampler side by side (Fashion-MNIST teacher, "
                        "Gaussian-mixture oracle, scheduler overhead); distill: digits students vs their teacher and the "
                        "trainer's overhead and step costs (bf16 vs fp32 here); distill-fashion-mnist: the Fashion-MNIST "
                        "students (trainings kept in runs/bench, "
                        "--resume continues them); cache: feature-cache policies vs uncached and diffusers' caches (the "
                        "fashion-mnist-dit teacher); cache-unet: DeepCache-style caching of the Fashion-MNIST UNet; dmd2-layouts: "
                        "peak memory and s/step of DMD2's three-network and one-base LoRA layouts on SD-1.5-shaped UNets; "
                        "report: only regenerate BENCHMARKS.md")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a CI-sized run (JSON only, BENCHMARKS.md untouched)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="benchmarks", metavar="DIR", help="folder of the benchmark JSON and plots (default %(default)s)")
    p.add_argument("--report", default="BENCHMARKS.md", metavar="FILE", help="the report regenerated from --out (default %(default)s)")
    p.add_argument("--readme", default="README.md", metavar="FILE",
                   help="also regenerate the benchmark section between this file's markers, when it exists (default %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run: teachers, samplers, distill and distill-fashion-mnist keep each finished cell or training "
                        "checkpoint (in --out / runs/bench) and skip it when resumed")  # fmt: skip
    p.add_argument("--shard", type=_shard, metavar="I/K",
                   help="split a resumable benchmark over K processes: this one computes shard I (0-based) of the cells into "
                        "--out's NAME.partial.jsonl and writes no JSON; once all K finish, run it with --resume to assemble")  # fmt: skip
    _add_distill_options(p)
    p.set_defaults(func=commands.cmd_bench)


def _add_distill_options(p: argparse.ArgumentParser) -> None:
    """The options of the distill benchmarks (the recipes they train, a subset of rows, assembling what is finished)."""
    p.add_argument("--recipes", default="recipes", metavar="DIR", help="distill: the folder of the recipes it trains (default %(default)s)")
    p.add_argument("--rows", nargs="+", metavar="LABEL",
                   help="distill, distill-fashion-mnist: run only these rows (labels as in the table, e.g. DMD2 'DMD2 4-step'); "
                        "the JSON and the report hold only them")  # fmt: skip
    p.add_argument("--finished-only", action="store_true",
                   help="distill, distill-fashion-mnist: write the JSON and report from the trainings finished in --out's NAME.partial.jsonl "
                        "(by --shard or --rows runs), computing nothing; the rows still to run are listed and the file is kept")  # fmt: skip


def _shard(text: str) -> tuple[int, int]:
    i, _, k = text.partition("/")
    if not (i.isdigit() and k.isdigit() and int(i) < int(k)):
        raise argparse.ArgumentTypeError(f"expected I/K with 0 <= I < K (e.g. 0/2), got {text!r}")
    return int(i), int(k)


def _add_schedule(sub: Subparsers) -> None:
    from fastdiff.pipelines.sampling import SCHEDULERS

    p = sub.add_parser("schedule", help="print a scheduler's grid (`schedule [show] CONFIG`) or optimise one (`schedule optimize`)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print a diffusers scheduler config's timestep/sigma grid (the default action)")
    show.add_argument("config", help="scheduler_config.json, a scheduler folder or a pipeline folder")
    show.add_argument("--steps", type=int, default=10, help="number of inference steps (default 10)")
    show.add_argument("--spacing", choices=("leading", "trailing", "linspace"), help="override timestep_spacing")
    show.add_argument("--mu", type=float, help="Flux's resolution shift, needed by use_dynamic_shifting configs")
    show.set_defaults(func=commands.cmd_schedule)
    _add_schedule_optimize(actions, sorted(SCHEDULERS))


def _add_schedule_optimize(actions: Subparsers, schedulers: list[str]) -> None:
    opt = actions.add_parser("optimize", help="the schedule that minimises the error against reference trajectories (GITS-style DP)")
    opt.add_argument("pipeline", help="a pipeline folder or a shipped teacher's name (digits, fashion-mnist)")
    opt.add_argument("--scheduler", choices=schedulers, required=True, help="the solver the schedule is for")
    opt.add_argument("--steps", type=int, nargs="+", required=True,
                     help="number of steps (model evaluations for one-evaluation solvers); several share one calibration "
                          "and need {steps} in --out")  # fmt: skip
    opt.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance (default 1)")
    opt.add_argument("--samples", type=int, default=32, help="calibration samples (default %(default)s)")
    opt.add_argument("--fine", type=int, default=80, help="points of the fine candidate grid (default %(default)s)")
    opt.add_argument("--seed", type=int, default=0, help="seed of the calibration noise (default 0)")
    opt.add_argument("--sigma-data", type=float, default=0.5,
                     help="std of the data in the model's space, for weighting each step's error by what reaches the image "
                          "(default 0.5: images in [-1, 1]; about 1 for SD / SDXL / SD3 / Flux latents)")  # fmt: skip
    opt.add_argument("--out", required=True, metavar="JSON",
                     help="where to write the schedule; {steps} in it is replaced by the step count (e.g. s-{steps}.json)")
    opt.add_argument("--refine", action="store_true",
                     help="then fit the schedule to --scheduler itself: coordinate descent from the DP's schedule on the "
                          "solver's end-to-end error on 16 images (the DP measures DDIM's error; multistep solvers want "
                          "other steps)")  # fmt: skip
    opt.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    opt.add_argument("--no-progress", action="store_true", help="no progress bar")
    opt.set_defaults(func=commands.cmd_schedule_optimize)


def _add_pairs(sub: Subparsers) -> None:
    from fastdiff.pipelines.sampling import SCHEDULERS

    p = sub.add_parser("pairs", help="reflow's (noise, teacher sample) pairs, written in shards as they are made (resumable)")
    p.add_argument("teacher", help="a teacher pipeline folder or a shipped teacher's name (digits, fashion-mnist)")
    p.add_argument("--out", required=True, metavar="DIR", help="the pairs folder (pairs.json + shard_*.safetensors); "
                   "running the same command again finishes an interrupted run")
    p.add_argument("--num", type=int, default=20000, help="number of pairs (default %(default)s)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="dpmpp-2m", help="the ODE solver (default %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="solver steps per pair (default %(default)s)")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance of the teacher (default 1: none)")
    p.add_argument("--seed", type=int, default=0, help="pair i starts from the noise of (seed, i) (default 0)")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per shard file (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=commands.cmd_pairs)


def _add_data(sub: Subparsers) -> None:
    from fastdiff.datasets import DATASETS

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
    p.set_defaults(func=commands.cmd_data)
