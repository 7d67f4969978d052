"""Lets `DiffusionPipeline.from_pretrained` find fastdiff's pipeline class (needs `pip install fastdiff`)."""
from fastdiff.pipelines import ClassConditionalPipeline  # noqa: F401
