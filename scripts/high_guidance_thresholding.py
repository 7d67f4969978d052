"""Dynamic thresholding at high guidance on the shipped Fashion-MNIST teacher: diverged images and FIDs with and without
``thresholding=True``, for fastdiff's recommended solver (iPNDM-v) and diffusers' schedulers that offer the option.

Measured as ``fastdiff bench samplers`` measures a cell (250 images of seed 0, test FID of the clipped images, FID to
and divergence against the same noise's converged samples: DPM-Solver++(2M) at 50 NFE, unthresholded), at one
guidance scale. Prints one JSON line per cell and writes them all to ``--out``.

    OMP_NUM_THREADS=1 python scripts/high_guidance_thresholding.py --guidance 10 --out thresholding-w10.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fastdiff.bench.samplers import REFERENCE, _divergence
from fastdiff.eval.assets import teacher_path
from fastdiff.eval.extractors import load_extractor
from fastdiff.eval.metrics import FeatureSet, extract_features, fid
from fastdiff.eval.sources import load_source, source_features
from fastdiff.pipelines import make_scheduler
from fastdiff.pipelines.class_conditional import load_pipeline
from fastdiff.pipelines.sampling import sample_pipeline

CELLS = [("ipndm-v", k, t) for k in (4, 6, 8, 10) for t in (False, True)] + [(n, k, True) for n in ("ddim", "dpmpp-2m", "unipc") for k in (4, 6)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guidance", type=float, default=10.0)
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if Path(args.out).exists():
        print(f"error: {args.out} already exists; choose another --out (nothing was computed)", file=sys.stderr)
        sys.exit(2)
    pipe = load_pipeline(teacher_path("fashion-mnist"))
    base, extractor = dict(pipe.scheduler.config), load_extractor("fashion-mnist")
    test = source_features(load_source("fashion-mnist:test", 1), extractor, progress=False)

    def features(images):
        return FeatureSet.from_features(extract_features(extractor, images.clamp(-1, 1)))

    pipe.scheduler = make_scheduler(REFERENCE[1], base)
    ref = sample_pipeline(pipe, args.samples, REFERENCE[2], args.guidance, seed=0).images
    ref_features, rows = features(ref), []
    for name, nfe, thresholding in CELLS:
        pipe.scheduler = make_scheduler(name, base, **({"thresholding": True} if thresholding else {}))
        start = time.perf_counter()
        images = sample_pipeline(pipe, args.samples, nfe, args.guidance, seed=0).images
        seconds, feats = time.perf_counter() - start, features(images)
        rows.append({"sampler": name, "thresholding": thresholding, "guidance": args.guidance, "nfe": nfe, "fid_test": fid(feats, test),
                     "fid_converged": fid(feats, ref_features), "diverged": _divergence(images, ref)[1], "seconds": round(seconds, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
