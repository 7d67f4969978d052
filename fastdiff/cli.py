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

from fastdiff.errors import InputError

DATASETS = ("digits", "fashion-mnist", "folder", "8gaussians", "moons", "circles", "checkerboard", "swissroll")


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
    from fastdiff.schedules import FlowSchedule, schedule_from_config, shift_flow_time

    config = _load_scheduler_config(args.config)
    schedule = schedule_from_config(config)
    if isinstance(schedule, FlowSchedule):
        t = torch.linspace(1.0, 1.0 / args.steps, args.steps, dtype=torch.float64)
        t = shift_flow_time(t, float(config.get("shift", 1.0)))
        timesteps = t * schedule.num_train_timesteps
    else:
        spacing = args.spacing or config.get("timestep_spacing", "leading")
        timesteps = schedule.timesteps(args.steps, spacing, int(config.get("steps_offset", 0))).double()
    sigmas = schedule.t_to_sigma(timesteps)
    print(f"{'step':>4} {'timestep':>10} {'sigma':>12} {'scale s':>10}")
    for i, (t, s) in enumerate(zip(timesteps.tolist(), sigmas.tolist())):
        scale = schedule.scale(torch.tensor(s, dtype=torch.float64)).item()
        print(f"{i:>4} {t:>10.3f} {s:>12.6g} {scale:>10.6f}")


def cmd_data(args: argparse.Namespace) -> None:
    """Summarise a dataset and optionally write a grid of its first images."""
    from fastdiff import data as fd

    if args.name == "digits":
        ds = fd.load_digits(args.split, seed=args.seed)
    elif args.name == "fashion-mnist":
        ds = fd.load_fashion_mnist(args.split, root=args.root, seed=args.seed)
    elif args.name == "folder":
        if args.root is None:
            raise InputError("`fastdiff data folder` needs --root DIR")
        ds = fd.load_image_folder(args.root, size=args.size, channels=args.channels, labels=args.labels, seed=args.seed)
    else:
        ds = fd.toy_2d(args.name, seed=args.seed or 0)
    counts = torch.bincount(ds.labels, minlength=ds.num_classes).tolist()
    print(f"{ds.name}: {len(ds)} items of shape {tuple(ds.data.shape[1:])}, values in "
          f"[{ds.data.min().item():.3f}, {ds.data.max().item():.3f}], {ds.num_classes} classes {counts}")
    if args.grid:
        if ds.data.ndim != 4:
            raise InputError(f"{args.name} holds 2-D points, not images; --grid needs an image dataset")
        from fastdiff.images import save_grid

        print(f"wrote {save_grid(ds.data[: args.num], args.grid, scale=4)}")


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

    p = sub.add_parser("schedule", help="print a diffusers scheduler config's timestep/sigma grid")
    p.add_argument("config", help="scheduler_config.json, a scheduler folder or a pipeline folder")
    p.add_argument("--steps", type=int, default=10, help="number of inference steps (default 10)")
    p.add_argument("--spacing", choices=("leading", "trailing", "linspace"), help="override timestep_spacing")
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
