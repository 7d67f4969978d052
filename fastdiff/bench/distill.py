"""``fastdiff bench distill`` / ``distill-fashion-mnist``: distilled students side by side with their teacher.

In one run per data set: each recipe of the set is trained as written in ``recipes/``, its EMA student is scored
with the domain FID of 1-, 2- (and 4-) step samples (several seeds), next to the teacher at 50 NFE and the best
fastdiff ODE sampler on the teacher at the same NFE, with the wall-clock minutes each training took on this
machine. Trainings go to ``runs/bench/distill-<data set>/<row label as a slug>`` (relative to the current directory)
and ``--resume`` continues them from their checkpoints (or takes a finished student of the same recipe) after a
kill, and keeps the FIDs already scored; each training's rows are one cell of ``--resume`` (kept once scored, even where
the training's folder is gone) and of ``--shard`` (the trainings split over processes). On digits, also the trainer's
overhead: steps/s of :func:`fastdiff.training.trainer.train` against a plain PyTorch loop doing the same computation
(same objective, batches, optimiser, clipping, EMA), measured alternately in the same process; and the step costs of
two choices that decide how long a CPU training takes (:func:`step_costs`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from functools import cache, cached_property, partial
from pathlib import Path
from typing import Any

import torch

__all__ = ["DISTILL_RECIPES", "FASHION_RECIPES", "DISTILL_SETS", "bench_distill", "bench_distill_fashion", "trainer_overhead", "step_costs",
           "render_distill"]  # fmt: skip

# label -> (recipe, overrides[, sampling]): iLCT is run as written and without its minibatch OT pairing (the switch that
# decides the recipe's default on digits); DMD2 as written (one-step generator, fake score updated 5 times per generator
# update, GAN on), then with one switch each: a 4-step generator, TTUR 1, no GAN; f-distill with each divergence; CTM
# as written (gamma 0, GAN from half-way), with the GAN off, and its student sampled with gamma = 1; 2-RF++ as written
# (U-shaped t, LPIPS-Huber-1/t), sampled with its own sampler, then with uniform t, L2, pseudo-Huber; SCott as written
# (eta 0.3, h 3, adversary) and one switch each. ``sampling``:
# scheduler settings a row samples with; rows with the same recipe and overrides share one training.
DIVERGENCES = ("reverse_kl", "softened_rkl", "jensen_shannon", "squared_hellinger", "forward_kl", "jeffreys")
DISTILL_RECIPES = {
    "iCT": ("recipes/ict_digits.yaml", ()),
    "iLCT": ("recipes/ilct_digits.yaml", ("consistency.ot=true",)),
    "iLCT without OT": ("recipes/ilct_digits.yaml", ("consistency.ot=false",)),
    "CD (LCM-style)": ("recipes/cd_digits.yaml", ()),
    "SCott": ("recipes/scott_digits.yaml", ()),
    "SCott eta=0": ("recipes/scott_digits.yaml", ("scott.eta=0",)),
    "SCott eta=1": ("recipes/scott_digits.yaml", ("scott.eta=1",)),
    "SCott h=1": ("recipes/scott_digits.yaml", ("scott.substeps=1",)),
    "SCott without adversary": ("recipes/scott_digits.yaml", ("scott.adversarial_weight=0", "trainer.phase_optim={}")),  # no discriminator phase
    # the adversary's weight 0.4 times VQGAN's gradient-norm ratio at the student's output (about 0.026 at step 0)
    "SCott adaptive adversary": ("recipes/scott_digits.yaml", ("scott.adaptive_adversary=true",)),
    "SCott adaptive adversary eta=0.1": ("recipes/scott_digits.yaml", ("scott.adaptive_adversary=true", "scott.eta=0.1")),
    "DMD2": ("recipes/dmd2_digits.yaml", ()),
    "DMD2 4-step": ("recipes/dmd2_digits.yaml", ("dmd.generator_steps=4", "eval.steps=[1, 2, 4]")),
    "DMD2 TTUR 1": ("recipes/dmd2_digits.yaml", ("trainer.phase_optim.generator.update_every=1",)),
    "DMD2 without GAN": ("recipes/dmd2_digits.yaml", ("dmd.gan_generator_weight=0", "dmd.gan_critic_weight=0")),
    **{f"f-distill {d}": ("recipes/fdistill_digits.yaml", (f"dmd.divergence={d}",)) for d in DIVERGENCES[1:]},  # reverse_kl: the DMD2 row (the same training exactly, tested)
    # G starts from the CD row's student, half the steps (as the Fashion-MNIST rows "DMD2 from CD"; the CD row trains first)
    "DMD2 from CD": ("recipes/dmd2_digits.yaml", ("dmd.generator_init=runs/bench/distill-digits/cd-lcm-style/student", "trainer.steps=1000")),
    "f-distill jensen_shannon from CD": ("recipes/fdistill_digits.yaml", ("dmd.generator_init=runs/bench/distill-digits/cd-lcm-style/student", "trainer.steps=1000")),
    "DMD2 4-step from CD": ("recipes/dmd2_digits.yaml", ("dmd.generator_init=runs/bench/distill-digits/cd-lcm-style/student", "trainer.steps=1000",
                                                      "dmd.generator_steps=4", "eval.steps=[1, 2, 4]")),
    "CTM": ("recipes/ctm_digits.yaml", ()),
    "CTM gamma=1": ("recipes/ctm_digits.yaml", (), {"gamma": 1.0}),
    "CTM without GAN": ("recipes/ctm_digits.yaml", ("ctm.gan_weight=0", "trainer.phase_optim={}")),  # no discriminator phase
    # the target network's EMA as CD's (LCM's 0.95): CTM's 0.999 is for 100k+ steps; in 2000 it lags ~1000 steps behind
    "CTM target EMA 0.95": ("recipes/ctm_digits.yaml", ("ctm.target_ema=0.95",)),
    "2-RF++": ("recipes/reflow_digits.yaml", ()),
    "2-RF++ reuse-noise sampler": ("recipes/reflow_digits.yaml", (), {"scheduler": "reflow"}),
    "2-RF++ uniform t": ("recipes/reflow_digits.yaml", ("reflow.t_distribution=uniform",)),
    "2-RF++ L2": ("recipes/reflow_digits.yaml", ("reflow.loss=l2",)),
    "2-RF++ pseudo-Huber": ("recipes/reflow_digits.yaml", ("reflow.loss=pseudo_huber",)),
    "DMD2 from 2-RF++": ("recipes/dmd2_digits.yaml", ("dmd.generator_init=runs/bench/distill-digits/2-rf/student", "trainer.steps=1000")),
}
# the Fashion-MNIST students of the shipped UNet teacher; the DMD2 ablations (TTUR 1, no GAN, the other divergences)
# run on digits only: each Fashion-MNIST training is 1-2 CPU-hours (CTM about 5.5: 7.8 s per step on one core)
FASHION_RECIPES = {
    "iCT": ("recipes/ict_fashion_mnist.yaml", ()),
    "CD (LCM-style)": ("recipes/cd_fashion_mnist.yaml", ()),
    "SCott": ("recipes/scott_fashion_mnist.yaml", ()),
    # the digits table's best SCott (1-step below CD's there): the adversary weighted adaptively, teacher noise 0.1
    "SCott adaptive adversary eta=0.1": ("recipes/scott_fashion_mnist.yaml", ("scott.adaptive_adversary=true", "scott.eta=0.1")),
    "DMD2": ("recipes/dmd2_fashion_mnist.yaml", ()),
    "DMD2 4-step": ("recipes/dmd2_fashion_mnist.yaml", ("dmd.generator_steps=4", "eval.steps=[1, 2, 4]")),
    # G starts from the CD row's student (as DMD2's one-step SD generator starts from a regression-trained one), half
    # the steps: CD followed by DMD2 + GAN; the CD row trains first (a --rows or --shard run without it finished is
    # refused, naming the folder). Measured with generator_init=assets/students/fashion-mnist while that was this
    # CD student (the same recipe; the shipped student is now the benchmark's best, test_shipped)
    "DMD2 from CD": ("recipes/dmd2_fashion_mnist.yaml", ("dmd.generator_init=runs/bench/distill-fashion-mnist/cd-lcm-style/student", "trainer.steps=1000")),
    "f-distill jensen_shannon": ("recipes/fdistill_fashion_mnist.yaml", ()),
    "f-distill jensen_shannon from CD": ("recipes/fdistill_fashion_mnist.yaml", ("dmd.generator_init=runs/bench/distill-fashion-mnist/cd-lcm-style/student", "trainer.steps=1000")),
    "CTM": ("recipes/ctm_fashion_mnist.yaml", ()),
    "CTM gamma=1": ("recipes/ctm_fashion_mnist.yaml", (), {"gamma": 1.0}),
    "CTM without GAN": ("recipes/ctm_fashion_mnist.yaml", ("ctm.gan_weight=0", "trainer.phase_optim={}")),
    "2-RF++": ("recipes/reflow_fashion_mnist.yaml", ()),
    "2-RF++ reuse-noise sampler": ("recipes/reflow_fashion_mnist.yaml", (), {"scheduler": "reflow"}),
    # G starts from the 2-RF++ row's student (the best row before it): its VP network (a reflow student is one read
    # through the sigma <-> t change of variables), the protocol of DMD2 from CD; after the 2-RF++ row, which it needs
    "DMD2 from 2-RF++": ("recipes/dmd2_fashion_mnist.yaml", ("dmd.generator_init=runs/bench/distill-fashion-mnist/2-rf/student", "trainer.steps=1000")),
}
TEACHER_SAMPLERS = (("GHVB 1.8", "ghvb", {"solver_order": 2, "momentum": 0.8}), ("HB-DPM-Solver++(2M)", "hb-dpmpp-2m", {}),
                    ("iPNDM", "ipndm", {}), ("S-PNDM", "s-pndm", {}))  # fmt: skip


@dataclass(frozen=True)
class DistillSet:
    """One data set's row family: its shipped teacher (= the data set's name), recipes, samples per FID, the student
    step counts (the table's columns; each row is scored at those of its recipe's ``eval.steps``), and where the
    trainings go (``runs/<label as a slug>``, relative to the current directory)."""

    recipes: dict[str, tuple]  # label -> (recipe, overrides[, sampling])
    num_samples: int
    student_steps: tuple[int, ...]
    runs: Path


DISTILL_SETS = {
    "digits": DistillSet(DISTILL_RECIPES, 360, (1, 2, 4), Path("runs/bench/distill-digits")),
    "fashion-mnist": DistillSet(FASHION_RECIPES, 500, (1, 2, 4), Path("runs/bench/distill-fashion-mnist")),
}


def run_folder(label: str) -> str:
    """A row's training folder: its label as a slug (``"DMD2 TTUR 1"`` -> ``dmd2-ttur-1``)."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def bench_distill(quick: bool = False, progress: bool = True, recipes: str | Path = "recipes", cells: Any = None,
                  rows: list[str] | None = None) -> dict:  # fmt: skip
    """``fastdiff bench distill``: the digits students (:data:`DISTILL_RECIPES`, read from the folder ``recipes``; only
    the labels in ``rows`` when given) and the trainer's overhead; the JSON record. ``cells``' resume flag continues
    killed trainings and keeps finished FIDs."""
    from fastdiff.bench.common import Cells

    result = _bench_set("digits", quick, progress, recipes, cells, rows)
    result["trainer_overhead"] = (cells or Cells(None))(
        f"trainer overhead quick={quick}", lambda: trainer_overhead(steps=10 if quick else 40, repeats=1 if quick else 3, recipes=recipes))
    result["step_costs"] = (cells or Cells(None))(
        f"step costs quick={quick}", lambda: step_costs(steps=4 if quick else 20, repeats=1 if quick else 3, recipes=recipes))
    return result


