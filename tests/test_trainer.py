"""The trainer: resume after SIGKILL reproduces the uninterrupted run bit for bit, corrupt checkpoints are skipped,
a NaN stops the run naming the term and the last good checkpoint, 2-process torchrun gives the losses of one
process, and bad input gets clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fastdiff.training.config import load_config
from fastdiff.training.distill import DistillRecipe, build_objective, run_distill
from fastdiff.errors import InputError
from fastdiff.training.trainer import TrainingStopped, find_checkpoint, train

ROOT = Path(__file__).resolve().parent.parent


def _recipe(tmp_path: Path, name: str = "r.yaml", **trainer) -> Path:
    recipe = {
        "objective": "ict", "output_dir": str(tmp_path / "run"), "data": {"name": "digits"},
        "model": {"kind": "unet", "block_out_channels": [16, 32], "attention": False},
        "trainer": {"steps": 12, "batch_size": 32, "checkpoint_every": 4, "log_every": 1, "tracker": "none", "ema_decay": 0.9,
                    "optim": {"lr": 1e-3}, **trainer},
        "eval": {"num_samples": 20, "steps": [], "grid": 0},
    }  # fmt: skip
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def _teacher_recipe(tmp_path: Path, steps: int, checkpoint_every: int) -> Path:
    """A tiny teacher recipe (objective: denoising) on the digits, trained by the same trainer."""
    recipe = {
        "objective": "denoising", "output_dir": str(tmp_path / "run"), "data": {"name": "digits"},
        "model": {"kind": "unet", "block_out_channels": [8, 16], "attention": False},
        "train": {"steps": steps, "batch_size": 16, "checkpoint_every": checkpoint_every, "log_every": 1, "tracker": "none",
                  "warmup_steps": 5, "ema_decay": 0.9},
    }  # fmt: skip
    path = tmp_path / "teacher.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "fastdiff.cli", "train", *map(str, args), "--no-progress"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)  # fmt: skip


def _weights(folder: Path, kind: str = "student") -> dict:
    from safetensors.torch import load_file

    return load_file(next(folder.glob(f"{kind}/unet/*.safetensors")))


def _dmd2_recipe(tmp_path: Path, steps: int, checkpoint_every: int) -> list:
    """The digits DMD2 recipe, small: two phases (generator every 5th step), fake score, GAN head, two optimisers."""
    sets = [f"trainer.steps={steps}", "trainer.batch_size=8", f"trainer.checkpoint_every={checkpoint_every}", "trainer.eval_every=0",
            "trainer.log_every=1", "trainer.tracker=none", "eval.num_samples=8"]  # fmt: skip
    return [ROOT / "recipes" / "dmd2_digits.yaml", *(a for s in sets for a in ("--set", s))]


@pytest.mark.parametrize("kind", ["student", "teacher", "dmd2"])
def test_resume_after_sigkill_is_bitwise(tmp_path, kind):
    """A consistency recipe, a teacher recipe and a two-phase DMD2 recipe (generator, fake score, GAN head and their
    optimisers all come back from the checkpoint), killed after a checkpoint and resumed, end bit-identical."""
    recipe = {"student": lambda: [_recipe(tmp_path, steps=60, checkpoint_every=10)], "teacher": lambda: [_teacher_recipe(tmp_path, 60, 10)],
              "dmd2": lambda: _dmd2_recipe(tmp_path, 40, 10)}[kind]()  # fmt: skip
    kind = "student" if kind == "dmd2" else kind
    full = _cli(*recipe, "--set", f"output_dir={tmp_path / 'full'}")
    assert full.wait(timeout=300) == 0, full.stdout.read()
    run = tmp_path / "killed"
    proc = _cli(*recipe, "--set", f"output_dir={run}")
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step_00000020").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / kind).exists()
    resumed = _cli(*recipe, "--set", f"output_dir={run}", "--resume", "latest")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    a, b = _weights(tmp_path / "full", kind), _weights(run, kind)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tiny_run(tmp_path, steps=10, objective_wrapper=None, resume=None, **trainer):
    recipe = load_config(DistillRecipe, _recipe(tmp_path, steps=steps, **trainer))
    from fastdiff.datasets import load_digits

    data = load_digits("train")
    torch.manual_seed(0)
    objective, _ = build_objective(recipe, 1, 8, data.num_classes)
    if objective_wrapper:
        objective_wrapper(objective)
    return train(objective, data.data, data.labels, recipe.trainer, tmp_path / "run", {"recipe": "tiny"}, resume=resume, progress=False)


def test_sigterm_checkpoints_the_current_step_stops_and_resumes_bitwise(tmp_path):
    """SIGTERM (a scheduler's notice) mid-run: the trainer writes a checkpoint of the step it is on -- not only the last
    regular one --, exits 3 naming it, restores the handlers, and --resume latest ends bit-identical to a run never
    stopped."""
    import re

    recipe = _recipe(tmp_path, steps=60, checkpoint_every=10)
    full = _cli(recipe, "--set", f"output_dir={tmp_path / 'full'}")
    assert full.wait(timeout=300) == 0, full.stdout.read()
    run = tmp_path / "stopped"
    proc = _cli(recipe, "--set", f"output_dir={run}")
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step_00000010").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 3, output
    step = int(re.search(r"stopped by a signal after step (\d+) of 60", output).group(1))
    assert 10 < step < 60 and (run / "checkpoints" / f"step_{step:08d}").is_dir() and not (run / "student").exists()
    resumed = _cli(recipe, "--set", f"output_dir={run}", "--resume", "latest")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and f"(step {step})" in output, output
    a, b = _weights(tmp_path / "full"), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stop_signals_are_restored_after_training(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    _tiny_run(tmp_path, steps=2)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_corrupt_and_incomplete_checkpoints_are_skipped(tmp_path):
    _tiny_run(tmp_path, steps=13)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000008", "step_00000012"]  # retention: keep 2
    weights = ckpts / "step_00000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    messages = []
    assert find_checkpoint(ckpts, {"recipe": "tiny"}, "latest", log=messages.append) == ckpts / "step_00000008"
    assert "model.safetensors is corrupt" in messages[0]
    (ckpts / "step_00000008" / "fastdiff_checkpoint.json").unlink()
    assert find_checkpoint(ckpts, {"recipe": "tiny"}, "latest", log=messages.append) is None
    assert "no readable manifest" in messages[2]
    with pytest.raises(InputError, match="different recipe"):
        find_checkpoint(ckpts, {"recipe": "other"}, "latest")
    _tiny_run(tmp_path, steps=13, resume="latest")  # nothing intact: starts over and replaces the corrupt checkpoints
    assert find_checkpoint(ckpts, {"recipe": "tiny"}, "latest") == ckpts / "step_00000012"
    # a key the fingerprint no longer has (another objective's section, written by an older fastdiff) is not compared;
    # a key it has that the manifest lacks is a difference
    manifest = ckpts / "step_00000012" / "fastdiff_checkpoint.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "recipe": {"recipe": "tiny", "dmd": {"teacher": "x"}}}))
    assert find_checkpoint(ckpts, {"recipe": "tiny"}, "latest") == ckpts / "step_00000012"
    with pytest.raises(InputError, match="differs in: ctm"):
        find_checkpoint(ckpts, {"recipe": "tiny", "ctm": {}}, "latest")


def test_training_seconds_add_up_over_resumed_pieces(tmp_path):
    """Each checkpoint records the training seconds so far; a resumed run adds its own to them, so a benchmark's
    minutes are those of the whole training, not of its last piece."""
    start = time.perf_counter()
    _tiny_run(tmp_path, steps=9)
    first = time.perf_counter() - start
    manifest_path = tmp_path / "run" / "checkpoints" / "step_00000008" / "fastdiff_checkpoint.json"
    manifest = json.loads(manifest_path.read_text())
    assert 0 < manifest["elapsed_s"] < first
    manifest_path.write_text(json.dumps({**manifest, "elapsed_s": 1000.0}))  # the earlier pieces, as recorded
    start = time.perf_counter()
    _, record = _tiny_run(tmp_path, steps=12, resume="latest")
    assert record["start_step"] == 8 and 1000.0 < record["seconds_all_pieces"] < 1000.0 + time.perf_counter() - start


def test_nan_stops_with_step_term_and_checkpoint(tmp_path):
    def inject(objective):
        forward = objective.forward

        def poisoned(batch, phase, step):
            out = forward(batch, phase, step)
            if step == 5:
                out.terms["consistency"] = out.terms["consistency"] * float("nan")
            return out

        objective.forward = poisoned

    with pytest.raises(TrainingStopped, match=r"step 5: loss term 'consistency' of phase 'student' is nan.*step_00000004"):
        _tiny_run(tmp_path, objective_wrapper=inject)


def test_bad_input(tmp_path):
    _tiny_run(tmp_path, steps=5)
    with pytest.raises(InputError, match="already holds checkpoints; pass --resume latest"):
        _tiny_run(tmp_path, steps=5)
    with pytest.raises(InputError, match="batch_size=3 must be divisible by trainer.grad_accum=2"):
        _tiny_run(tmp_path / "b", batch_size=3, grad_accum=2)
    with pytest.raises(InputError, match="unknown key 'trainer.optim.learning_rate'"):
        load_config(DistillRecipe, _recipe(tmp_path), ["trainer.optim.learning_rate=1"])
    recipe = load_config(DistillRecipe, _recipe(tmp_path), ["objective=cd", f"distill.teacher={tmp_path}"])
    with pytest.raises(InputError, match="not a diffusers pipeline folder"):
        run_distill(recipe, progress=False)
    recipe = load_config(DistillRecipe, _recipe(tmp_path), ["objective=cd", "distill.teacher=assets/teachers/fashion-mnist"])
    with pytest.raises(InputError, match=r"makes \(1, 28, 28\) images .* but data digits has \(1, 8, 8\)"):
        run_distill(recipe, progress=False)


def test_grad_accumulation_gives_the_same_losses(tmp_path):
    _, one = _tiny_run(tmp_path / "a", steps=3)
    _, two = _tiny_run(tmp_path / "b", steps=3, grad_accum=2)
    for x, y in zip(one["history"], two["history"]):
        assert x["loss/student/consistency"] == pytest.approx(y["loss/student/consistency"], rel=1e-4)


def test_torchrun_two_processes_match_one(tmp_path):
    """Same global batch over 2 gloo processes: the same losses as 1 process (float tolerance)."""
    recipe = _recipe(tmp_path, steps=4, checkpoint_every=100)
    one = _cli(recipe, "--set", f"output_dir={tmp_path / 'one'}")
    assert one.wait(timeout=300) == 0, one.stdout.read()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "scripts/train.py",
           str(recipe), "--set", f"output_dir={tmp_path / 'two'}", "--no-progress"]  # fmt: skip
    two = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    records = [json.loads((tmp_path / run / "student" / "training.json").read_text()) for run in ("one", "two")]
    assert records[1]["num_processes"] == 2
    assert records[0]["machine"]["torch_threads"] == 1 and records[0]["machine"]["cores"] >= 1  # where its minutes were measured
    for x, y in zip(records[0]["history"], records[1]["history"]):
        assert x["loss/student/consistency"] == pytest.approx(y["loss/student/consistency"], rel=1e-4)


def test_missing_tracker_warns(monkeypatch, capsys):
    """A tracker that is not installed is a warning (the warnings module, not print); the run logs to JSON only."""
    import importlib.util

    from fastdiff.training import trainer

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.warns(UserWarning, match="trainer.tracker=wandb but `wandb` is not installed"):
        assert trainer._tracker("wandb") is None
    assert capsys.readouterr().out == ""


TWO_PHASE_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
from test_contract import ToyGAN, _cfg, _data
from fastdiff.training.trainer import train

torch.manual_seed(0)
_, record = train(ToyGAN(), *_data(), _cfg(7, log_every=1, checkpoint_every=100), sys.argv[1], {{}}, progress=False)
if record["is_main_process"]:
    open(sys.argv[1] + ".json", "w").write(json.dumps(record["history"]))
"""


def test_torchrun_two_phase_objective_matches_one_process(tmp_path):
    """Under DDP each phase leaves the other network without gradient (find_unused_parameters): 2 gloo processes
    run the generator / critic toy and give the losses of 1 process."""
    script = tmp_path / "two_phase.py"
    script.write_text(TWO_PHASE_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518", str(script), str(tmp_path / "two")]
    two = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f"{run}.json").read_text()) for run in ("one", "two"))
    assert [set(x) for x in a] == [set(y) for y in b] and "loss/generator/generator" in a[5]
    for x, y in zip(a, b):
        for key in (k for k in x if k.startswith("loss")):
            assert x[key] == pytest.approx(y[key], rel=1e-4), (x["step"], key)


