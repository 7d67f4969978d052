"""Schedule optimisation: the dynamic programme finds the brute-force optimum, and on the exact Gaussian-mixture
oracle the optimised schedule beats the Karras and uniform-in-t schedules at every NFE tested, on fresh noise."""

import itertools

import pytest
import torch
from diffusers import DDPMScheduler

from fastdiff.errors import InputError
from fastdiff.oracle import GaussianMixture
from fastdiff.samplers import karras_sigmas, sample_euler
from fastdiff.samplers.schedule_search import optimal_path, optimize_schedule, propagation_gain
from fastdiff.schedules import VPSchedule

GMM = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.2, 1.2]], dtype=torch.float64), torch.tensor([0.15, 0.25, 0.1], dtype=torch.float64))


def test_dynamic_programme_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    n = 9
    costs = torch.rand(n, n, generator=g, dtype=torch.float64).triu(1) + torch.full((n, n), float("inf"), dtype=torch.float64).tril()
    for steps in (1, 2, 3, 5, 8):
        best = min(((0, *mid, n - 1) for mid in itertools.combinations(range(1, n - 1), steps - 1)),
                   key=lambda p: sum(costs[a, b] for a, b in zip(p[:-1], p[1:])))  # fmt: skip
        assert optimal_path(costs, steps) == list(best)
    with pytest.raises(InputError, match="1 <= steps <= 8"):
        optimal_path(costs, 9)


def _uniform_t(steps: int, sigma_max: float) -> torch.Tensor:
    """DDIM-style uniform timesteps of the DDPM schedule from the timestep of sigma_max down to 0, then 0."""
    vp = VPSchedule.from_config(DDPMScheduler().config)
    t = torch.linspace(float(vp.sigma_to_t(torch.tensor(sigma_max, dtype=torch.float64))), 0, steps, dtype=torch.float64)
    return torch.cat([vp.t_to_sigma(t), torch.zeros(1, dtype=torch.float64)])


def test_optimised_schedule_beats_karras_and_uniform_t_on_the_oracle():
    g = torch.Generator().manual_seed(0)
    sigma_max = 80.0
    fine = karras_sigmas(80, 0.002, sigma_max)
    calibration = torch.randn(32, 2, generator=g, dtype=torch.float64) * sigma_max
    fresh = torch.randn(64, 2, generator=g, dtype=torch.float64) * sigma_max
    exact = GMM.ode_solve(fresh, sigma_max, 0.0)

    def error(sigmas):
        return (sample_euler(GMM, fresh, sigmas) - exact).norm(dim=1).mean().item()

    for steps in (4, 6, 8):
        ours, record = optimize_schedule(GMM, calibration, fine, steps)
        assert len(ours) == steps + 1 and ours[0] == sigma_max and ours[-1] == 0 and record["cost"] > 0
        e_ours, e_karras, e_uniform = error(ours), error(karras_sigmas(steps, 0.002, sigma_max)), error(_uniform_t(steps, sigma_max))
        assert e_ours < e_karras and e_ours < e_uniform, (steps, e_ours, e_karras, e_uniform)


def test_propagation_gain_is_the_exact_flow_map_of_gaussian_data():
    std = 0.5
    gaussian = GaussianMixture(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([std], dtype=torch.float64))
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (0.3, 4.0, 157.0):
        exact = gaussian.ode_solve(x * sigma, sigma, 0.0) / (x * sigma)
        assert torch.allclose(exact, propagation_gain(torch.tensor(sigma, dtype=torch.float64), std).expand_as(exact), rtol=1e-4)


SIGMA_MAX_VP, SIGMA_MIN_VP = 157.0, 0.03  # a VP model's sigma range


def _guided_vp_problem(w: float = 6.0):
    """A labelled mixture under guidance ``w`` on a VP sigma range: the guided denoiser, calibration noise and fresh
    noise each with its labels, and a function giving a sampler's mean error on the fresh noise for given sigmas."""
    from fastdiff.bench.oracle import _GuidedOracle

    means = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 1.2], [0.8, 1.0]], dtype=torch.float64)
    gmm = GaussianMixture(means, torch.tensor([0.3, 0.4, 0.25, 0.35]), labels=torch.tensor([0, 1, 0, 1]))
    g = torch.Generator().manual_seed(1)
    calibration = torch.randn(32, 2, generator=g, dtype=torch.float64) * SIGMA_MAX_VP
    fresh = torch.randn(128, 2, generator=g, dtype=torch.float64) * SIGMA_MAX_VP
    (lc, lf) = torch.arange(32) % 2, torch.arange(128) % 2
    exact_c = gmm.ode_solve(calibration, SIGMA_MAX_VP, 0.0, class_labels=lc, guidance_scale=w)
    exact_f = gmm.ode_solve(fresh, SIGMA_MAX_VP, 0.0, class_labels=lf, guidance_scale=w)
    den_c, den_f = _GuidedOracle(gmm, lc, w), _GuidedOracle(gmm, lf, w)

    def on_calibration(fn, sigmas):
        return (fn(den_c, calibration.clone(), sigmas) - exact_c).norm(dim=1).mean().item()

    def on_fresh(fn, sigmas):
        return (fn(den_f, fresh.clone(), sigmas) - exact_f).norm(dim=1).mean().item()

    return den_c, calibration, on_calibration, on_fresh