def bench_distill_fashion(quick: bool = False, progress: bool = True, recipes: str | Path = "recipes", cells: Any = None,
                          rows: list[str] | None = None) -> dict:  # fmt: skip
    """``fastdiff bench distill-fashion-mnist``: the students of the shipped Fashion-MNIST teacher
    (:data:`FASHION_RECIPES`; only the labels in ``rows`` when given); ``cells``' resume flag continues killed
    trainings and keeps finished FIDs."""
    return _bench_set("fashion-mnist", quick, progress, recipes, cells, rows)


def chosen_rows(recipes: dict[str, tuple], rows: list[str] | None, bench: str) -> dict[str, tuple]:
    """The table's rows to run: all, or those named in ``rows`` (in the table's order); an unknown name is refused with
    the names there are."""
    from fastdiff.errors import InputError

    if rows is None:
        return recipes
    unknown = [r for r in rows if r not in recipes]
    if unknown:
        raise InputError(f"--rows: {', '.join(map(repr, unknown))} not among the rows of `fastdiff bench {bench}`: "
                         + ", ".join(map(repr, recipes)))  # fmt: skip
    return {label: row for label, row in recipes.items() if label in rows}


def _bench_set(name: str, quick: bool, progress: bool, recipes: str | Path, cells: Any = None, rows: list[str] | None = None) -> dict:
    from fastdiff.bench.common import Cells, machine, recipe_file

    spec, cells = DISTILL_SETS[name], cells or Cells(None)
    bench = "distill" if name == "digits" else f"distill-{name}"
    chosen = chosen_rows(spec.recipes, rows, bench)
    paths = {label: recipe_file(row[0], recipes) for label, row in chosen.items()}  # all found before any work
    scorer = _Scorer(name, 60 if quick else spec.num_samples, (0,) if quick else (0, 1, 2), cells)
    result = {"machine": machine(), "quick": quick, "dataset": name, "num_samples": scorer.n, "seeds": list(scorer.seeds),
              "student_steps": list(spec.student_steps), **_teacher_scores(name, scorer, spec.student_steps)}  # fmt: skip
    _check_teacher_finished(result, cells, bench)
    runs = spec.runs if not quick else Path(tempfile.mkdtemp(prefix="fastdiff-bench-distill-"))
    # one cell per training and the rows it serves: a finished training's rows are kept even where its folder is gone,
    # and --shard splits the trainings; with --finished-only, a training without its cell is "not run" (its labels)
    rows, not_run = [], []
    for first, group in _trainings(chosen).items():
        train_and_score = partial(_score_training, group, paths[first], runs / run_folder(first), scorer, spec.student_steps, quick, progress)
        done = cells(training_cell(scorer.n, scorer.seeds, first), train_and_score)
        rows += done or []
        not_run += [label for label, *_ in group] if done is None else []
    if quick:
        shutil.rmtree(runs, ignore_errors=True)
    return {**result, "rows": rows, "not_run": not_run}


