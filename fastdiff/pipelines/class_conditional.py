"""A diffusers pipeline for fastdiff's class-conditional pixel-space teachers.

``ClassConditionalPipeline`` holds a ``unet`` (``UNet2DModel`` with class embeddings) or a ``transformer``
(``DiTTransformer2DModel``) and any diffusers scheduler, and samples with classifier-free guidance in one batched
call. Labels ``0 .. num_classes - 1`` are classes and ``num_classes`` is the null (unconditional) label the model
was trained with by label dropout.

Saved folders load offline with the class itself or with ``DiffusionPipeline.from_pretrained(folder)``: the folder
carries a two-line ``pipeline.py`` that imports this class (see :func:`save_teacher`).
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

# diffusers loads a folder's component classes only from modules already imported: the students' models (reflow's
# VPFlowModel, CTM's TwoTimeModel) and fastdiff's schedulers (CTMScheduler, GHVBScheduler, ...) that folders name
import fastdiff.flow_student  # noqa: F401
import fastdiff.samplers.diffusers  # noqa: F401
import fastdiff.two_time  # noqa: F401
from fastdiff.denoisers import call_model
from fastdiff.errors import InputError

__all__ = ["ClassConditionalPipeline", "save_teacher", "load_pipeline"]

_PIPELINE_PY = '"""Lets `DiffusionPipeline.from_pretrained` find fastdiff\'s pipeline class (needs `pip install fastdiff`)."""\n' \
    "from fastdiff.pipelines import ClassConditionalPipeline  # noqa: F401\n"


class ClassConditionalPipeline(DiffusionPipeline):
    """Class-conditional sampling with classifier-free guidance from a pixel-space ``unet`` or ``transformer``."""

    model_cpu_offload_seq = "unet->transformer"
    _optional_components = ["unet", "transformer"]

    def __init__(self, scheduler: Any, unet: nn.Module | None = None, transformer: nn.Module | None = None):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise InputError("ClassConditionalPipeline needs exactly one of `unet` or `transformer`")
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer)

    @property
    def model(self) -> nn.Module:
        return self.unet if self.unet is not None else self.transformer

    @property
    def model_config(self) -> Any:
        """The model's config; for a two-time CTM student (:class:`~fastdiff.two_time.TwoTimeModel`), its base UNet's."""
        config = self.model.config
        return config["base_config"] if "base_config" in config else config

    @property
    def num_classes(self) -> int:
        """Number of real classes; the model's last label embedding is the null class."""
        config = self.model_config
        n = config.get("num_class_embeds") or config.get("num_embeds_ada_norm")
        if not n:
            raise InputError(f"{type(self.model).__name__} has no class embeddings (num_class_embeds / num_embeds_ada_norm)")
        return int(n) - 1 if self.unet is not None else int(n)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        config = self.model_config
        return (config["in_channels"], config["sample_size"], config["sample_size"])

    def _labels(self, class_labels: Any, batch_size: int | None) -> Tensor:
        if class_labels is None:
            return torch.full((batch_size or 1,), self.num_classes, dtype=torch.long)
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= self.num_classes:
            raise InputError(f"class_labels must be in [0, {self.num_classes - 1}]; got {labels.tolist()}")
        return labels

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Any = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per label.

        Args:
            class_labels: ints in ``[0, num_classes)``; ``None`` samples ``batch_size`` unconditional images.
            num_inference_steps: scheduler steps.
            guidance_scale: classifier-free guidance ``w`` (``D_u + w (D_c - D_u)``); 1 disables the unconditional call.
            generator: a generator, or one per image so that each image depends on its own seed only.
            output_type: ``"pil"``, ``"np"`` (``[0, 1]``), ``"pt"`` (``[0, 1]``) or ``"latent"`` (raw ``[-1, 1]``-scale
                samples, not clipped).
            timesteps, sigmas: a custom grid (e.g. an optimised schedule, ``fastdiff schedule optimize``), passed to the
                scheduler's ``set_timesteps`` as diffusers' pipelines do; ``sigmas`` without the final 0.
        """
        labels = self._labels(class_labels, batch_size).to(self.device)
        n = labels.shape[0]
        model = self.model
        # the grid first: init_noise_sigma of sigma-space schedulers (Euler, Heun) depends on it, as in diffusers' pipelines
        grid = _custom_grid(self.scheduler, timesteps, sigmas) or _flow_sigmas(self.scheduler, num_inference_steps)
        self.scheduler.set_timesteps(None if grid.get("sigmas") or grid.get("timesteps") else num_inference_steps, device=self.device, **grid)
        x = randn_tensor((n, *self.image_shape), generator=generator, device=self.device, dtype=model.dtype)
        x = x * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers start from N(0, I) and have none
        null = torch.full_like(labels, self.num_classes)
        guided = guidance_scale != 1.0
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        jumps = _jump_timesteps(self.scheduler, model)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            x_in = torch.cat([x, x]) if guided else x
            x_in = self.scheduler.scale_model_input(x_in, t) if hasattr(self.scheduler, "scale_model_input") else x_in
            cond = {"class_labels": torch.cat([null, labels]) if guided else labels}
            t_in = torch.as_tensor(t, device=self.device).expand(x_in.shape[0])
            if jumps is not None:  # CTM: the jump's target time s as well
                cond["s_timestep"] = jumps[i].to(self.device).expand(x_in.shape[0])
            out = call_model(model, x_in, t_in, cond)
            if guided:
                out_u, out_c = out.chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            x = self.scheduler.step(out, t, x, **step_kwargs, return_dict=False)[0]
        images = _postprocess(x, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _custom_grid(scheduler: Any, timesteps: list[float] | None, sigmas: list[float] | None) -> dict:
    """The custom grid to hand ``scheduler.set_timesteps``: ``sigmas`` where it takes them, else ``timesteps``."""
    if timesteps is None and sigmas is None:
        return {}
    takes = set(inspect.signature(scheduler.set_timesteps).parameters)
    diffusers_own = type(scheduler).__module__.startswith("diffusers.")
    if diffusers_own and getattr(scheduler.config, "use_flow_sigmas", None) is False:  # UniPC: sigmas= on flow grids only
        takes.discard("sigmas")
    if sigmas is not None and "sigmas" in takes:
        return {"sigmas": _ending_at_zero(scheduler, list(sigmas))}
    if timesteps is not None and "timesteps" in takes:
        return {"timesteps": [int(round(t)) for t in timesteps] if "sigmas" not in takes else list(timesteps)}
    given = "sigmas" if sigmas is not None else "timesteps"
    raise InputError(f"{type(scheduler).__name__}.set_timesteps takes no {given}=; use a scheduler that takes custom grids "
                     "(fastdiff's, DPMSolverMultistepScheduler, EulerDiscreteScheduler, ...)")  # fmt: skip


def _ending_at_zero(scheduler: Any, sigmas: list[float]) -> list[float]:
    """``sigmas`` (the noise levels the model is evaluated at) as ``scheduler`` must be given them to end at 0.

    diffusers' Euler-family schedulers read a custom list as ending at its last value (their AYS lists end in 0) and
    would stop short at the last level; fastdiff's and the flow schedulers append the final 0 themselves. Told apart
    by what the scheduler does with the list (a probe on a copy), not by a list of classes."""
    if not sigmas or sigmas[-1] == 0:
        return sigmas
    probe = copy.deepcopy(scheduler)
    try:
        probe.set_timesteps(sigmas=sigmas)
    except Exception:  # noqa: BLE001 -- e.g. a flow scheduler that needs mu=; the real call reports its own error
        return sigmas
    return [*sigmas, 0.0] if len(probe.timesteps) < len(sigmas) else sigmas


def _flow_sigmas(scheduler: Any, steps: int) -> dict:
    """For a flow-matching scheduler, the grid diffusers' flow pipelines pass (SD3, Flux: ``sigmas = linspace(1, 1/N,
    N)``); FlowMatchEuler's own default ends at 1/1000, which makes its last steps nearly empty."""
    flow = type(scheduler).__name__.startswith("FlowMatch") or getattr(scheduler, "flow", False)
    if not flow or "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        return {}
    return {"sigmas": np.linspace(1.0, 1 / steps, steps).tolist()}


