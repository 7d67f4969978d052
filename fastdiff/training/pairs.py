"""Reflow's training pairs: (noise, teacher sample) from the teacher's ODE, written to disk in shards as they are made.

2-RF++ (Lee, Lin & Fanti 2024, sec. 5; reference notes 7) trains the rectified flow on pairs ``(z, x)`` where ``x`` is
the teacher's ODE solution started from ``z`` (CIFAR-10: 1M pairs with EDM Heun at 18 steps; ImageNet-64: 5M at
40). Here any scheduler of :data:`~fastdiff.pipelines.sampling.SCHEDULERS` (diffusers' or fastdiff's) drives the
teacher pipeline; ``z`` is the pipeline's own starting noise for image ``i`` (seeded by ``(seed, i)``), so every pair
can be re-made from the manifest alone.

A pairs folder holds ``pairs.json`` (teacher, scheduler, steps, NFE per pair, guidance, seed, count, shard size, the
minutes spent) and ``shard_00000.safetensors``, ... (``noise``, ``x``, ``labels``), each written to a temporary name and
renamed. A killed run continues at the first missing shard; a folder made with other settings is refused by name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor

from fastdiff.errors import InputError

__all__ = ["generate_pairs", "load_pairs", "pair_noise", "MANIFEST"]

MANIFEST = "pairs.json"


def pair_noise(seed: int, indices: range, shape: tuple[int, ...]) -> Tensor:
    """The starting noise of images ``indices`` exactly as the pipeline draws it (one generator per image)."""
    from diffusers.utils.torch_utils import randn_tensor

    from fastdiff.pipelines.sampling import image_seed

    gens = [torch.Generator().manual_seed(image_seed(seed, i)) for i in indices]
    return randn_tensor((len(gens), *shape), generator=gens, dtype=torch.float32)


def _spec(teacher: str, scheduler: str, steps: int, guidance: float, seed: int, num: int, shard_size: int) -> dict:
    return {"teacher": str(teacher), "scheduler": scheduler, "steps": steps, "guidance": guidance, "seed": seed, "num": num,
            "shard_size": shard_size}  # fmt: skip


def generate_pairs(teacher: str | Path, out: str | Path, num: int, scheduler: str = "dpmpp-2m", steps: int = 20,
                   guidance: float = 1.0, seed: int = 0, shard_size: int = 1000, progress: bool = True) -> Path:  # fmt: skip
    """Make (or finish) ``num`` pairs in ``out``; returns the folder. See the module docstring."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from fastdiff.eval.assets import pipeline_path
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.pipelines.sampling import make_scheduler, sample_pipeline

    if num < 1 or shard_size < 1 or steps < 1:
        raise InputError(f"pairs: num, shard_size and steps must be >= 1; got {num}, {shard_size}, {steps}")
    out = Path(out)
    spec = _spec(str(teacher), scheduler, steps, guidance, seed, num, shard_size)
    manifest = _read_manifest(out)
    if manifest is not None and {k: manifest.get(k) for k in spec} != spec:
        differs = sorted(k for k in spec if manifest.get(k) != spec[k])
        raise InputError(f"{out} holds pairs made with other settings (differs in: {', '.join(differs)}); use another "
                         "folder or delete it")  # fmt: skip
    pipe = load_pipeline(pipeline_path(str(teacher)))
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    shards = range(0, num, shard_size)
    manifest = manifest or {**spec, "nfe": None, "minutes": 0.0, "shards": len(shards), "scheduler_class": type(pipe.scheduler).__name__}
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    labels = torch.arange(num) % pipe.num_classes
    bar = tqdm(total=num, desc="pairs", unit="pair", disable=not progress)
    for k, start in enumerate(shards):
        stop = min(start + shard_size, num)
        path = out / f"shard_{k:05d}.safetensors"
        if path.is_file():
            bar.update(stop - start)
            continue
        began = time.perf_counter()
        samples = sample_pipeline(pipe, stop - start, steps, guidance, seed, class_labels=labels[start:stop], first_index=start)
        noise = pair_noise(seed, range(start, stop), pipe.image_shape)
        tmp = path.with_suffix(".tmp")
        save_file({"noise": noise, "x": samples.images.contiguous(), "labels": samples.labels.contiguous()}, tmp)
        tmp.rename(path)
        manifest.update(nfe=samples.nfe, minutes=round(manifest["minutes"] + (time.perf_counter() - began) / 60, 3))
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        bar.update(stop - start)
    bar.close()
    return out


def _read_manifest(out: Path) -> dict | None:
    if not (out / MANIFEST).is_file():
        return None
    try:
        return json.loads((out / MANIFEST).read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{out / MANIFEST} is not valid JSON ({err}); delete the folder to make the pairs again") from None


def load_pairs(folder: str | Path) -> tuple[Tensor, Tensor, Tensor, dict]:
    """``(x, noise, labels, manifest)`` of a finished pairs folder; a clear error for a missing or unfinished one."""
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = _read_manifest(folder)
    if manifest is None:
        raise InputError(f"no reflow pairs in {folder} (no {MANIFEST}); make them with `fastdiff pairs TEACHER --out {folder}`")
    paths = [folder / f"shard_{k:05d}.safetensors" for k in range(manifest["shards"])]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{folder} has {len(paths) - len(missing)} of {len(paths)} pair shards (first missing: {missing[0]}); "
                         "run the same `fastdiff pairs` command again to finish them")  # fmt: skip
    shards = [load_file(p) for p in paths]
    return (torch.cat([s["x"] for s in shards]), torch.cat([s["noise"] for s in shards]), torch.cat([s["labels"] for s in shards]),
            manifest)  # fmt: skip