@dataclass(frozen=True)
class _Scorer:
    """What every FID of one run shares: the data set (its domain extractor and test split, loaded on the first FID
    computed: assembling finished cells loads neither), samples per FID, seeds, and the cells each seed's FID is kept
    in."""

    dataset: str
    n: int
    seeds: tuple[int, ...]
    cells: Any

    @cached_property
    def features(self) -> tuple[Any, Any]:
        """The domain extractor and the test split's features under it."""
        from fastdiff.eval.extractors import load_extractor
        from fastdiff.eval.sources import load_source, source_features

        extractor = load_extractor(self.dataset)
        return extractor, source_features(load_source(f"{self.dataset}:test", 1), extractor)

    def fid(self, sample, key: str) -> dict:
        """The FID of ``sample(seed)`` over the seeds (mean and spread), each seed's kept as the cell ``key seed=S`` (a
        shard computes all of its own)."""
        from fastdiff.bench.common import mean_std
        from fastdiff.eval.metrics import fid_of_samples

        return mean_std([self.cells(f"{key} seed={seed}", lambda seed=seed: fid_of_samples(sample(seed), *self.features), every_shard=True)
                         for seed in self.seeds])  # fmt: skip


def _teacher_scores(name: str, scorer: _Scorer, steps: tuple[int, ...]) -> dict:
    """The shipped teacher at 50 NFE (DDIM) and with each of :data:`TEACHER_SAMPLERS` at the students' step counts."""
    from fastdiff.eval.assets import teacher_path
    from fastdiff.pipelines import make_scheduler
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.pipelines.sampling import sample_pipeline

    teacher = cache(lambda: load_pipeline(teacher_path(name)))  # loaded on the first FID computed
    base = cache(lambda: dict(teacher().scheduler.config))

    def teacher_fid(sampler, overrides, k):
        def compute():
            pipe = teacher()
            pipe.scheduler = make_scheduler(sampler, base(), **overrides)
            return scorer.fid(lambda s: sample_pipeline(pipe, scorer.n, k, 1.0, s).images, key)

        key = teacher_cell(scorer.n, sampler, overrides, k)
        return scorer.cells(f"{key} seeds={list(scorer.seeds)}", compute)

    return {"teacher_50nfe": teacher_fid("ddim", {}, 50),
            "teacher_samplers": {label: {str(k): teacher_fid(s, o, k) for k in steps} for label, s, o in TEACHER_SAMPLERS}}  # fmt: skip