def test_optimised_schedule_beats_karras_under_strong_guidance_on_a_vp_range():
    """VP models reach sigma ~157 and guidance makes the early steps' raw local errors large: unweighted (GITS's raw
    sum) the DP spends the steps there and ends with one long step to 0, and loses to Karras at 8 and 10 steps; the
    errors weighted by what reaches the image win at every step count."""
    den, calibration, _, on_fresh = _guided_vp_problem()
    fine = karras_sigmas(80, SIGMA_MIN_VP, SIGMA_MAX_VP)
    for steps in (4, 6, 8, 10):
        ours, _ = optimize_schedule(den, calibration, fine, steps)
        e_ours, e_karras = on_fresh(sample_euler, ours), on_fresh(sample_euler, karras_sigmas(steps, SIGMA_MIN_VP, SIGMA_MAX_VP))
        assert e_ours < 0.8 * e_karras, (steps, e_ours, e_karras)


def test_refining_fits_the_schedule_to_the_solver():
    """The DP measures DDIM's local error; coordinate descent on DPM-Solver++(2M)'s and GHVB 3.8's own end-to-end
    error on the calibration noise never raises it, and cuts their error on fresh noise by 30% or more (w = 6, 6 steps)."""
    from functools import partial

    from fastdiff.samplers import sample_dpmpp_2m, sample_ghvb
    from fastdiff.samplers.schedule_search import calibration_costs, refine_path

    den, calibration, on_calibration, on_fresh = _guided_vp_problem()
    fine = karras_sigmas(80, SIGMA_MIN_VP, SIGMA_MAX_VP)
    dp = optimal_path(calibration_costs(den, calibration, fine), 6)
    for fn in (sample_dpmpp_2m, partial(sample_ghvb, order=4, beta=0.8)):
        refined, error = refine_path(lambda path, fn=fn: on_calibration(fn, fine[path]), dp, sweeps=3)
        assert refined[0] == 0 and refined[-1] == len(fine) - 1 and len(refined) == 7 and error <= on_calibration(fn, fine[dp])
        assert on_fresh(fn, fine[refined]) < 0.7 * on_fresh(fn, fine[dp]), fn


def test_schedule_file_round_trip_and_refusals(tmp_path, capsys, monkeypatch):
    """`fastdiff schedule optimize` writes a schedule that `fastdiff sample --schedule` uses on the same pipeline,
    solver and step count (the scheduler's grid is the file's sigmas), and refuses for another, by name."""
    import json

    from fastdiff.cli import main

    out = tmp_path / "s.json"
    assert main(["schedule", "optimize", "digits", "--scheduler", "ghvb-1.8", "--steps", "3", "--samples", "4", "--fine", "12",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    record = json.loads(out.read_text())
    assert (record["model"], record["solver"], record["nfe"], len(record["sigmas"]), len(record["timesteps"])) == ("digits", "ghvb-1.8", 3, 3, 3)
    assert record["sigmas"] == sorted(record["sigmas"], reverse=True) and record["calibration"]["seconds"] > 0
    sample = ["sample", "--pipeline", "digits", "--steps", "3", "--num-samples", "4", "--schedule", str(out), "--no-progress"]
    assert main([*sample, "--scheduler", "ghvb-1.8", "--out", str(tmp_path / "a")]) == 0
    assert main([*sample, "--scheduler", "ddim", "--out", str(tmp_path / "b")]) == 2
    assert "optimised for solver 'ghvb-1.8', not 'ddim'" in capsys.readouterr().err
    assert main(["schedule", str(out.parent / "missing")]) == 2  # the old form, `schedule CONFIG`, still reads a config
    before = out.read_text()
    optimize = ["schedule", "optimize", "digits", "--scheduler", "ghvb-1.8", "--samples", "4", "--fine", "12", "--no-progress"]
    assert main([*optimize, "--steps", "3", "--out", str(out)]) == 2 and out.read_text() == before  # never overwritten
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*optimize, "--steps", "2", "3", "--out", str(tmp_path / "m-{steps}.json")]) == 0  # one calibration, two files
    made = [json.loads((tmp_path / f"m-{n}.json").read_text()) for n in (2, 3)]
    assert [(r["nfe"], len(r["sigmas"])) for r in made] == [(2, 2), (3, 3)] and made[0]["calibration"]["seconds"] == made[1]["calibration"]["seconds"]
    assert main([*optimize, "--steps", "3", "--refine", "--out", str(tmp_path / "r.json")]) == 0  # fitted to ghvb-1.8 itself
    refined = json.loads((tmp_path / "r.json").read_text())
    assert len(refined["sigmas"]) == 3 and refined["calibration"]["refined"]["error"] <= refined["calibration"]["refined"]["dp_error"]
    assert "refined for ghvb-1.8: end-to-end error" in capsys.readouterr().out
    assert main([*optimize, "--steps", "2", "3", "--out", str(tmp_path / "plain.json")]) == 2
    assert "need {steps} in --out" in capsys.readouterr().err and not (tmp_path / "plain.json").exists()
    import fastdiff.samplers.schedule_search as search

    monkeypatch.setattr(search, "reference_trajectories", lambda *a, **k: pytest.fail("bad --steps must fail before any work"))
    assert main([*optimize, "--steps", "0", "--out", str(tmp_path / "zero.json")]) == 2 and not (tmp_path / "zero.json").exists()
    assert "1 <= --steps < --fine" in capsys.readouterr().err
    assert main([*optimize, "--steps", "3", "--sigma-data", "0", "--out", str(tmp_path / "sd.json")]) == 2
    assert "--sigma-data must be > 0; got 0.0" in capsys.readouterr().err and not (tmp_path / "sd.json").exists()


