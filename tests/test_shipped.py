"""The shipped teachers and extractors load offline, swap schedulers, and drive the quickstart and `fastdiff sample`."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

from fastdiff.cli import main
from fastdiff.errors import InputError
from fastdiff.eval.assets import ASSETS
from fastdiff.eval.extractors import load_extractor
from fastdiff.pipelines.class_conditional import ClassConditionalPipeline
from fastdiff.eval.sources import load_source, source_features
from fastdiff.pipelines.class_conditional import load_pipeline
from fastdiff.eval.metrics import fid_of_samples
from fastdiff.quickstart import QUICKSTART_SOLVER, QUICKSTART_SOLVER_CONFIG, QuickstartConfig, run_quickstart
from fastdiff.pipelines.sampling import make_scheduler, sample_pipeline

TEACHERS = ["digits", "fashion-mnist", "fashion-mnist-dit"]


@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_loads_offline_and_swaps_scheduler(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = ASSETS / "teachers" / name
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 15 * 2**20, f"{path} is {size / 2**20:.1f} MB"
    pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline="pipeline", trust_remote_code=True)
    assert isinstance(pipe, ClassConditionalPipeline) and pipe.num_classes == 10
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    out = pipe(class_labels=[0, 7], num_inference_steps=3, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    assert out.images.shape[0] == 2 and np.isfinite(out.images).all()
    assert json.loads((path / "training.json").read_text())["steps"] > 0  # how it was trained is recorded


def test_shipped_student_loads_with_its_own_scheduler_and_records_its_training(monkeypatch):
    """assets/students/fashion-mnist: a plain pipeline folder (<= 15 MB) with the diffusers scheduler it samples with,
    made from the fashion-mnist teacher's images and classes, with the recipe, command and minutes recorded."""
    from fastdiff.eval.assets import student_path
    from fastdiff.training.distill import OBJECTIVE_SECTIONS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = student_path("fashion-mnist")
    assert path is not None and sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) <= 15 * 2**20
    pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline="pipeline", trust_remote_code=True)
    scheduler = json.loads((path / "model_index.json").read_text())["scheduler"]
    assert scheduler[0] == "diffusers" and type(pipe.scheduler).__name__ == scheduler[1] and pipe.num_classes == 10
    out = pipe(class_labels=[0, 7], num_inference_steps=1, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape[0] == 2 and np.isfinite(out.images).all()
    record = json.loads((path / "training.json").read_text())
    section = OBJECTIVE_SECTIONS[record["recipe"]["objective"]][0]  # where a teacher-distilling objective names its teacher
    assert record["recipe"][section]["teacher"] == "assets/teachers/fashion-mnist" and "fastdiff" in record["command"]
    assert record["wall_minutes_this_run"] > 0 and record["steps"] == record["recipe"]["trainer"]["steps"]


@pytest.mark.parametrize("name", ["digits", "fashion-mnist"])
def test_extractor_is_accurate(name):
    """The shipped classifier's accuracy, recomputed on the test split, is high and what its config records."""
    from fastdiff.datasets import load_dataset

    record = json.loads((ASSETS / "extractors" / name / "config.json").read_text())
    ext = load_extractor(name)
    test = load_dataset(name, "test")
    with torch.no_grad():
        predicted = torch.cat([ext.module(x).argmax(1) for x in test.data.split(2048)])
    accuracy = (predicted == test.labels).float().mean().item()
    assert accuracy > 0.85 and accuracy == pytest.approx(record["test_accuracy"], abs=2e-3)
    assert ext(test.data[:2]).shape == (2, 128)


def test_quickstart_smoke(tmp_path):
    cfg = QuickstartConfig(teacher="digits", schedulers=("ddim", "pndm"), steps=(2,), reference_steps=3,
                           num_samples=20, out=str(tmp_path))  # fmt: skip
    record = run_quickstart(cfg, progress=False)
    ddim, pndm, teacher, cached = record["rows"]
    assert [r["nfe"] for r in record["rows"]] == [2, 3, 3, 3]  # the last: the teacher's run with the feature cache
    assert cached["sampler"].startswith("teacher: ddim + cache") and "speedup" in cached
    # each row scores its own samples: the teacher's row is the FID of a fresh 3-step DDIM run with the same seed
    # (as saved uint8 pixels), and the cache really changed the computation (reused features give other samples)
    pipe = load_pipeline(ASSETS / "teachers" / "digits")
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    extractor = load_extractor("digits")
    reference = source_features(load_source("digits:test", 1), extractor)
    again = fid_of_samples(sample_pipeline(pipe, 20, 3, cfg.guidance_scale, cfg.seed).images, extractor, reference)
    assert teacher["fid"] == pytest.approx(again, rel=1e-9)
    assert len({ddim["fid"], pndm["fid"], teacher["fid"], cached["fid"]}) == 4
    for name in ("quickstart.json", "fid_vs_nfe.png", "grid.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_quickstart_student_rows_and_panels(tmp_path, monkeypatch):
    """Student rows sample the student pipeline with its own scheduler at guidance 1 (whatever the teacher's guidance),
    with the same seeds; they report a speed-up over the teacher's reference run and join the picture of grids."""
    import fastdiff.quickstart

    student_dir = ASSETS / "teachers" / "digits"  # any pipeline of the teacher's shape stands in for a student
    panels = []
    monkeypatch.setattr(fastdiff.quickstart, "save_panels", lambda p, path: panels.extend(p))
    cfg = QuickstartConfig(teacher="digits", schedulers=("ddim", "euler"), steps=(2,), reference_steps=3, cache=None,
                           student=str(student_dir), student_steps=(1, 2), guidance_scale=2.0, num_samples=12, out=str(tmp_path))  # fmt: skip
    record = run_quickstart(cfg, progress=False)
    students = [r for r in record["rows"] if r["sampler"].startswith("student")]
    assert [(r["sampler"], r["nfe"]) for r in students] == [("student: denoising (fastdiff)", 1), ("student: denoising (fastdiff)", 2)]
    assert all(r["speedup"] > 0 for r in students) and record["student"] == str(student_dir)
    pipe = load_pipeline(student_dir)
    extractor = load_extractor("digits")
    reference = source_features(load_source("digits:test", 1), extractor)
    again = sample_pipeline(pipe, 12, 1, 1.0, cfg.seed).images
    assert students[0]["fid"] == pytest.approx(fid_of_samples(again, extractor, reference), rel=1e-9)
    titles = [t.split("\n")[0] for t, _ in panels]
    best = min((r for r in record["rows"] if r["sampler"] in ("ddim (diffusers)", "euler (diffusers)")), key=lambda r: r["fid"])
    assert titles == ["teacher: ddim (diffusers)", best["sampler"], "student: denoising (fastdiff)"]
    assert torch.equal(panels[2][1], again[:100])  # the student's one-step samples, same seeds


def _teacher_with_schedule(tmp_path, monkeypatch, steps: int, guidance: float) -> dict:
    """A copy of the digits teacher whose schedules/ holds an optimised ``steps``-step ghvb-1.8 schedule, as
    `fastdiff schedule optimize` writes it; the shipped assets point at the copy."""
    import shutil

    import fastdiff.eval.assets as assets
    from fastdiff.pipelines.schedule_files import optimize_pipeline_schedule, write_schedule

    root = tmp_path / "assets"
    shutil.copytree(ASSETS / "teachers" / "digits", root / "teachers" / "digits")
    monkeypatch.setattr(assets, "ASSETS", root)
    record = optimize_pipeline_schedule(load_pipeline(root / "teachers" / "digits"), "digits", "ghvb-1.8", steps, guidance,
                                        num_samples=4, seed=1, fine_points=12)  # fmt: skip
    write_schedule(record, root / "teachers" / "digits" / "schedules" / f"ghvb-1.8-{steps}nfe-w{guidance:g}.json")
    return record


def test_quickstart_shows_the_solver_on_its_shipped_optimised_schedule(tmp_path, monkeypatch):
    """Where a schedule ships for the teacher, solver, steps and guidance, the quickstart runs the solver on it next to
    its default schedule, with the FID gain; the row's samples are the solver's on the file's sigmas, same seeds."""
    record = _teacher_with_schedule(tmp_path, monkeypatch, 3, 1.0)
    cfg = QuickstartConfig(teacher="digits", schedulers=("ddim", "ghvb-1.8"), steps=(2, 3), reference_steps=4, cache=None,
                           student=None, num_samples=16, out=str(tmp_path / "q"))  # fmt: skip
    result = run_quickstart(cfg, progress=False)
    rows = {(r["sampler"], r["steps"]): r for r in result["rows"]}
    optimised = rows["ghvb-1.8 + optimised schedule (fastdiff)", 3]
    assert [k for k in rows if "optimised" in k[0]] == [("ghvb-1.8 + optimised schedule (fastdiff)", 3)]  # no file for 2 steps
    assert optimised["fid_gain"] == round(rows["ghvb-1.8 (fastdiff)", 3]["fid"] / optimised["fid"], 2)
    assert optimised["fid"] != rows["ghvb-1.8 (fastdiff)", 3]["fid"] and "ghvb-1.8 at 3 steps" in result["optimised_schedules"]
    pipe = load_pipeline(ASSETS / "teachers" / "digits")
    pipe.scheduler = make_scheduler("ghvb-1.8", pipe.scheduler.config)
    again = sample_pipeline(pipe, 16, 3, 1.0, cfg.seed, schedule=record)
    assert pipe.scheduler.sigmas[:-1].tolist() == pytest.approx(record["sigmas"], rel=1e-6)
    reference = source_features(load_source("digits:test", 1), load_extractor("digits"))
    assert optimised["fid"] == pytest.approx(fid_of_samples(again.images, load_extractor("digits"), reference), rel=1e-9)
    cfg.optimised, cfg.steps = False, (3,)
    assert not [r for r in run_quickstart(cfg, progress=False)["rows"] if "optimised" in r["sampler"]]


def test_quickstart_runs_its_solver_in_the_recommended_config(tmp_path):
    """fastdiff's solver runs in the quickstart with the recommended setting's config (dynamic thresholding on), as
    the JSON records: its FID is that of the thresholded scheduler's samples, not the plain one's (at guidance 6,
    where the guided x0 estimates leave [-1, 1])."""
    cfg = QuickstartConfig(teacher="fashion-mnist", schedulers=(QUICKSTART_SOLVER,), steps=(3,), reference_steps=4, cache=None,
                           student=None, optimised=False, guidance_scale=6.0, num_samples=16, out=str(tmp_path / "q"))  # fmt: skip
    result = run_quickstart(cfg, progress=False)
    assert result["scheduler_config"] == {QUICKSTART_SOLVER: QUICKSTART_SOLVER_CONFIG} == {QUICKSTART_SOLVER: {"thresholding": True}}
    row = next(r for r in result["rows"] if r["sampler"] == f"{QUICKSTART_SOLVER} (fastdiff)")
    pipe = load_pipeline(ASSETS / "teachers" / "fashion-mnist")
    reference = source_features(load_source("fashion-mnist:test", 1), load_extractor("fashion-mnist"))
    fids, config = [], dict(pipe.scheduler.config)
    for overrides in (QUICKSTART_SOLVER_CONFIG, {}):
        pipe.scheduler = make_scheduler(QUICKSTART_SOLVER, config, **overrides)
        fids.append(fid_of_samples(sample_pipeline(pipe, 16, 3, 6.0, cfg.seed).images, load_extractor("fashion-mnist"), reference))
    assert row["fid"] == pytest.approx(fids[0], rel=1e-9) and fids[0] != pytest.approx(fids[1], rel=1e-6)


def test_shipped_schedule_is_refused_for_another_guidance(tmp_path, monkeypatch):
    from fastdiff.eval.assets import shipped_schedule

    _teacher_with_schedule(tmp_path, monkeypatch, 2, 1.0)
    path = tmp_path / "assets" / "teachers" / "digits" / "schedules" / "ghvb-1.8-2nfe-w1.json"
    assert shipped_schedule("digits", "ghvb-1.8", 2, 1.0)["nfe"] == 2 and shipped_schedule("digits", "ghvb-1.8", 3, 1.0) is None
    path.rename(path.with_name("ghvb-1.8-2nfe-w3.json"))
    with pytest.raises(InputError, match="optimised for guidance 1.0, not 3"):
        shipped_schedule("digits", "ghvb-1.8", 2, 3.0)


@pytest.mark.parametrize("steps", [4, 8])
def test_fashion_mnist_ships_the_quickstarts_optimised_schedules(steps):
    """The quickstart's default steps each have a shipped optimised schedule for its fastdiff solver at guidance 1."""
    from fastdiff.eval.assets import shipped_schedule
    from fastdiff.quickstart import QuickstartConfig as Config

    assert steps in Config().steps
    record = shipped_schedule("fashion-mnist", QUICKSTART_SOLVER, steps, 1.0)
    assert record is not None and len(record["sigmas"]) == steps and record["sigmas"] == sorted(record["sigmas"], reverse=True)


def test_quickstart_solver_is_the_benchmarks_recommended_setting():
    """The quickstart shows fastdiff's solver of the setting `fastdiff bench samplers` recommends (benchmarks/samplers.json),
    with the same scheduler config, on a shipped schedule of the same kind (DP-optimised, or fitted to the solver)."""
    from pathlib import Path

    from fastdiff.bench.samplers import SAMPLER_ENTRIES, optimised_targets
    from fastdiff.eval.assets import shipped_schedule, teacher_path
    from fastdiff.pipelines.sampling import make_scheduler

    data = json.loads((Path(__file__).resolve().parent.parent / "benchmarks" / "samplers.json").read_text())
    recommended = optimised_targets(data)["recommended"]
    label, _, schedule = recommended.partition(" + ")
    _, name, overrides, _ = next(e for e in SAMPLER_ENTRIES if e[0] == label)
    config = json.loads((teacher_path("fashion-mnist") / "scheduler" / "scheduler_config.json").read_text())
    quickstart = make_scheduler(QUICKSTART_SOLVER, config, **QUICKSTART_SOLVER_CONFIG)
    assert dict(quickstart.config) == dict(make_scheduler(name, config, **overrides).config), recommended
    fitted = [bool(shipped_schedule("fashion-mnist", QUICKSTART_SOLVER, k, 1.0)["calibration"].get("refined")) for k in (4, 8)]
    assert fitted == [schedule == "fitted schedule"] * 2, recommended


def test_shipped_student_is_the_benchmarks_best_one_step_student():
    """assets/students/fashion-mnist was trained from the recipe (and switches) of the row with the lowest 1-step FID in
    `fastdiff bench distill-fashion-mnist` (benchmarks/distill-fashion-mnist.json): a student that beats it replaces it."""
    from pathlib import Path

    from fastdiff.bench.distill import _training
    from fastdiff.eval.assets import student_path
    from fastdiff.training.config import load_config, to_dict
    from fastdiff.training.distill import DistillRecipe

    repo = Path(__file__).resolve().parent.parent
    rows = json.loads((repo / "benchmarks" / "distill-fashion-mnist.json").read_text())["rows"]
    best = min((r for r in rows if "1" in r["fid"]), key=lambda r: r["fid"]["1"]["mean"])
    shipped = json.loads((student_path("fashion-mnist") / "training.json").read_text())["recipe"]
    bench_recipe = load_config(DistillRecipe, repo / best["recipe"], [*best["overrides"], "trainer.tracker=none"])  # as the bench trains it

    def but_precision(identity: dict) -> dict:
        return {**identity, "trainer": {k: v for k, v in identity["trainer"].items() if k != "mixed_precision"}}

    assert but_precision(_training(shipped)) == but_precision(_training(to_dict(bench_recipe))), f"the benchmark's best 1-step student is {best['objective']}"
    # the precision is the machine's where the recipe says auto (bf16 with bf16 kernels, as the shipped one was trained)
    assert bench_recipe.trainer.mixed_precision in (shipped["trainer"]["mixed_precision"], "auto")


def test_quickstart_refuses_a_student_of_another_teacher_before_sampling(tmp_path, monkeypatch):
    import fastdiff.pipelines.sampling

    monkeypatch.setattr(fastdiff.pipelines.sampling, "sample_pipeline", lambda *a, **k: pytest.fail("sampled first"))
    cfg = QuickstartConfig(teacher="digits", student=str(ASSETS / "teachers" / "fashion-mnist"), out=str(tmp_path / "q"))
    with pytest.raises(InputError, match="makes .classes, .channels, size.. = .10, .1, 28.., the digits teacher .10, .1, 8"):
        run_quickstart(cfg, progress=False)
    assert not (tmp_path / "q").exists()  # nothing written


def test_quickstart_refuses_a_bad_cache_setting_before_sampling(tmp_path, monkeypatch):
    import fastdiff.pipelines.sampling

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the cache setting")

    monkeypatch.setattr(fastdiff.pipelines.sampling, "sample_pipeline", no_sampling)
    cfg = QuickstartConfig(teacher="digits", schedulers=("ddim",), steps=(2,), num_samples=4, out=str(tmp_path), cache="every:0")
    with pytest.raises(InputError, match="interval must be an integer >= 1"):
        run_quickstart(cfg, progress=False)


def test_sample_cli(tmp_path):
    args = ["sample", "--pipeline", str(ASSETS / "teachers" / "digits"), "--scheduler", "unipc", "--steps", "3",
            "--num-samples", "6", "--classes", "3,4", "--guidance", "2", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    data = np.load(tmp_path / "samples.npz")
    assert data["images"].shape == (6, 8, 8, 1) and data["images"].dtype == np.uint8
    assert data["class_labels"].tolist() == [3, 4, 3, 4, 3, 4] and (tmp_path / "grid.png").is_file()


def test_fid_of_a_pipeline_equals_fid_of_its_saved_samples(tmp_path, capsys):
    """`fastdiff fid --pipeline ...` and `fastdiff sample` + `fastdiff fid samples.npz` score the same images the same:
    both as the uint8 pixels that are saved (the standard protocol), not once as floats and once as pixels."""
    common = ["--pipeline", str(ASSETS / "teachers" / "digits"), "--scheduler", "ddim", "--steps", "4",
              "--num-samples", "64", "--seed", "7", "--no-progress"]  # fmt: skip
    fid_args = ["--extractor", "digits", "--no-cache"]
    assert main(["fid", *common, *fid_args, "--json", str(tmp_path / "direct.json"), "digits:test"]) == 0
    assert main(["sample", *common, "--out", str(tmp_path / "s")]) == 0
    assert main(["fid", str(tmp_path / "s" / "samples.npz"), "digits:test", *fid_args, "--no-progress",
                 "--json", str(tmp_path / "saved.json")]) == 0  # fmt: skip
    direct, saved = (json.loads((tmp_path / f"{n}.json").read_text())["metrics"]["fid"] for n in ("direct", "saved"))
    assert direct == pytest.approx(saved, rel=1e-6)


def test_extractor_scores_saved_pixels():
    """Features of float images are the features of their uint8 quantisation (clipped and rounded as saved)."""
    from fastdiff.images import from_pixels, to_pixels

    ext = load_extractor("digits")
    x = 1.2 * torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    saved = from_pixels(to_pixels(x))
    assert not torch.equal(saved, x.clamp(-1, 1))  # the quantisation is a real change of the input
    assert torch.equal(ext(x), ext(saved))
    assert torch.equal(ext(x), ext.module.features(saved))


def test_package_data_ships_every_asset():
    """pyproject's package-data globs cover every shipped file, so `pip install .` (not editable) carries them all."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fastdiff"]
    shipped = {p for g in globs for p in (root / "fastdiff").glob(g) if p.is_file()}
    files = {p for p in ASSETS.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert ASSETS == root / "fastdiff" / "assets" and len(files) >= 17
    assert files == shipped, f"not shipped: {sorted(map(str, files - shipped))}"


def test_sample_grid_previews_at_most_100(tmp_path, monkeypatch):
    """`fastdiff sample --num-samples 120` keeps every image in samples.npz and shows the first 100 in a 10 x 10
    grid.png (not a 2000-image poster); a shipped teacher is found by name from any directory."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    args = ["sample", "--pipeline", "digits", "--steps", "1", "--num-samples", "120", "--out", "s", "--no-progress"]
    assert main(args) == 0
    assert np.load(tmp_path / "s" / "samples.npz")["images"].shape == (120, 8, 8, 1)
    assert Image.open(tmp_path / "s" / "grid.png").size == ((10 * 9 + 1) * 4,) * 2  # 10 x 10 tiles of 8 px + 1 px gaps, x4
    assert main([*args, "--overwrite", "--preview", "6", "--nrow", "3", "--scale", "1"]) == 0
    assert Image.open(tmp_path / "s" / "grid.png").size == (3 * 9 + 1, 2 * 9 + 1)
    before = (tmp_path / "s" / "samples.npz").read_bytes()
    import fastdiff.pipelines.runs as runs

    monkeypatch.setattr(runs, "draw", lambda *a, **k: pytest.fail("sampled before checking --preview"))
    assert main([*args, "--overwrite", "--preview", "0"]) == 2  # refused before sampling: nothing rewritten
    assert (tmp_path / "s" / "samples.npz").read_bytes() == before