def _score_training(group: list[tuple], path: Path, out: Path, scorer: _Scorer, steps: tuple[int, ...], quick: bool, progress: bool) -> list[dict]:
    """Train once (into ``out``, the first row's folder) and score every row of ``group`` that samples that training."""
    from fastdiff.pipelines.class_conditional import load_pipeline

    first, recipe_name, switches = group[0][:3]
    recipe, minutes = _train(path, [*switches, f"output_dir={out}", "trainer.tracker=none"], quick, progress, scorer.cells, scorer.n)
    rows = []
    for label, _, _, sampling in group:
        pipe = load_pipeline(out / "student")
        if sampling:
            pipe.scheduler = _sampling_scheduler(pipe.scheduler, sampling)
        fids = {str(k): scorer.fid(lambda s, k=k: _student_samples(recipe, pipe, scorer.n, k, s), f"n={scorer.n} {label} {minutes:.4f} steps={k}")
                for k in steps if k in recipe.eval.steps}  # fmt: skip
        rows.append({"objective": label, "recipe": recipe_name, "overrides": list(switches), "sampling": sampling, "steps": recipe.trainer.steps,
                     "batch_size": recipe.trainer.batch_size, "wall_minutes": minutes, "fid": fids, "student": str(out / "student"),
                     "training_of": first, "trained_on": _trained_on(out / "student")})  # fmt: skip
    return rows


