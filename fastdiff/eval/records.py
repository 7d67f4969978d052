"""Evaluation records the command line prints and saves: a data set's summary, and FID (KID, precision/recall)
between two sources or between a pipeline sampled on the fly and a reference, with every setting that fixes the
number (extractor and its weights hash, reference content hash, sampler, seed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdiff.errors import InputError
from fastdiff.eval.extractors import Extractor
from fastdiff.eval.metrics import FeatureSet
from fastdiff.pipelines.runs import SampleSettings

__all__ = ["dataset_summary", "FIDResult", "score_fid", "check_fid_sources"]


def dataset_summary(ds) -> dict:
    """Name, size, item shape, value range and per-class counts of a :class:`fastdiff.datasets.Dataset`."""
    return {
        "name": ds.name, "items": len(ds), "shape": tuple(ds.data.shape[1:]), "min": ds.data.min().item(),
        "max": ds.data.max().item(), "num_classes": ds.num_classes,
        "counts": torch.bincount(ds.labels, minlength=ds.num_classes).tolist(),
    }  # fmt: skip


@dataclass
class FIDResult:
    """The record (metrics and settings, JSON-ready) and the generated side's features (to save as statistics)."""

    record: dict
    generated: FeatureSet
    reference: FeatureSet
    extractor: Extractor


def check_fid_sources(sources: Sequence[str], with_pipeline: bool) -> None:
    """Two sources (GENERATED REFERENCE), or only the reference when a pipeline generates."""
    if len(sources) != (1 if with_pipeline else 2):
        raise InputError("with --pipeline give one source: the REFERENCE" if with_pipeline else "give two sources (GENERATED REFERENCE)")


def score_fid(sources: Sequence[str], extractor: Extractor, pipeline: str | Path | None = None, scheduler: str | None = None,
              settings: SampleSettings = SampleSettings(), kid: bool = False, pr: bool = False, size: int | None = None,
              use_cache: bool = True, progress: bool = False) -> FIDResult:  # fmt: skip
    """FID (and KID / precision-recall on request) of ``sources`` = ``[GENERATED, REFERENCE]``, or of ``pipeline``
    (a folder or a shipped teacher's name, sampled with ``scheduler`` and ``settings``) against ``sources = [REFERENCE]``. Reference features are
    cached on disk unless ``use_cache`` is false; generated ones never are."""
    import fastdiff
    from fastdiff.eval.sources import compare, load_source, source_features

    check_fid_sources(sources, pipeline is not None)
    channels = extractor.image_shape[0] if extractor.image_shape else 3
    record: dict = {"extractor": extractor.name, "weights_sha256": extractor.weights_sha256, "resize": extractor.resize}
    ref = load_source(sources[-1], channels, size)
    if pipeline is not None:
        gen, record["generated"] = _pipeline_features(pipeline, scheduler, settings, extractor, progress)
    else:
        gen, record["generated"] = _source_features(sources[0], channels, size, extractor, progress)
    reference = source_features(ref, extractor, use_cache=use_cache, progress=progress)
    record["reference"] = {"source": ref.description, "content_sha256": ref.content_sha256}
    record["num_generated"], record["num_reference"] = gen.n, reference.n
    record["seed"] = settings.seed
    record["metrics"] = compare(gen, reference, kid, pr, seed=settings.seed)
    record["fastdiff"] = fastdiff.__version__
    return FIDResult(record, gen, reference, extractor)


def _source_features(spec: str, channels: int, size: int | None, extractor: Extractor, progress: bool) -> tuple[FeatureSet, dict]:
    """Features of the generated images in a folder / ``.npz`` (never statistics: they cannot be checked)."""
    from fastdiff.eval.sources import load_source, source_features

    src = load_source(spec, channels, size)
    if src.stats is not None:
        raise InputError(f"{spec}: the generated side must be images, not statistics")
    return source_features(src, extractor, use_cache=False, progress=progress), {"source": src.description}


def _pipeline_features(folder: str | Path, scheduler: str | None, settings: SampleSettings, extractor: Extractor,
                       progress: bool) -> tuple[FeatureSet, dict]:  # fmt: skip
    """Sample the pipeline (a folder or a shipped teacher's name) and extract features of its images (as the saved
    uint8 pixels); the run's settings, with the pipeline as given."""
    from fastdiff.eval.assets import pipeline_path
    from fastdiff.eval.metrics import extract_features
    from fastdiff.pipelines.runs import draw, open_pipeline

    pipe = open_pipeline(pipeline_path(folder), scheduler)
    if extractor.image_shape is not None and tuple(pipe.image_shape) != extractor.image_shape:
        raise InputError(f"the pipeline makes images {tuple(pipe.image_shape)}; the {extractor.name} extractor takes {extractor.image_shape}")
    samples = draw(pipe, settings, progress=progress)
    info = {"pipeline": str(folder), "scheduler": type(pipe.scheduler).__name__, "steps": settings.steps, "nfe": samples.nfe,
            "guidance_scale": settings.guidance_scale, "num_samples": settings.num_samples}  # fmt: skip
    features = extract_features(extractor, samples.images, progress=progress, desc="generated")
    return FeatureSet.from_features(features), info