def _jump_timesteps(scheduler: Any, model: nn.Module) -> Tensor | None:
    """A CTM scheduler's target timesteps ``s`` (one per step), checked against the model: ``None`` otherwise."""
    jumps = getattr(scheduler, "jump_timesteps", None)
    if jumps is None:
        return None
    if "s_timestep" not in inspect.signature(model.forward).parameters:
        raise InputError(f"{type(scheduler).__name__} jumps to a second time s, which {type(model).__name__} does not take; "
                         "use it with a CTM student (fastdiff.two_time.TwoTimeModel), or another scheduler")  # fmt: skip
    return jumps


def _postprocess(x: Tensor, output_type: str) -> Any:
    if output_type == "latent":
        return x
    unit = (x / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return unit
    array = unit.cpu().permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return array
    if output_type == "pil":
        from PIL import Image

        pixels = (array * 255).round().astype(np.uint8)
        return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
    raise InputError(f"unknown output_type {output_type!r}; expected 'pil', 'np', 'pt' or 'latent'")


def save_teacher(pipe: ClassConditionalPipeline, folder: str | Path) -> Path:
    """``save_pretrained`` (safetensors) plus the ``pipeline.py`` that makes ``DiffusionPipeline.from_pretrained`` work."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "pipeline.py").write_text(_PIPELINE_PY)
    return folder


def load_pipeline(path: str | Path, device: str | torch.device = "cpu") -> DiffusionPipeline:
    """Load a fastdiff or diffusers pipeline folder offline, with a clear error when ``path`` is not one."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise InputError(f"{path} is not a diffusers pipeline folder (no model_index.json)")

    cls = _pipeline_class(path / "model_index.json")
    try:
        pipe = cls.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as err:
        raise InputError(f"cannot load the pipeline in {path}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _pipeline_class(index: Path) -> type[DiffusionPipeline]:
    """The class that loads the folder of ``model_index.json`` at ``index``: fastdiff's pipeline, or diffusers'
    ``DiffusionPipeline`` for a pipeline class the installed diffusers has; an :class:`InputError` otherwise."""
    import diffusers

    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as err:
        raise InputError(f"{index} is not valid JSON with a `_class_name` key: {err}") from None
    if class_name == "ClassConditionalPipeline":
        return ClassConditionalPipeline
    if not isinstance(class_name, str) or not isinstance(getattr(diffusers, class_name, None), type):
        raise InputError(f"{index}: `_class_name` is {class_name!r}, which is neither fastdiff's ClassConditionalPipeline "
                         f"nor a pipeline class of the installed diffusers {diffusers.__version__}; set `_class_name` to the "
                         "pipeline class that saved the folder, or install the diffusers version that provides it")  # fmt: skip
    return DiffusionPipeline