def teacher_cell(n: int, sampler: str, overrides: dict, nfe: int) -> str:
    """The key of the teacher's FID with ``sampler`` at ``nfe`` (one seed's: ``+ " seed=S"``; all: ``+ " seeds=[...]"``)."""
    return f"n={n} teacher {sampler} {sorted(overrides.items())} nfe={nfe}"


def training_cell(n: int, seeds: tuple[int, ...], first: str) -> str:
    """The key of one training's scored rows (the training runs in its first row's folder)."""
    return f"n={n} seeds={list(seeds)} rows of {first}"


def _check_teacher_finished(result: dict, cells: Any, bench: str) -> None:
    """Assembling what is finished (cells that compute nothing) needs the teacher's FIDs, which every row is read
    against."""
    from fastdiff.errors import InputError

    scores = [result["teacher_50nfe"], *(v for s in result["teacher_samplers"].values() for v in s.values())]
    if cells.finished_only and any(v is None for v in scores):  # (a shard leaves others' cells None)
        raise InputError(f"{cells.path} holds no finished teacher FIDs for `fastdiff bench {bench}`: nothing to assemble; run "
                         f"`fastdiff bench {bench} --resume --rows LABEL` (or its --shard I/K) first")  # fmt: skip


def _trained_on(student: Path) -> str | None:
    """Where a student's minutes were measured (its training.json's machine) and in which precision, as the table
    prints it."""
    from fastdiff.machine import machine_label

    record = json.loads((student / "training.json").read_text()) if (student / "training.json").is_file() else {}
    if not record.get("machine"):
        return None
    precision = {"bf16": ", bf16 autocast", "fp16": ", fp16 autocast", "no": ", fp32"}.get(record.get("mixed_precision"), "")
    return machine_label(record["machine"]) + precision


def _trainings(recipes: dict[str, tuple]) -> dict[str, list[tuple]]:
    """The rows grouped by training (recipe and overrides), under the first row's label: (label, recipe, overrides,
    sampling) each, in the table's order."""
    groups: dict[tuple, list[tuple]] = {}
    for label, (path, switches, *rest) in recipes.items():
        groups.setdefault((path, switches), []).append((label, path, switches, rest[0] if rest else {}))
    return {group[0][0]: group for group in groups.values()}


def _sampling_scheduler(scheduler: Any, sampling: dict) -> Any:
    """A row's scheduler: the student's own with ``sampling``'s settings, or (``"scheduler": "reflow"``) 2-RF++'s sampler
    on the student's grid."""
    from fastdiff.samplers.diffusers import ReflowScheduler

    settings = {k: v for k, v in sampling.items() if k != "scheduler"}
    cls = {"reflow": ReflowScheduler}[sampling["scheduler"]] if "scheduler" in sampling else type(scheduler)
    return cls.from_config(scheduler.config, **settings)


def _student_samples(recipe, pipe, n, steps, seed):
    from fastdiff.training.distill import sample_student

    return sample_student(recipe, pipe.model, pipe.scheduler, n, steps, seed)


def _train(path: Path, overrides: list[str], quick: bool, progress: bool, cells: Any, n: int) -> tuple[Any, float]:
    """Train one recipe into its ``output_dir`` (continuing its checkpoints, or taking its finished student, when
    resuming); the recipe and the training's wall-clock minutes (all resumed pieces). ``quick``: a few steps in a
    temporary folder."""
    from fastdiff.errors import InputError
    from fastdiff.training.config import load_config, to_dict
    from fastdiff.training.distill import DistillRecipe, run_distill

    if quick:
        overrides = [*overrides, "trainer.eval_every=0", f"eval.num_samples={n}", "trainer.steps=6", "trainer.batch_size=32",
                     "trainer.checkpoint_every=1000"]  # fmt: skip
    recipe = load_config(DistillRecipe, path, overrides)
    if quick and recipe.objective == "reflow":  # a few pairs, inside the temporary run folder
        overrides = [*overrides, f"reflow.pairs={Path(recipe.output_dir) / 'pairs'}", "reflow.num_pairs=64", "reflow.pair_steps=2"]
        recipe = load_config(DistillRecipe, path, overrides)
    out = Path(recipe.output_dir)
    student = out / "student" / "training.json"
    if out.exists() and not quick and not cells.resume:
        raise InputError(f"{out} holds an earlier benchmark training; pass --resume to continue it (or take its finished "
                         "student), or delete the folder to start over")  # fmt: skip
    if student.is_file():
        done = json.loads(student.read_text())
        if _training(done["recipe"]) != _training(to_dict(recipe)):
            raise InputError(f"{out / 'student'} was trained from another recipe than {path}; delete {out} to retrain it")
        return recipe, done.get("wall_minutes_all_pieces", done["wall_minutes_this_run"])
    start = time.perf_counter()
    run_distill(recipe, resume="latest" if (out / "checkpoints").is_dir() else None, progress=progress)
    done = json.loads(student.read_text())
    return recipe, done.get("wall_minutes_all_pieces", (time.perf_counter() - start) / 60)


