"""What a measurement ran on (the benchmarks' JSON and a student's training.json record it)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

__all__ = ["machine", "machine_label", "cpu_bf16_kernels", "cpu_summary"]


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(), "device": "cuda" if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def machine_label(m: dict) -> str:
    """``m`` (a :func:`machine` record) as the benchmark tables name it: the CPU, its vector capability where recorded
    (two CPUs both named "AMD EPYC" were an AVX2 and an AVX-512 one), and the torch threads."""
    capability = f" ({m['cpu_capability']})" if m.get("cpu_capability") else ""
    return f"{m['cpu']}{capability}, {m['torch_threads']} torch thread(s)"


def cpu_bf16_kernels() -> bool:
    """Whether this CPU has oneDNN's bf16 kernels (AVX-512 BW/VL/DQ, AMX or ARM BF16). Without them, bf16 autocast on the
    CPU falls back to emulation: measured 14x slower per step than fp32 (SCott on Fashion-MNIST, one core of an AVX2 AMD
    EPYC: 99 s against 6.8 s)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no bf16 kernels either
        return False


def cpu_summary() -> str:
    """``fastdiff info``'s line on the CPU: its vector capability and whether bf16 training would be emulated."""
    bf16 = ("bf16 kernels (mixed_precision auto: bf16)" if cpu_bf16_kernels() else
            "no bf16 kernels: bf16 is emulated, ~14x slower; mixed_precision auto trains in fp32, or pass --set trainer.mixed_precision=no")  # fmt: skip
    return f"CPU: {torch.backends.cpu.get_cpu_capability()}, {bf16}"
