"""``fastdiff bench distill``: consistency students side by side with their teacher, and the trainer's overhead.

On digits, in one run: each consistency recipe (iCT, iLCT, CD) is trained as written in ``recipes/``, its EMA
student is scored with the domain FID of 1- and 2-step samples (several seeds), next to the teacher at 50 NFE and
the best fastdiff ODE sampler on the teacher at the same NFE, with the wall-clock minutes each took on this
machine. The trainer's overhead: steps/s of :func:`fastdiff.training.trainer.train` against a plain PyTorch loop doing the
same computation (same objective, batches, optimiser, clipping, EMA), measured alternately in the same process.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["DISTILL_RECIPES", "bench_distill", "trainer_overhead", "render_distill"]

# label -> (recipe, overrides): iLCT is run as written and without its minibatch OT pairing (the switch that decides
# the recipe's default on digits).
DISTILL_RECIPES = {
    "iCT": ("recipes/ict_digits.yaml", ()),
    "iLCT": ("recipes/ilct_digits.yaml", ("consistency.ot=true",)),
    "iLCT without OT": ("recipes/ilct_digits.yaml", ("consistency.ot=false",)),
    "CD (LCM-style)": ("recipes/cd_digits.yaml", ()),
}
TEACHER_SAMPLERS = (("GHVB 1.8", "ghvb", {"solver_order": 2, "momentum": 0.8}), ("HB-DPM-Solver++(2M)", "hb-dpmpp-2m", {}),
                    ("iPNDM", "ipndm", {}), ("S-PNDM", "s-pndm", {}))  # fmt: skip


def _fid_seeds(sample, extractor, reference, seeds) -> dict:
    from fastdiff.bench.common import mean_std as _mean_std
    from fastdiff.eval.metrics import fid_of_samples

    return _mean_std([fid_of_samples(sample(seed), extractor, reference) for seed in seeds])


def bench_distill(quick: bool = False, progress: bool = True, recipes: str | Path = "recipes") -> dict:
    """Train each recipe of :data:`DISTILL_RECIPES` (read from the folder ``recipes``) and score it; the JSON record."""
    from fastdiff.bench.common import machine, recipe_file
    from fastdiff.pipelines import make_scheduler
    from fastdiff.training.config import load_config
    from fastdiff.training.distill import DistillRecipe, run_distill, sample_student
    from fastdiff.eval.sources import load_source, source_features
    from fastdiff.eval.extractors import load_extractor
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.eval.assets import teacher_path
    from fastdiff.pipelines.sampling import sample_pipeline

    paths = {label: recipe_file(path, recipes) for label, (path, _) in DISTILL_RECIPES.items()}  # all found before any work
    seeds = (0,) if quick else (0, 1, 2)
    n = 60 if quick else 360
    extractor = load_extractor("digits")
    reference = source_features(load_source("digits:test", 1), extractor)
    teacher = load_pipeline(teacher_path("digits"))
    base = dict(teacher.scheduler.config)

    def teacher_fid(name, overrides, steps):
        teacher.scheduler = make_scheduler(name, base, **overrides)
        return _fid_seeds(lambda s: sample_pipeline(teacher, n, steps, 1.0, s).images, extractor, reference, seeds)

    result = {"machine": machine(), "quick": quick, "num_samples": n, "seeds": list(seeds), "teacher_50nfe": teacher_fid("ddim", {}, 50)}
    result["teacher_samplers"] = {label: {str(k): teacher_fid(name, o, k) for k in (1, 2)} for label, name, o in TEACHER_SAMPLERS}
    runs = Path(tempfile.mkdtemp(prefix="fastdiff-bench-distill-"))
    rows = []
    for i, (label, (path, switches)) in enumerate(DISTILL_RECIPES.items()):
        overrides = [*switches, f"output_dir={runs / str(i)}", "trainer.tracker=none", "trainer.eval_every=0", f"eval.num_samples={n}"]
        if quick:
            overrides += ["trainer.steps=6", "trainer.batch_size=32", "trainer.checkpoint_every=1000"]
        recipe = load_config(DistillRecipe, paths[label], overrides)
        start = time.perf_counter()
        student = run_distill(recipe, progress=progress)
        minutes = (time.perf_counter() - start) / 60
        pipe = load_pipeline(student)
        fids = {str(k): _fid_seeds(lambda s, k=k: sample_student(recipe, pipe.model, pipe.scheduler, n, k, s), extractor, reference, seeds)
                for k in (1, 2)}  # fmt: skip
        rows.append({"objective": label, "recipe": path, "overrides": list(switches), "steps": recipe.trainer.steps,
                     "batch_size": recipe.trainer.batch_size, "wall_minutes": minutes, "fid": fids})  # fmt: skip
    shutil.rmtree(runs, ignore_errors=True)
    result["rows"] = rows
    result["trainer_overhead"] = trainer_overhead(steps=10 if quick else 40, repeats=1 if quick else 3, recipes=recipes)
    return result


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

    def ms(d):
        return f"{_fmt(d['mean'])} ± {_fmt(d['std'])}"

    t = data["teacher_50nfe"]
    best = {k: min(((label, v[k]) for label, v in data["teacher_samplers"].items()), key=lambda x: x[1]["mean"]) for k in ("1", "2")}
    lines = [
        "## Consistency students (digits)",
        "",
        f"Domain FID of {data['num_samples']} samples against the digits test split, mean ± std over seeds {data['seeds']}; each recipe",
        f"trained as written (`fastdiff train RECIPE`) in this run; minutes are wall-clock on this machine with "
        f"{data['machine']['torch_threads']} torch thread(s). On every",
        f"row, the shipped teacher at 50 NFE (DDIM): {ms(t)}, and the best fastdiff ODE sampler on the teacher at the same NFE",
        f"(of {', '.join(data['teacher_samplers'])}).",
        "",
        "| objective | recipe | steps x batch | minutes | 1-step FID | 2-step FID | teacher @ 50 NFE | best fastdiff sampler @ 1 / 2 NFE | 1-step / teacher |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        recipe = " ".join([f"`{r['recipe']}`", *(f"`--set {o}`" for o in r.get("overrides", ()))])
        lines.append(f"| {r['objective']} | {recipe} | {r['steps']} x {r['batch_size']} | {r['wall_minutes']:.2f} | {ms(r['fid']['1'])} | "
                     f"{ms(r['fid']['2'])} | {ms(t)} | {best['1'][0]} {_fmt(best['1'][1]['mean'])} / {best['2'][0]} "
                     f"{_fmt(best['2'][1]['mean'])} | {r['fid']['1']['mean'] / t['mean']:.1f}x |")  # fmt: skip
    o = data["trainer_overhead"]
    lines += ["", f"Trainer overhead ({o['objective']}, batch {o['batch_size']}): {o['fastdiff_s_per_step'] * 1000:.0f} ms per step in "
              f"`fastdiff.training.trainer.train` vs {o['plain_s_per_step'] * 1000:.0f} ms in a plain PyTorch loop doing the same computation: "
              f"**{o['overhead']:+.1%}** (target <= 5%)."]  # fmt: skip
    return lines