@pytest.mark.parametrize("kernels, precision, warned, ran_in", [(False, "bf16", True, "bf16"), (True, "bf16", False, "bf16"), (False, "no", False, "no"),
                                                          (False, "auto", False, "no"), (True, "auto", False, "bf16")])  # fmt: skip
def test_emulated_bf16_on_a_cpu_warns(tmp_path, monkeypatch, kernels, precision, warned, ran_in):
    """bf16 autocast on a CPU without bf16 kernels (AVX2 only) is emulated, 14x slower than fp32: the run says so and
    names the fix; with the kernels, or in fp32, it says nothing. ``auto`` trains in bf16 only where the kernels are,
    and the run's record says which precision it ran in."""
    import warnings

    from fastdiff import machine

    from accelerate.state import AcceleratorState

    monkeypatch.setattr(machine, "cpu_bf16_kernels", lambda: kernels)
    AcceleratorState._reset_state(True)  # (accelerate keeps one precision per process: the other tests run in fp32)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, record = _tiny_run(tmp_path, steps=1, mixed_precision=precision)
    finally:
        AcceleratorState._reset_state(True)
    slow = [w for w in caught if "without bf16 kernels" in str(w.message)]
    assert bool(slow) == warned and record["mixed_precision"] == ran_in
    assert not slow or "--set trainer.mixed_precision=no" in str(slow[0].message)


