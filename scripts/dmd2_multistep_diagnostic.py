"""A DMD2 multi-step student step by step: the samples after each of its K steps along the trained path, their domain
FID and pixel statistics next to the data's, and the FID of their 1:1:...:1 mixture.

DMD2 trains one fake score on the outputs of every step of a K-step generator, so the distribution-matching gradient
matches the *mixture* of the steps' outputs to the data, not each step. Where the mixture scores better than every
one of the steps and their statistics straddle the data's, the steps are compensating for each other (the digits
4-step generator's 4-step figure worsening as it trains: recipes/dmd2_digits.yaml).

    fastdiff train recipes/dmd2_digits.yaml --set dmd.generator_steps=4 --set "eval.steps=[1, 2, 4]" \\
        --set trainer.steps=1500 --set output_dir=runs/dmd2-4step
    OMP_NUM_THREADS=1 python scripts/dmd2_multistep_diagnostic.py runs/dmd2-4step/student --dataset digits \\
        --generator-steps 4 --out dmd2-4step.json

The student samples with its own scheduler (LCMScheduler) on explicit ``timesteps=``: the first k of the generator's
``[999, 749, 499, 249]`` (K = 4), the same noise for every k; FIDs on images clipped to [-1, 1], statistics on the raw
samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastdiff.errors import InputError
from fastdiff.eval.extractors import load_extractor
from fastdiff.eval.metrics import fid_of_samples
from fastdiff.eval.sources import load_source, source_features
from fastdiff.objectives.distribution_matching import generator_timesteps
from fastdiff.pipelines.class_conditional import load_pipeline
from fastdiff.pipelines.sampling import sample_pipeline


def pixel_stats(x: torch.Tensor) -> dict[str, float]:
    """Mean |x|, mean, std, and the share of pixels outside [-1, 1] (the data have none)."""
    return {"mean_abs": float(x.abs().mean()), "mean": float(x.mean()), "std": float(x.std()),
            "outside_unit": float((x.abs() > 1).float().mean())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", help="the student pipeline folder (a training's output_dir/student)")
    parser.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits")
    parser.add_argument("--generator-steps", type=int, default=4, help="K the student was trained with (dmd.generator_steps)")
    parser.add_argument("--samples", type=int, default=360)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if Path(args.out).exists():
        print(f"error: {args.out} already exists; choose another --out (nothing was computed)", file=sys.stderr)
        sys.exit(2)
    try:
        record = diagnose(args)
    except InputError as e:  # a folder that is no pipeline, a K or sample count out of range: nothing was written
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


def diagnose(args: argparse.Namespace) -> dict:
    """The record: the data's statistics, each step count's FID and statistics, and the mixture's."""
    if args.samples < 1:
        raise InputError(f"--samples must be >= 1; got {args.samples}")
    pipe = load_pipeline(Path(args.student))
    steps = generator_timesteps(pipe.scheduler.config.num_train_timesteps, args.generator_steps).tolist()
    extractor = load_extractor(args.dataset)
    test = load_source(f"{args.dataset}:test", 1)
    reference = source_features(test, extractor, progress=False)
    record = {"student": args.student, "dataset": args.dataset, "samples": args.samples, "seed": args.seed,
              "data": pixel_stats(test.images), "steps": []}  # fmt: skip
    outputs = []
    for k in range(1, len(steps) + 1):
        images = sample_pipeline(pipe, args.samples, k, 1.0, args.seed, schedule={"timesteps": steps[:k]}).images
        outputs.append(images)
        record["steps"].append({"timesteps": steps[:k], "fid": fid_of_samples(images, extractor, reference), **pixel_stats(images)})
        print(json.dumps(record["steps"][-1]), flush=True)
    mixture = torch.cat([x[i :: len(outputs)] for i, x in enumerate(outputs)])  # each noise once: those of index i mod K after i + 1 steps
    record["mixture"] = {"fid": fid_of_samples(mixture, extractor, reference), **pixel_stats(mixture)}
    print("data", json.dumps(record["data"]), "\nmixture", json.dumps(record["mixture"]))
    return record


if __name__ == "__main__":
    main()
