"""Evaluation: FID / KID / precision-recall on features (torchmetrics' formulas), the feature extractors (Inception
and the shipped domain classifiers), image sources (folders, npz, datasets, cached statistics) and the shipped
assets."""

from fastdiff.eval.assets import ASSETS, TEACHERS, pipeline_path, teacher_path
from fastdiff.eval.extractors import EXTRACTORS, Extractor, load_extractor
from fastdiff.eval.metrics import FeatureSet, extract_features, fid, fid_of_samples, kid, precision_recall
from fastdiff.eval.sources import compare, load_source, source_features

__all__ = ["ASSETS", "TEACHERS", "teacher_path", "pipeline_path", "EXTRACTORS", "Extractor", "load_extractor", "FeatureSet", "extract_features", "fid",
           "fid_of_samples", "kid", "precision_recall", "compare", "load_source", "source_features"]  # fmt: skip