def test_cpu_bf16_kernels_agree_with_the_cpu_flags():
    """oneDNN's bf16 kernels exist with AVX-512 (native bf16 dot products with AVX512_BF16 or AMX) and not on AVX2."""
    from fastdiff.machine import cpu_bf16_kernels

    info = Path("/proc/cpuinfo")
    lines = [line for line in info.read_text().splitlines() if line.startswith("flags")] if info.is_file() else []
    if not lines:
        pytest.skip("no x86 CPU flags to compare with")
    flags = set(lines[0].split(":", 1)[1].split())
    if flags & {"avx512_bf16", "amx_bf16"}:
        assert cpu_bf16_kernels()
    if not flags & {"avx512bw", "amx_bf16"}:
        assert not cpu_bf16_kernels()


def test_images_per_second_counts_the_steps_of_each_log_interval(tmp_path, monkeypatch):
    """With a clock that advances one second per step, every logged interval reads batch_size images per second: also
    the last, shorter one (5 steps, log_every 2), and the first after a resume from a step that is not a multiple."""
    import fastdiff.training.trainer as trainer

    clock = [0.0]
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: clock[0])

    def tick(objective):
        objective.register_forward_pre_hook(lambda *a: clock.__setitem__(0, clock[0] + 1.0))

    _, record = _tiny_run(tmp_path, steps=5, objective_wrapper=tick, log_every=2, checkpoint_every=3)
    assert [h["step"] for h in record["history"]] == [2, 4, 5]
    assert [h["images_per_s"] for h in record["history"]] == [32.0, 32.0, 32.0]
    _, record = _tiny_run(tmp_path, steps=8, objective_wrapper=tick, log_every=2, checkpoint_every=3, resume="latest")
    assert record["start_step"] == 3 and [h["step"] for h in record["history"]] == [4, 6, 8]
    assert [h["images_per_s"] for h in record["history"]] == [32.0, 32.0, 32.0]