def _training(recipe: dict) -> dict:
    """What decides a trained student: the recipe's identity without where it was written."""
    from fastdiff.training.distill import recipe_identity

    return {k: v for k, v in recipe_identity(recipe).items() if k != "output_dir"}


def trainer_overhead(steps: int = 40, repeats: int = 3, recipes: str | Path = "recipes") -> dict:
    """Seconds per step of the fastdiff trainer and of a plain loop over the same iCT objective on digits (median of
    ``repeats`` alternating runs, the second half of each run timed)."""
    from fastdiff.bench.common import recipe_file
    from fastdiff.training.config import load_config
    from fastdiff.datasets import load_digits
    from fastdiff.training.distill import DistillRecipe, build_objective
    from fastdiff.training.data import global_batch
    from fastdiff.training.trainer import train

    overrides = ["trainer.tracker=none", "trainer.checkpoint_every=100000", f"trainer.log_every={steps // 2}", f"trainer.steps={steps}"]
    recipe = load_config(DistillRecipe, recipe_file(DISTILL_RECIPES["iCT"][0], recipes), overrides)
    cfg = recipe.trainer
    data = load_digits("train")
    torch.manual_seed(0)
    objective, _ = build_objective(recipe, 1, 8, data.num_classes)
    fastdiff_s, plain_s = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            _, record = train(copy.deepcopy(objective), data.data, data.labels, cfg, tmp, {}, progress=False)
        fastdiff_s.append(cfg.batch_size / record["history"][-1]["images_per_s"])
        plain_s.append(_plain_loop(copy.deepcopy(objective), data, cfg, steps, global_batch))
    f, p = statistics.median(fastdiff_s), statistics.median(plain_s)
    return {"objective": "iCT (recipes/ict_digits.yaml)", "batch_size": cfg.batch_size, "fastdiff_s_per_step": f, "plain_s_per_step": p,
            "overhead": f / p - 1, "all_fastdiff": fastdiff_s, "all_plain": plain_s}  # fmt: skip


