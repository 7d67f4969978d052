"""Pipelines: fastdiff's class-conditional diffusers pipeline (the shipped teachers and the distilled students) and
seeded sampling of any pipeline with any scheduler, diffusers' or fastdiff's, by name."""

from fastdiff.pipelines.class_conditional import ClassConditionalPipeline, load_pipeline, save_teacher
from fastdiff.pipelines.sampling import FASTDIFF_SCHEDULERS, SCHEDULERS, Samples, image_seed, make_scheduler, sample_pipeline

__all__ = ["ClassConditionalPipeline", "load_pipeline", "save_teacher", "FASTDIFF_SCHEDULERS", "SCHEDULERS", "Samples", "image_seed",
           "make_scheduler", "sample_pipeline"]  # fmt: skip