def test_pipeline_takes_the_schedules_sigmas():
    from fastdiff.eval.assets import pipeline_path
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.pipelines.sampling import make_scheduler

    pipe = load_pipeline(pipeline_path("digits"))
    config, calls = dict(pipe.scheduler.config), []
    pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    for name in ("ghvb-1.8", "euler"):  # diffusers' Euler reads a list as ending at its last value: 0 is appended
        pipe.scheduler, calls[:] = make_scheduler(name, config), []
        pipe(class_labels=[1], num_inference_steps=3, sigmas=[60.0, 4.0, 0.3], output_type="latent")
        assert pipe.scheduler.sigmas.tolist() == pytest.approx([60.0, 4.0, 0.3, 0.0]) and len(calls) == 3, name
    for name in ("ddim", "unipc"):  # diffusers' UniPC has sigmas= but refuses it on a VP grid: a clear error, not theirs
        pipe.scheduler = make_scheduler(name, dict(pipe.scheduler.config))
        with pytest.raises(InputError, match=f"{type(pipe.scheduler).__name__}.set_timesteps takes no sigmas="):
            pipe(class_labels=[1], num_inference_steps=3, sigmas=[60.0, 4.0, 0.3], output_type="latent")


def test_one_calibration_serves_every_step_count(monkeypatch):
    """The reference trajectories are computed once per calibration; each step count's schedule from it equals the one
    `optimize_pipeline_schedule` makes from scratch for that step count (same noise, same grid)."""
    import fastdiff.samplers.schedule_search as search
    from fastdiff.eval.assets import pipeline_path
    from fastdiff.pipelines.class_conditional import load_pipeline
    from fastdiff.pipelines.schedule_files import calibrate_pipeline, optimize_pipeline_schedule, schedule_from_calibration

    pipe = load_pipeline(pipeline_path("digits"))
    calls, original = [], search.reference_trajectories
    monkeypatch.setattr(search, "reference_trajectories", lambda *a, **k: calls.append(1) or original(*a, **k))
    calibration = calibrate_pipeline(pipe, 1.0, num_samples=4, seed=3, fine_points=12)
    shared = {n: schedule_from_calibration(pipe, calibration, "digits", "ghvb-1.8", n) for n in (2, 3, 5)}
    assert len(calls) == 1 and [len(s["sigmas"]) for s in shared.values()] == [2, 3, 5]
    for n, record in shared.items():
        alone = optimize_pipeline_schedule(pipe, "digits", "ghvb-1.8", n, num_samples=4, seed=3, fine_points=12)
        assert alone["sigmas"] == pytest.approx(record["sigmas"], rel=1e-5) and alone["calibration"]["cost"] == pytest.approx(record["calibration"]["cost"], rel=1e-4)


def test_calibration_reuses_the_trajectories_evaluations_at_the_fine_points():
    """The step costs need ``D(x_i, sigma_i)`` at every fine point; the reference trajectories evaluate exactly that as
    their first call out of each point, so a calibration costs the trajectories' calls only (2 per Heun sub-step, one
    Euler step onto 0) and its matrix equals the one computed with fresh evaluations."""
    from fastdiff.samplers.schedule_search import calibration_costs, reference_trajectories, step_costs

    calls = []

    def counted(x, sigma, **cond):
        calls.append(float(sigma))
        return GMM(x, sigma, **cond)

    fine = torch.cat([karras_sigmas(11, 0.002, 80.0)[:-1], torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80.0
    costs = calibration_costs(counted, x, fine)
    assert len(calls) == (len(fine) - 2) * 2 * 2 + 1  # substeps = 2; was + len(fine) - 1 with the step costs' own calls
    fresh = step_costs(GMM, reference_trajectories(GMM, x, fine), fine)
    assert torch.equal(costs, fresh)
