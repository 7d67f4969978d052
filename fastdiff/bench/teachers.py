"""``fastdiff bench teachers``: each shipped teacher's FID at 50 NFE next to the train-vs-test floor, and the
Inception path end to end offline."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fastdiff.bench.common import Cells, fmt, machine, mean_std

__all__ = ["TEACHER_ROWS", "bench_teachers", "render_teachers"]


# (shipped teacher, samples per seed): the earlier Fashion-MNIST DiT stays as the row the new teacher is judged against
TEACHER_ROWS = (("digits", 360), ("fashion-mnist", 2000), ("fashion-mnist-dit", 2000))


def bench_teachers(quick: bool = False, seeds: tuple[int, ...] = (0, 1, 2), progress: bool = True, cells: Any = None) -> dict:
    """Each shipped teacher's domain FID at 50 NFE against the test split, the train-vs-test floor at the same sample
    count, the FID of a set against itself, the spread over seeds, and the Inception path end to end. ``cells``: a
    :class:`fastdiff.bench.common.Cells` keeping each finished (teacher, seed) for ``--resume``."""
    from fastdiff.eval.sources import load_source, source_features
    from fastdiff.eval.assets import ASSETS
    from fastdiff.eval.extractors import load_extractor
    from fastdiff.eval.metrics import fid
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.eval.assets import teacher_dataset, teacher_path
    from fastdiff.eval.metrics import fid_of_samples
    from fastdiff.pipelines.sampling import make_scheduler, sample_pipeline

    cells = cells or Cells(None)
    result = {"machine": machine(), "quick": quick, "teachers": {}}
    for name, n_full in TEACHER_ROWS:
        n = 100 if quick else n_full
        data = teacher_dataset(name)
        extractor = load_extractor(data)
        test = source_features(load_source(f"{data}:test", 1), extractor, progress=progress)
        train_images = load_source(f"{data}:train", 1).images
        pipe = load_pipeline(teacher_path(name))
        pipe.scheduler = make_scheduler("ddim", dict(pipe.scheduler.config))

        def one_seed(seed):
            start = time.perf_counter()
            samples = sample_pipeline(pipe, n, 50, 1.0, seed, progress=progress)  # noqa: B023 (called at once)
            return {"fid": fid_of_samples(samples.images, extractor, test), "nfe": samples.nfe, "seconds": time.perf_counter() - start}  # noqa: B023

        runs = [cells(f"{name} n={n} seed={seed}", lambda seed=seed: one_seed(seed)) for seed in seeds]
        teacher, floor = [r["fid"] for r in runs], []
        seconds = sum(r["seconds"] for r in runs) / len(seeds)
        for seed in seeds:
            pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:n]
            floor.append(fid_of_samples(train_images[pick], extractor, test))
        training = json.loads((teacher_path(name) / "training.json").read_text())
        extractor_record = json.loads((ASSETS / "extractors" / data / "config.json").read_text())
        result["teachers"][name] = {
            "num_samples": n, "reference": f"{data}:test ({test.n} images)", "nfe": runs[0]["nfe"],
            "teacher_fid_50nfe": mean_std(teacher), "train_vs_test_floor": mean_std(floor),
            "self_fid": fid(test, test), "sampling_seconds_per_seed": round(seconds, 1),
            "teacher_params": training["parameters"], "teacher_train_minutes": training["wall_minutes"],
            "teacher_steps": training["steps"], "model": training["recipe"]["model"]["kind"],
            "extractor_test_accuracy": extractor_record["test_accuracy"], "trained_on": training.get("trained_on", "CPU"),
        }  # fmt: skip
    result["inception"] = _inception_path()
    return result


def _inception_path() -> dict:
    """FID through the standard Inception extractor with a weights file made locally (random init)."""
    from fastdiff.eval.sources import load_source
    from fastdiff.eval.extractors import load_extractor
    from fastdiff.eval.metrics import FeatureSet, extract_features, fid
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


def render_teachers(data: dict) -> list[str]:
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
            f"{r['teacher_train_minutes']:.0f} CPU-min | {r['num_samples']} | {fmt(t['mean'])} ± {fmt(t['std'])} | "
            f"{fmt(f['mean'])} ± {fmt(f['std'])} | {t['mean'] / f['mean']:.1f}x | {fmt(r['self_fid'])} | "
            f"{r['extractor_test_accuracy']:.2%} |"
        )
    inc = data["inception"]
    lines += [
        "",
        f"Inception path, end to end offline ({inc['weights']}): FID of 32 digits-train vs 32 digits-test images "
        f"= {fmt(inc['fid_digits_train32_vs_test32'])}, self-FID = {fmt(inc['self_fid'])}, {inc['feature_dim']}-d "
        f"features, resize {inc['resize']}, {inc['seconds']} s. With torch-fidelity's real weights "
        "(`--inception-weights`) the same command gives the standard numbers.",
    ]
    return lines