def step_costs(steps: int = 20, repeats: int = 3, recipes: str | Path = "recipes") -> dict:
    """Seconds per step (median of ``repeats`` alternating runs through the trainer, the second half of each timed) of
    two choices that decide a CPU training's length: DMD2's GAN classifier reading the fake score only up to its
    bottleneck (:meth:`~fastdiff.objectives.critic.FeatureTap.run_to`) against the whole forward pass, with the two
    runs' generators compared weight for weight; and CD in bf16 autocast against fp32 on this CPU (a CPU without bf16
    kernels emulates them)."""
    from fastdiff.bench.common import recipe_file
    from fastdiff.datasets import load_digits
    from fastdiff.machine import cpu_bf16_kernels
    from fastdiff.training.config import load_config
    from fastdiff.training.distill import DistillRecipe, build_objective

    data = load_digits("train")

    def built(label: str, overrides: list[str], n: int) -> tuple[Any, Any]:
        fixed = ["trainer.tracker=none", "trainer.checkpoint_every=100000", f"trainer.log_every={n // 2}", f"trainer.steps={n}"]
        recipe = load_config(DistillRecipe, recipe_file(DISTILL_RECIPES[label][0], recipes), fixed + overrides)
        torch.manual_seed(0)
        objective, _ = build_objective(recipe, 1, 8, data.num_classes)
        return objective, recipe.trainer

    dmd, dmd_cfg = built("DMD2", [], steps)
    cd = {p: built("CD (LCM-style)", [f"trainer.mixed_precision={p}"], max(2, steps // 4)) for p in ("no", "bf16")}
    early, through, fp32, bf16, same = [], [], [], [], True
    for _ in range(repeats):
        (a, net_a), (b, net_b) = _trained(dmd, dmd_cfg, data), _trained(dmd, dmd_cfg, data, _classifier_runs_through())
        early.append(a), through.append(b)
        same &= all(torch.equal(p, q) for p, q in zip(net_a.parameters(), net_b.parameters()))
        fp32.append(_trained(*cd["no"], data)[0]), bf16.append(_trained(*cd["bf16"], data)[0])
    med = statistics.median
    return {"dmd2": {"recipe": DISTILL_RECIPES["DMD2"][0], "batch_size": dmd_cfg.batch_size, "steps": steps, "early_stop_s_per_step": med(early),
                     "full_forward_s_per_step": med(through), "generators_identical": same, "all_early_stop": early, "all_full_forward": through},
            "bf16": {"recipe": DISTILL_RECIPES["CD (LCM-style)"][0], "batch_size": cd["no"][1].batch_size, "steps": cd["no"][1].steps,
                     "fp32_s_per_step": med(fp32), "bf16_s_per_step": med(bf16), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                     "bf16_kernels": cpu_bf16_kernels(), "all_fp32": fp32, "all_bf16": bf16}}  # fmt: skip


def _trained(objective, cfg, data, context: Any = None) -> tuple[float, torch.nn.Module]:
    """Seconds per step of the second half of ``cfg.steps`` through the trainer (a copy of ``objective``; accelerate's
    precision reset after), and the EMA network."""
    import warnings

    from accelerate.state import AcceleratorState

    from fastdiff.training.trainer import train

    try:
        with context or contextlib.nullcontext(), tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the trainer's warning on emulated bf16: measured here
            net, record = train(copy.deepcopy(objective), data.data, data.labels, cfg, tmp, {}, progress=False)
    finally:
        AcceleratorState._reset_state(True)  # accelerate keeps one precision per process
    return cfg.batch_size / record["history"][-1]["images_per_s"], net


@contextlib.contextmanager
def _classifier_runs_through():
    """DMD2's classifier as before :meth:`FeatureTap.run_to` stopped it: the fake score's whole forward pass, the
    bottleneck's features kept by the hook."""
    from fastdiff.objectives.critic import FeatureTap

    early = FeatureTap.run_to
    FeatureTap.run_to = lambda tap, forward: (forward(), tap.take())[1]
    try:
        yield
    finally:
        FeatureTap.run_to = early


def _plain_loop(objective, data, cfg, steps, global_batch) -> float:
    """The same computation without the trainer: batch, loss, backward, clip, RAdam step, warm-up, EMA."""
    o = cfg.optim
    opt = torch.optim.RAdam(objective.net.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / max(1, o.warmup_steps)))
    ema = copy.deepcopy(objective.net).requires_grad_(False)
    start = 0.0
    for step in range(steps):
        if step == steps // 2:
            start = time.perf_counter()
        batch = global_batch(data.data, data.labels, step, cfg.batch_size, cfg.seed)
        loss = objective(batch, "student", step).total
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.net.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, q in zip(ema.parameters(), objective.net.parameters()):
                e.lerp_(q, 1 - cfg.ema_decay)
    return (time.perf_counter() - start) / (steps - steps // 2)


def render_distill(data: dict) -> list[str]:
    from fastdiff.bench.common import fmt as _fmt
    from fastdiff.machine import machine_label

    def ms(d):
        return f"{_fmt(d['mean'])} ± {_fmt(d['std'])}"

    name = data.get("dataset", "digits")
    steps = [str(k) for k in data.get("student_steps", (1, 2))]
    t = data["teacher_50nfe"]
    best = {k: min(((label, v[k]) for label, v in data["teacher_samplers"].items()), key=lambda x: x[1]["mean"]) for k in steps}
    where = "trained as written (`fastdiff train RECIPE`, continued with `--resume` where a session ended)"
    lines = [
        f"## Distilled students ({name})",
        "",
        f"Domain FID of {data['num_samples']} samples against the {name} test split, mean ± std over seeds {data['seeds']}; each recipe",
        f"{where}; minutes are each training's wall-clock, on this machine ({machine_label(data['machine'])}) "
        "unless the row names another. On every",
        f"row, the shipped teacher at 50 NFE (DDIM): {ms(t)}, and the best fastdiff ODE sampler on the teacher at the same NFE",
        f"(of {', '.join(data['teacher_samplers'])}).",
        "",
        "| objective | recipe | steps x batch | minutes | " + " | ".join(f"{k}-step FID" for k in steps) + " | teacher @ 50 NFE | "
        f"best fastdiff sampler @ {' / '.join(steps)} NFE | 1-step / teacher |",
        "|---|---|---|---|" + "---|" * len(steps) + "---|---|---|",
    ]  # fmt: skip
    for r in data["rows"]:
        recipe = " ".join([f"`{r['recipe']}`", *(f"`--set {o}`" for o in r.get("overrides", ()))])
        if r.get("sampling"):
            recipe += ", sampled with " + ", ".join(f"`{k}={v}`" for k, v in r["sampling"].items()) + f" (the {r['training_of']} row's student)"
        if r.get("trained_on") and r["trained_on"] != machine_label(data["machine"]):
            recipe += f" (trained on {r['trained_on']})"
        samplers = " / ".join(f"{best[k][0]} {_fmt(best[k][1]['mean'])}" for k in steps)
        lines.append(f"| {r['objective']} | {recipe} | {r['steps']} x {r['batch_size']} | {r['wall_minutes']:.2f} | "
                     + " | ".join(ms(r["fid"][k]) if k in r["fid"] else "-" for k in steps) + f" | {ms(t)} | {samplers} | {r['fid']['1']['mean'] / t['mean']:.1f}x |")  # fmt: skip
    if data.get("not_run"):
        command = "distill" if name == "digits" else f"distill-{name}"
        lines += ["", f"Not yet run (assembled from the finished trainings with `fastdiff bench {command} --finished-only`): "
                  + ", ".join(data["not_run"]) + f"; `fastdiff bench {command} --resume --rows LABEL ...` runs them."]  # fmt: skip
    lines += _divergence_ranking(data["rows"])
    o = data.get("trainer_overhead")
    if o:
        lines += ["", f"Trainer overhead ({o['objective']}, batch {o['batch_size']}): {o['fastdiff_s_per_step'] * 1000:.0f} ms per step in "
                  f"`fastdiff.training.trainer.train` vs {o['plain_s_per_step'] * 1000:.0f} ms in a plain PyTorch loop doing the same computation: "
                  f"**{o['overhead']:+.1%}** (target <= 5%)."]  # fmt: skip
    lines += _step_cost_lines(data.get("step_costs"))
    return lines


def _step_cost_lines(c: dict | None) -> list[str]:
    if not c:
        return []
    d, b = c["dmd2"], c["bf16"]
    kernels = "has bf16 kernels" if b["bf16_kernels"] else "has no bf16 kernels: bf16 is emulated"
    return ["", f"Step costs (median of alternating runs through the trainer, batch {d['batch_size']}): DMD2 (`{d['recipe']}`) with the GAN "
            f"classifier's forward stopped at the fake score's bottleneck {d['early_stop_s_per_step'] * 1000:.0f} ms per step vs "
            f"{d['full_forward_s_per_step'] * 1000:.0f} ms through the whole network (**{d['early_stop_s_per_step'] / d['full_forward_s_per_step'] - 1:+.0%}**), "
            f"generators after {d['steps']} steps {'bit-identical' if d['generators_identical'] else 'NOT identical'}; CD (`{b['recipe']}`) in bf16 autocast "
            f"{b['bf16_s_per_step']:.2f} s per step vs {b['fp32_s_per_step']:.2f} s in fp32 (**{b['bf16_s_per_step'] / b['fp32_s_per_step']:.1f}x**; "
            f"this CPU: {b['cpu_capability']}, {kernels})."]  # fmt: skip


# f-distill's CIFAR-10 table (Xu, Nie & Vahdat 2025, Table 2; class-conditional, 1 NFE, with GAN)
PAPER_DIVERGENCE_FID = {"forward_kl": 1.92, "squared_hellinger": 1.99, "jensen_shannon": 2.00, "jeffreys": 2.05, "reverse_kl": 2.13,
                        "softened_rkl": 2.21}  # fmt: skip


def _divergence_ranking(rows: list[dict]) -> list[str]:
    """The six divergences ordered by 1-step FID here (the DMD2 row is reverse-KL) next to the paper's order."""
    fid = {d: r["fid"]["1"] for r in rows if (d := r["objective"].removeprefix("f-distill ")) in PAPER_DIVERGENCE_FID}  # (from the teacher)
    if "DMD2" in (r["objective"] for r in rows):
        fid["reverse_kl"] = next(r["fid"]["1"] for r in rows if r["objective"] == "DMD2")
    if set(fid) != set(PAPER_DIVERGENCE_FID):
        return []
    here = sorted(fid, key=lambda d: fid[d]["mean"])
    spread = max(v["std"] for v in fid.values())
    return ["", "f-distill's divergences ranked by 1-step FID (the DMD2 row is reverse-KL): here "
            + " < ".join(f"{d} {fid[d]['mean']:.2f}" for d in here)
            + f" (largest seed std {spread:.2f}); the paper's CIFAR-10 (Table 2) "
            + " < ".join(f"{d} {v:.2f}" for d, v in PAPER_DIVERGENCE_FID.items()) + "."]
