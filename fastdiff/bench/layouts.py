"""``fastdiff bench dmd2-layouts``: peak memory and seconds per training step of DMD2's two network layouts.

DMD2's official code holds three full networks (frozen teacher, generator, fake score) and needs >= 2 GPUs with FSDP
for SD-1.5 (one A100 runs out of memory at batch 1). :class:`~fastdiff.objectives.DistributionMatching` also offers
one frozen base with the generator and the fake score as two peft LoRA adapters (teacher = adapters off). This
benchmark trains both layouts with fastdiff's trainer (AdamW, bf16 autocast -- the official precision --, gradient
checkpointing, classifier-free guided real score, GAN head on the fake score, the trainer's EMA of the generator)
on a random-init ``UNet2DConditionModel`` of SD-1.5's shape at 64x64 latents with random prompt embeddings, batch 1,
one generator and one critic update per step. Each cell runs in a fresh process, so its peak resident memory is its
own. A layout whose static memory (weights + gradients + AdamW moments, counted from the built networks) exceeds the
machine's available memory is recorded as not fitting, without being run; the same pair on SD-1.5's shape at half
width gives the measured ratio.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["SHAPES", "LAYOUTS", "bench_layouts", "render_layouts"]

# UNet2DConditionModel's defaults are SD-1.5's blocks (320/640/1280/1280, 2 layers, 8 heads); these set the rest
_SD15 = {"sample_size": 64, "cross_attention_dim": 768}
SHAPES = {
    "SD-1.5": {**_SD15},
    "SD-1.5, half width": {**_SD15, "block_out_channels": (160, 320, 640, 640)},
    "tiny (--quick)": {"sample_size": 16, "block_out_channels": (32, 64), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                       "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32, "layers_per_block": 1},
}  # fmt: skip
LAYOUTS = {"three networks": None, "one base + 2 LoRA (rank 64)": 64}
PROMPT_TOKENS = 77
GUIDANCE = 1.75  # DMD2's SD-1.5 real_guidance_scale
STEPS = 3  # the first is warm-up; seconds per step are the median of the others


def bench_layouts(quick: bool = False, progress: bool = True) -> dict:
    """Every (shape, layout) cell in its own process; the JSON record."""
    from tqdm.auto import tqdm

    from fastdiff.bench.common import machine

    shapes = ["tiny (--quick)"] if quick else ["SD-1.5", "SD-1.5, half width"]
    cells = [(s, layout) for s in shapes for layout in LAYOUTS]
    rows = []
    for shape, layout in tqdm(cells, desc="dmd2 layouts", disable=not progress):
        done = subprocess.run([sys.executable, "-m", "fastdiff.bench.layouts", shape, layout], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the {layout} cell on {shape} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"machine": machine(), "quick": quick, "batch_size": 1, "guidance_scale": GUIDANCE, "steps": STEPS, "rows": rows}


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _objective(shape: str, rank: int | None):
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from fastdiff.objectives import DistributionMatching, TextConditioner
    from fastdiff.schedules import VPSchedule

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SHAPES[shape])
    width = unet.config.cross_attention_dim
    conditioner = TextConditioner(torch.randn(4, PROMPT_TOKENS, width), torch.randn(PROMPT_TOKENS, width))
    schedule = VPSchedule.from_config(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config)
    return DistributionMatching(unet, schedule, "epsilon", conditioner, guidance_scale=GUIDANCE, lora_rank=rank,
                                gradient_checkpointing=True)  # fmt: skip


def _static_bytes(objective) -> dict:
    """Weights (each tensor once), the largest phase's gradients, AdamW's two moments of every trained parameter, and
    the trainer's EMA copy of the generator's trained weights."""
    params = {id(p): p for p in objective.parameters()}
    size = {k: p.numel() * p.element_size() for k, p in params.items()}
    phases = {phase: {id(p) for p in objective.parameters_for(phase)} for phase in objective.phases}
    trained = set().union(*phases.values())
    ema = sum(size[id(p)] for p in objective.export().parameters() if p.requires_grad)
    weights = sum(size.values())
    grads = max(sum(size[k] for k in ids) for ids in phases.values())
    moments = 2 * sum(size[k] for k in trained)
    return {"parameters": sum(p.numel() for p in params.values()), "trained_parameters": sum(params[k].numel() for k in trained),
            "weights": weights, "gradients": grads, "adam_moments": moments, "ema": ema, "total": weights + grads + moments + ema}  # fmt: skip


def _measure(shape: str, layout: str) -> dict:
    """One cell (run in its own process)."""
    import statistics

    import torch

    from fastdiff.training.trainer import OptimConfig, TrainerConfig, train

    available = _available_bytes()  # before building: the networks' own weights are part of the static total
    objective = _objective(shape, LAYOUTS[layout])
    static = _static_bytes(objective)
    row: dict[str, Any] = {"shape": shape, "layout": layout, "static": static, "available_bytes": available}
    if static["total"] > available:
        return {**row, "fits": False}
    c = objective.export().config
    data = torch.randn(4, c["in_channels"], c["sample_size"], c["sample_size"])
    cfg = TrainerConfig(steps=STEPS, batch_size=1, mixed_precision="bf16", tracker="none", log_every=1, checkpoint_every=10**6,
                        optim=OptimConfig(kind="adamw", lr=1e-6))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        _, record = train(objective, data, torch.arange(4), cfg, tmp, {}, progress=False)
    seconds = [1 / h["images_per_s"] for h in record["history"][1:]]  # batch 1, logged every step
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {**row, "fits": True, "peak_rss_bytes": peak, "s_per_step": statistics.median(seconds), "all_s_per_step": seconds,
            "wall_s": time.perf_counter() - start}  # fmt: skip


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def render_layouts(data: dict) -> list[str]:
    lines = [
        "## DMD2 network layouts: memory and speed", "",
        f"`fastdiff bench dmd2-layouts`: one training step of DMD2 (a generator and a critic update, batch {data['batch_size']}, "
        f"guided real score w = {data['guidance_scale']:g}, GAN head, gradient checkpointing, bf16 autocast, AdamW, the "
        "trainer's EMA) with random-init `UNet2DConditionModel`s of SD-1.5's shape at 64x64 latents and random prompt "
        "embeddings. *Three networks*: teacher, generator and fake score as full copies (the official layout); *one "
        "base + 2 LoRA*: the generator and the fake score as peft adapters on the one frozen teacher. Static memory is "
        "counted from the built networks (weights + one phase's gradients + AdamW moments + EMA); peak RSS is the "
        f"process's measured high-water mark; seconds per step: median of steps 2..{data['steps']}.", "",
        "| UNet | layout | parameters (trained) | static memory | peak RSS | s / step |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in data["rows"]:
        s = r["static"]
        params = f"{s['parameters'] / 1e6:.1f} M ({s['trained_parameters'] / 1e6:.1f} M)"
        if r["fits"]:
            lines.append(f"| {r['shape']} | {r['layout']} | {params} | {_gib(s['total'])} | {_gib(r['peak_rss_bytes'])} | {r['s_per_step']:.1f} |")
        else:
            lines.append(f"| {r['shape']} | {r['layout']} | {params} | {_gib(s['total'])} | does not fit ({_gib(r['available_bytes'])} "
                         "available): not run | - |")  # fmt: skip
    return lines


if __name__ == "__main__":
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    print(json.dumps(_measure(sys.argv[1], sys.argv[2])))
