"""Feature-cache hooks: a never-reusing policy is bit-identical to no cache, always-reuse reproduces the hand-computed
reuse, removal restores the model, state resets between pipeline calls, CFG batches, a cache per call when a pipeline
calls the model twice per step (true CFG), UNets the DeepCache way; the HarmoniCa router against hand computations."""

import pytest
import torch
from conftest import tiny_dit, tiny_unet

from fastdiff.cache import (
    EveryN,
    NeverReuse,
    ResidualThreshold,
    StageSwitch,
    StaticMask,
    StepContext,
    apply_cache,
    cache_stats,
    cache_units,
    remove_cache,
)
from fastdiff.errors import InputError


def _dit_pipe(in_channels: int = 4):
    from diffusers import DDIMScheduler

    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline

    pipe = ClassConditionalPipeline(scheduler=DDIMScheduler(), transformer=tiny_dit(num_layers=4, in_channels=in_channels).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, steps=6, w=1.0):
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    return pipe(class_labels=[0, 1], num_inference_steps=steps, guidance_scale=w, generator=gens, output_type="latent").images


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_never_reuse_is_bit_identical_and_removal_restores(w):
    pipe = _dit_pipe()
    plain = _sample(pipe, w=w)
    apply_cache(pipe.transformer, NeverReuse())
    assert torch.equal(_sample(pipe, w=w), plain)
    assert cache_stats(pipe.transformer)["reuse_rate"] == 0
    remove_cache(pipe.transformer)
    assert not hasattr(pipe.transformer.transformer_blocks[0], "_diffusers_hook")
    assert "forward" not in pipe.transformer.__dict__
    assert torch.equal(_sample(pipe, w=w), plain)


def test_always_reuse_matches_hand_computed_reuse():
    """EveryN with a huge interval: step 0 computes, every later step adds step 0's block residuals to its input."""
    model = tiny_dit(num_layers=3).eval()
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    residuals = []

    def grab(module, args, kwargs, out):
        residuals.append(out - (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]))

    handles = [b.register_forward_hook(grab, with_kwargs=True) for b in model.transformer_blocks]
    model(x, timestep=torch.tensor([900, 900]), class_labels=labels)
    for h in handles:
        h.remove()
    apply_cache(model, EveryN(interval=10_000))
    model(x, timestep=torch.tensor([900, 900]), class_labels=labels)
    got = model(x, timestep=torch.tensor([800, 800]), class_labels=labels).sample
    assert cache_stats(model)["reuse_rate_per_step"][1] == 1  # a static policy reuses every block, the first too
    remove_cache(model)
    assert all(r.abs().mean() > 1e-3 for r in residuals)  # the blocks do change their input
    for b, r in zip(model.transformer_blocks, residuals):  # by hand: every block adds its step-0 residual
        b.forward = lambda hidden_states, *a, r=r, **k: hidden_states + r
    expected = model(x, timestep=torch.tensor([800, 800]), class_labels=labels).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for b in model.transformer_blocks:
        del b.forward
    assert not torch.allclose(model(x, timestep=torch.tensor([800, 800]), class_labels=labels).sample, got)  # reuse mattered


def test_state_resets_between_pipeline_calls_and_stats():
    pipe = _dit_pipe()
    apply_cache(pipe.transformer, EveryN(interval=2))
    first, second = _sample(pipe), _sample(pipe)
    assert torch.equal(first, second)  # the second call reuses nothing from the first
    stats = cache_stats(pipe.transformer)
    assert stats["steps"] == 6 and stats["reuse_rate_per_step"][:3] == [0, 1, 0]  # computed at steps 0, 2, 4
    assert 0 < stats["macs_saved"] < 1


def test_unet_deepcache_style():
    from diffusers import DDIMScheduler

    from fastdiff.pipelines.class_conditional import ClassConditionalPipeline

    pipe = ClassConditionalPipeline(scheduler=DDIMScheduler(), unet=tiny_unet(num_class_embeds=4).eval())
    pipe.set_progress_bar_config(disable=True)
    plain = _sample(pipe)
    names = [n for n, _, _ in cache_units(pipe.unet)]
    assert names == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0"]
    apply_cache(pipe.unet, NeverReuse())
    assert torch.equal(_sample(pipe), plain)
    remove_cache(pipe.unet)
    apply_cache(pipe.unet, EveryN(interval=3))
    cached = _sample(pipe, w=2.0)
    stats = cache_stats(pipe.unet)
    assert torch.isfinite(cached).all() and stats["reuse_rate_per_step"][1] == 0.75 and stats["reuse_rate_per_step"][3] == 0


def test_adaptive_policy_and_static_mask():
    pipe = _dit_pipe()
    plain = _sample(pipe, steps=8)
    apply_cache(pipe.transformer, ResidualThreshold(threshold=1e-9))  # any change recomputes: nothing reused
    assert torch.equal(_sample(pipe, steps=8), plain)
    remove_cache(pipe.transformer)
    apply_cache(pipe.transformer, ResidualThreshold(threshold=10.0, max_reuse=2))
    _sample(pipe, steps=8)
    per_step = cache_stats(pipe.transformer)["reuse_rate_per_step"]
    assert per_step[0] == 0 and per_step[1] > 0 and per_step[3] == 0  # at most 2 reused steps in a row
    remove_cache(pipe.transformer)


def test_static_mask_refuses_another_model_unit_count_or_sampler():
    from fastdiff.cache import model_id

    pipe = _dit_pipe()
    ident = model_id(pipe.transformer)
    with pytest.raises(InputError, match="made for the model DiTTransformer2DModel:000; this model is DiTTransformer2DModel:"):
        apply_cache(pipe.transformer, StaticMask(torch.ones(4, 4, dtype=torch.bool), model="DiTTransformer2DModel:000"))
    with pytest.raises(InputError, match="has 2 units per step; the model has 4"):
        apply_cache(pipe.transformer, StaticMask(torch.ones(4, 2, dtype=torch.bool), model=ident))
    pipe.scheduler.set_timesteps(4)
    timesteps = pipe.scheduler.timesteps.tolist()
    apply_cache(pipe.transformer, StaticMask(torch.ones(4, 4, dtype=torch.bool), model=ident, timesteps=timesteps))
    _sample(pipe, steps=4)  # the plan's own sampler runs
    with pytest.raises(InputError, match=r"covers 4 steps; the sampler is at step 5"):
        pipe.transformer._fastdiff_cache.policy.begin_step(StepContext(4, 0.0))
    with pytest.raises(InputError, match=r"made for timesteps \[750, 500, 250, \.\.\.\] \(4 steps\); at step 0 the sampler gives timestep 875"):
        _sample(pipe, steps=8)  # another step count


def test_bad_input():
    with pytest.raises(InputError, match="no recognisable block structure"):
        apply_cache(torch.nn.Linear(2, 2), EveryN())
    with pytest.raises(InputError, match="interval must be an integer >= 1"):
        EveryN(interval=0)
    with pytest.raises(InputError, match="threshold must be > 0"):
        ResidualThreshold(threshold=-1)
    with pytest.raises(InputError, match="max_reuse and warmup must be >= 1"):
        ResidualThreshold(threshold=0.1, max_reuse=0)
    with pytest.raises(InputError, match=r"split must be in \[1, 3\] for a model with 4 units; got 5"):
        apply_cache(tiny_dit(num_layers=4), StageSwitch(split=5, switch_step=2))
    model = tiny_dit()
    apply_cache(model, EveryN())
    with pytest.raises(InputError, match="already has a fastdiff cache"):
        apply_cache(model, EveryN())
    with pytest.raises(InputError, match="branch must be in"):
        cache_units(tiny_unet(), branch=5)


def _residuals(model, x, t, labels):
    """Each block's residual (output - input) in a plain forward at timestep ``t``."""
    out = []

    def grab(module, args, kwargs, o):
        out.append(o - (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]))

    handles = [b.register_forward_hook(grab, with_kwargs=True) for b in model.transformer_blocks]
    with torch.no_grad():
        model(x, timestep=torch.tensor([t, t]), class_labels=labels)
    for h in handles:
        h.remove()
    return out


def _with_block_residuals(model, residuals, x, t, labels):
    """The model's output when each block with a residual given (not None) adds it to its input instead of computing."""
    replaced = [b for b, r in zip(model.transformer_blocks, residuals) if r is not None]
    for b, r in zip(model.transformer_blocks, residuals):
        if r is not None:
            b.forward = lambda hidden_states, *a, r=r, **k: hidden_states + r
    try:
        with torch.no_grad():
            return model(x, timestep=torch.tensor([t, t]), class_labels=labels).sample
    finally:
        for b in replaced:
            del b.forward


def test_taylor_forecast_extrapolates_the_residuals():
    """forecast=1 (TaylorSeer): steps 0 and 1 compute residuals r0, r1; step 3 reuses r1 + (r1 - r0) * (3 - 1)."""
    model = tiny_dit(num_layers=3).eval()
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    r0, r1 = _residuals(model, x, 900, labels), _residuals(model, x, 800, labels)
    apply_cache(model, EveryN(interval=10_000, warmup=2), forecast=1)
    with torch.no_grad():
        for t in (900, 800, 700):
            model(x, timestep=torch.tensor([t, t]), class_labels=labels)
        got = model(x, timestep=torch.tensor([600, 600]), class_labels=labels).sample
    remove_cache(model)
    expected = _with_block_residuals(model, [b + 2 * (b - a) for a, b in zip(r0, r1)], x, 600, labels)  # every block
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, _with_block_residuals(model, r1, x, 600, labels), atol=1e-4)  # the forecast mattered
    with pytest.raises(InputError, match="forecast is the Taylor order"):
        apply_cache(model, EveryN(), forecast=3)


class _QuarterGate(EveryN):
    """Block 0 computes; block 1 mixes a quarter of its fresh output into the reused one and never refreshes."""

    def gate(self, ctx, unit):
        return torch.tensor(0.25) if unit == 1 else None

    def should_compute(self, ctx, unit):
        return unit == 0


def test_router_gate_mixes_fresh_and_reused_outputs_and_bypass_leaves_the_cache_alone():
    from fastdiff.cache import cache_bypassed

    model = tiny_dit(num_layers=2).eval()
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    r0 = _residuals(model, x, 900, labels)
    apply_cache(model, _QuarterGate(interval=1))
    with torch.no_grad():
        model(x, timestep=torch.tensor([900, 900]), class_labels=labels)
        with cache_bypassed(model):
            plain = model(x, timestep=torch.tensor([800, 800]), class_labels=labels).sample
        assert model._fastdiff_cache.ctx.step == 0  # the bypassed call counted no step
        got = model(x, timestep=torch.tensor([800, 800]), class_labels=labels).sample
    remove_cache(model)
    with torch.no_grad():
        fresh = model(x, timestep=torch.tensor([800, 800]), class_labels=labels).sample
    fresh_residual = _residuals(model, x, 800, labels)[1]
    torch.testing.assert_close(plain, fresh, rtol=0, atol=0)
    # block 1 by hand: 0.25 * (input + its fresh residual) + 0.75 * (input + step 0's residual)
    expected = _with_block_residuals(model, [None, 0.25 * fresh_residual + 0.75 * r0[1]], x, 800, labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_router_save_load_round_trip_and_mismatches(tmp_path):
    from fastdiff.cache import Router, apply_router, load_router, model_id

    pipe = _dit_pipe()
    pipe.scheduler.set_timesteps(4)
    units = [n for n, _, _ in cache_units(pipe.transformer)]
    router = Router(units, pipe.scheduler.timesteps.tolist(), model_id(pipe.transformer), meta={"threshold": 0.1, "forecast": 1})
    with torch.no_grad():
        for row in router.rows:
            row.copy_(torch.tensor([-4.0, -4.0, 0.0, 4.0]))
    path = router.save(tmp_path / "router.safetensors")
    back = load_router(path)
    assert torch.equal(back.scores(), router.scores()) and back.units == units and back.meta["forecast"] == 1
    assert torch.equal(back.plan().mask, router.plan().mask) and back.plan().mask[1].tolist() == [False, False, True, True]
    assert not (tmp_path / "router.safetensors.tmp").exists()
    apply_router(pipe.transformer, path)
    _sample(pipe, steps=4)
    assert cache_stats(pipe.transformer)["reuse_rate_per_step"] == [0, 0.5, 0.5, 0.5]
    remove_cache(pipe.transformer)
    other = tiny_dit(num_layers=3)
    with pytest.raises(InputError, match="made for the model DiTTransformer2DModel:.*this model is DiTTransformer2DModel:"):
        apply_router(other, path)
    apply_router(pipe.transformer, path)
    with pytest.raises(InputError, match="made for timesteps .* at step 0 the sampler gives timestep 900"):
        _sample(pipe, steps=10)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="is not a fastdiff router"):
        load_router(tmp_path / "bad.safetensors")
    with pytest.raises(InputError, match="no router file"):
        load_router(tmp_path / "missing.safetensors")


def test_iepo_loss_and_router_training_smoke():
    """The loss's closed form; SDT + IEPO on a tiny DiT moves the logits, keeps step 0 / unit 0 computed, and the
    error term is what caching costs (0 where everything computes)."""
    from fastdiff.cache import RouterConfig, train_router
    from fastdiff.cache.router import iepo_loss

    target = torch.randn(3, 4)
    terms = iepo_loss(target.clone(), target, torch.tensor([0.2, 0.6]), 2.0, 0.5)
    assert float(terms["error"]) == 0 and float(terms["l1"]) == pytest.approx(0.5 * 0.4)
    terms = iepo_loss(target + 0.1, target, torch.tensor([1.0]), 2.0, 0.0)
    assert float(terms["error"]) == pytest.approx(2.0 * 0.01 / float(target.pow(2).mean()), rel=1e-5)

    pipe = _dit_pipe()
    cfg = RouterConfig(steps=4, iterations=3, batch_size=2, lambda_batch=2, lambda_every=2, beta=1.0, lr=0.5)
    router, record = train_router(pipe, cfg, progress=False)
    scores = router.scores()
    assert (scores[1:, 1:] < torch.sigmoid(torch.tensor(cfg.init))).all()  # a strong L1 weight lowers every routed score
    assert len(record["error"]) == 3 and all(e > 0 for e in record["error"]) and len(record["lambda"]) == 2
    assert record["lambda"][1] != record["lambda"][0]  # recomputed from the router as training moved it
    assert getattr(pipe.transformer, "_fastdiff_cache", None) is None and all(p.requires_grad for p in pipe.transformer.parameters())
    start = train_router(pipe, RouterConfig(steps=7, iterations=1, batch_size=1, lambda_batch=1, lr=1e-6, init_every=3), progress=False)[0]
    assert start.plan().mask[:, 2].tolist() == [True, False, False, True, False, False, True]  # the every-3 plan it starts from
    with pytest.raises(InputError, match="steps must be >= 2"):
        RouterConfig(steps=1)


def _global_noise_call(pipe, steps, batch, seed):
    """A generation whose labels and noise come from the global RNG (as a diffusers pipeline called without a
    generator)."""
    labels = torch.randint(0, pipe.num_classes, (batch,))
    return pipe(labels, steps, 1.0, None, output_type="latent").images


def test_train_router_leaves_the_model_and_the_global_rng_as_they_were():
    """Each parameter's requires_grad and the caller's global RNG state are as before training -- also when the
    generation fails -- and the router is still a function of cfg.seed (the global RNG is seeded inside)."""
    from fastdiff.cache import RouterConfig, train_router
    from fastdiff.cache.router import image_error_proxy

    pipe = _dit_pipe()
    model = pipe.transformer
    model.pos_embed.requires_grad_(False)  # a user's partly frozen model
    flags = [p.requires_grad for p in model.parameters()]
    cfg = RouterConfig(steps=3, iterations=2, batch_size=2, lambda_batch=2, lambda_every=1, lr=0.5, granularity="block")
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = train_router(pipe, cfg, call=_global_noise_call, progress=False)[0]
    assert torch.equal(torch.get_rng_state(), state)
    assert [p.requires_grad for p in model.parameters()] == flags
    torch.randn(3)  # the caller's RNG moves on; the router does not depend on it
    again = train_router(pipe, cfg, call=_global_noise_call, progress=False)[0]
    assert torch.equal(first.scores(), again.scores()) and (first.scores()[1:] != 0.5).any()  # trained, and reproducibly

    def failing(pipe, steps, batch, seed):
        raise RuntimeError("out of memory")

    state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="out of memory"):
        train_router(pipe, cfg, call=failing, progress=False)
    assert [p.requires_grad for p in model.parameters()] == flags and torch.equal(torch.get_rng_state(), state)
    assert getattr(model, "_fastdiff_cache", None) is None and "forward" not in model.__dict__
    apply_cache(model, NeverReuse())  # the user's own cache is refused, not silently removed
    with pytest.raises(InputError, match="already has a cache"):
        image_error_proxy(pipe, first, cfg)
    assert isinstance(model._fastdiff_cache.policy, NeverReuse)
    remove_cache(model)


def test_image_error_proxy_matches_a_hand_computation():
    """IEPO's lambda_t (HarmoniCa eq. 9) for a hard router (logits +-200: scores exactly 1 or 0), recomputed with plain
    forward hooks: x0^(t) samples with the router's plan on steps 1..t and everything computed after; lambda_t =
    mean (x0^(t) - x0^(t-1))^2, normalised to mean 1 over t >= 1. A step whose plan computes every block adds no
    error (lambda_2 = 0)."""
    from fastdiff.cache import Router, RouterConfig, model_id
    from fastdiff.cache.router import class_conditional_call, image_error_proxy

    pipe = _dit_pipe()
    model = pipe.transformer
    pipe.scheduler.set_timesteps(4)
    router = Router([n for n, _, _ in cache_units(model)], pipe.scheduler.timesteps.tolist(), model_id(model), meta={"granularity": "block"})
    plan = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        for row, computed in zip(router.rows, plan):
            row.copy_(torch.where(computed, 200.0, -200.0))
    cfg = RouterConfig(steps=4, lambda_batch=2, granularity="block")
    lam = image_error_proxy(pipe, router, cfg)

    def sample_with_plan_until(t):
        saved = {}

        def hook(i):
            def run(module, args, kwargs, out):
                step = saved[i, "calls"] = saved.get((i, "calls"), -1) + 1
                x = kwargs.get("hidden_states", args[0] if args else None)
                if step > t or plan[step, i]:
                    saved[i] = out - x
                    return out
                return x + saved[i]

            return run

        handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(model.transformer_blocks)]
        images = class_conditional_call(pipe, 4, 2, 10_000).float()
        for h in handles:
            h.remove()
        return images

    images = [sample_with_plan_until(t) for t in range(4)]
    raw = torch.tensor([0.0] + [float((images[t] - images[t - 1]).pow(2).mean()) for t in range(1, 4)])
    torch.testing.assert_close(lam, raw / raw[1:].mean(), rtol=1e-5, atol=1e-7)
    assert lam[2] == 0 and lam[1] > 0 and lam[3] > 0


def test_calibration_fits_probe_change_to_output_change(tmp_path):
    import json

    import numpy as np

    from fastdiff.cache import calibrate, load_calibration
    from fastdiff.cache.calibrate import rel_l1

    pipe = _dit_pipe()
    fit = calibrate(pipe, steps=6, degree=2, generations=2, batch=2)
    assert len(fit["coefficients"]) == 3 and len(fit["probe_change"]) == 2 * 5 == len(fit["output_change"])
    x, y = np.array(fit["probe_change"]), np.array(fit["output_change"])
    design = np.vander(x, 3)  # least squares by hand gives the same polynomial
    np.testing.assert_allclose(fit["coefficients"], np.linalg.lstsq(design, y, rcond=None)[0], rtol=1e-6, atol=1e-9)
    residual = y - np.polyval(fit["coefficients"], x)
    assert fit["r2"] == pytest.approx(1 - (residual**2).sum() / ((y - y.mean()) ** 2).sum(), rel=1e-9)
    # the probe change is the first block's residual change, recomputed here with a plain forward hook
    residuals = []
    block = pipe.transformer.transformer_blocks[0]
    h = block.register_forward_hook(lambda m, a, k, o: residuals.append(o - k.get("hidden_states", a[0] if a else None)), with_kwargs=True)
    from fastdiff.cache.router import class_conditional_call

    with torch.no_grad():
        class_conditional_call(pipe, 6, 2, 0)
    h.remove()
    assert fit["probe_change"][0] == pytest.approx(rel_l1(residuals[1], residuals[0]), rel=1e-5)
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(fit))
    policy = load_calibration(path, threshold=0.3)
    assert tuple(policy.coefficients) == tuple(fit["coefficients"]) and policy.threshold == 0.3
    path.write_text("{}")
    with pytest.raises(InputError, match="is not a fastdiff cache calibration"):
        load_calibration(path, threshold=0.3)


@pytest.mark.parametrize("kind", ["sd", "sd3", "flux"])
def test_stock_pipelines_without_cache_context(tmp_path, kind):
    """Stable Diffusion (UNet, DeepCache-style), SD3 (joint blocks, CFG batched) and Flux (double + single stream
    blocks): never-reuse is bit-identical, every-2 reuses at the odd steps, removal restores."""
    from conftest import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

    pipe = {"sd": tiny_sd_pipeline, "sd3": lambda f: tiny_sd3_pipeline(f, num_layers=2), "flux": tiny_flux_pipeline}[kind](tmp_path)
    model = pipe.unet if kind == "sd" else pipe.transformer
    extra = {} if kind == "sd" else {"max_sequence_length": 8}

    def run():
        return pipe("a photo", num_inference_steps=4, height=8, width=8, output_type="latent", guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0), **extra).images  # fmt: skip

    plain = run()
    apply_cache(model, NeverReuse())
    assert torch.equal(run(), plain)
    remove_cache(model)
    apply_cache(model, EveryN(interval=2))
    cached = run()
    per_step = cache_stats(model)["reuse_rate_per_step"]
    assert per_step[0] == per_step[2] == 0 and per_step[1] > 0 and torch.isfinite(cached).all()
    assert not torch.equal(cached, plain)
    remove_cache(model)
    assert torch.equal(run(), plain)


def test_command_line_calibrate_train_router_and_sample(tmp_path, capsys):
    """`fastdiff cache calibrate` / `train-router` on a pipeline folder, then `fastdiff sample --cache ...`; an
    existing output is not overwritten, a router used with another step count or a bad spec exits 2."""
    import json

    from fastdiff.cli import main
    from fastdiff.pipelines.class_conditional import save_teacher

    folder = str(save_teacher(_dit_pipe(in_channels=1), tmp_path / "teacher"))
    router, fit = tmp_path / "r.safetensors", tmp_path / "fit.json"
    common = ["--no-progress", "--scheduler", "ddim"]
    assert main(["cache", "train-router", folder, "--steps", "4", "--iterations", "1", "--batch-size", "2", "--out", str(router), *common]) == 0
    assert main(["cache", "calibrate", folder, "--steps", "5", "--degree", "2", "--generations", "1", "--batch-size", "2", "--out", str(fit), *common]) == 0
    assert json.loads((tmp_path / "r_training.json").read_text())["config"]["steps"] == 4 and len(json.loads(fit.read_text())["coefficients"]) == 3
    assert json.loads((tmp_path / "r_training.json").read_text())["config"]["granularity"] == "attn-mlp"
    assert main(["cache", "train-router", folder, "--granularity", "mlp", "--out", str(tmp_path / "g.safetensors"), *common]) == 2
    assert "granularity must be one of block, attn-mlp; got 'mlp'" in capsys.readouterr().err
    before = router.read_bytes()
    assert main(["cache", "train-router", folder, "--steps", "4", "--out", str(router), *common]) == 2
    assert "already exist" in capsys.readouterr().err and router.read_bytes() == before
    sample = ["sample", "--pipeline", folder, "--scheduler", "ddim", "--num-samples", "2", "--no-progress"]
    for spec, steps in ((f"router:{router}", 4), ("every:2:taylor", 5), (f"threshold:0.1:{fit}", 5)):
        assert main([*sample, "--steps", str(steps), "--cache", spec, "--out", str(tmp_path / spec[:5])]) == 0, capsys.readouterr().err
    assert main([*sample, "--steps", "6", "--cache", f"router:{router}", "--out", str(tmp_path / "x")]) == 2
    assert "made for timesteps" in capsys.readouterr().err
    for bad, message in (("every:two", "cannot read the cache setting"), ("every:0", "interval must be an integer >= 1"),
                         ("router:nope.safetensors", "no router file")):  # fmt: skip
        assert main([*sample, "--cache", bad, "--out", str(tmp_path / "y")]) == 2
        assert message in capsys.readouterr().err


def test_policies_see_the_step_and_sigma():
    """With the scheduler given, each step's context carries the sigma of the timestep the model was called with."""
    from fastdiff.schedules import VPSchedule

    seen = []

    class Record(NeverReuse):
        def begin_step(self, ctx):
            seen.append(ctx)

    pipe = _dit_pipe()
    apply_cache(pipe.transformer, Record(), scheduler=pipe.scheduler)
    _sample(pipe, steps=4)
    schedule = VPSchedule.from_config(pipe.scheduler.config)
    assert [c.step for c in seen] == [0, 1, 2, 3] and [c.timestep for c in seen] == [750, 500, 250, 0]
    for c in seen:
        assert c.sigma == pytest.approx(float(schedule.t_to_sigma(torch.tensor(c.timestep, dtype=torch.float64))), rel=1e-9)
    assert seen[0].sigma > seen[1].sigma > seen[3].sigma > 0


def test_fastdiff_scheduler_with_a_repeated_timestep():
    """fastdiff's PLMS queries the model twice at its second timestep (N + 1 calls): every call is a step of the
    same generation, never-reuse stays bit-identical, and a router plan covers all N + 1 calls."""
    from fastdiff.cache import Router, apply_router, model_id
    from fastdiff.samplers.diffusers import PLMSScheduler

    pipe = _dit_pipe()
    pipe.scheduler = PLMSScheduler.from_config(pipe.scheduler.config)
    plain = _sample(pipe, steps=5)
    assert torch.equal(_sample(pipe, steps=5), plain)  # a second pipeline call starts from the same noise
    apply_cache(pipe.transformer, NeverReuse())
    assert torch.equal(_sample(pipe, steps=5), plain) and cache_stats(pipe.transformer)["steps"] == 6
    remove_cache(pipe.transformer)
    pipe.scheduler.set_timesteps(5)
    timesteps = pipe.scheduler.timesteps.tolist()
    assert len(timesteps) == 6 and timesteps[1] == timesteps[2]
    router = Router([n for n, _, _ in cache_units(pipe.transformer)], timesteps, model_id(pipe.transformer))
    with torch.no_grad():
        router.rows[3].fill_(-5.0)  # the 4th call reuses every block
    apply_router(pipe.transformer, router)
    cached = _sample(pipe, steps=5)
    assert cache_stats(pipe.transformer)["reuse_rate_per_step"] == [0, 0, 0, 1, 0, 0] and not torch.equal(cached, plain)


def test_a_bypassed_first_call_does_not_spoil_the_mac_count():
    pipe = _dit_pipe()
    apply_cache(pipe.transformer, EveryN(interval=2))
    _sample(pipe)
    expected = cache_stats(pipe.transformer)["macs_saved"]
    remove_cache(pipe.transformer)
    apply_cache(pipe.transformer, EveryN(interval=2))
    from fastdiff.cache import cache_bypassed

    with cache_bypassed(pipe.transformer):
        _sample(pipe)
    _sample(pipe)
    assert cache_stats(pipe.transformer)["macs_saved"] == pytest.approx(expected) and expected > 0


def _every_n_by_hand(blocks, interval: int, calls_per_step: int, per_call: bool = True):
    """Every-N caching written with plain forward hooks on Flux blocks (kwargs in, (encoder, hidden) out): the model's
    k-th call is call k % calls_per_step of step k // calls_per_step; at steps 0, N, 2N, ... a block stores its
    residuals, at the others it returns its inputs plus the residuals stored by the same call (or, with
    ``per_call=False``, by whichever call stored last)."""
    seen, saved = {}, {}

    def hook(module, args, kwargs, out):
        k = seen[module] = seen.get(module, -1) + 1
        step, call = divmod(k, calls_per_step)
        key = (module, call if per_call else 0)
        ins = (kwargs["encoder_hidden_states"], kwargs["hidden_states"])
        if step % interval == 0:
            saved[key] = [o - i for o, i in zip(out, ins)]
            return out
        return tuple(i + r for i, r in zip(ins, saved[key]))

    return [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]


def test_flux_true_cfg_keeps_a_cache_per_call(tmp_path):
    """Flux with true_cfg_scale > 1 calls the transformer twice per step, inside cache_context("cond") and
    ("uncond"): 4 steps stay 4 steps, never-reuse is bit-identical, every-2 makes each call reuse its own residuals
    (checked against plain forward hooks doing the same), and adaptive policies accumulate per call."""
    from conftest import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(tmp_path)
    model = pipe.transformer
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]

    def run():
        return pipe("a photo", negative_prompt="photo", true_cfg_scale=3.0, num_inference_steps=4, height=8, width=8,
                    output_type="latent", generator=torch.Generator().manual_seed(0), max_sequence_length=8).images  # fmt: skip

    plain = run()
    apply_cache(model, NeverReuse())
    assert torch.equal(run(), plain)
    stats = cache_stats(model)
    assert stats["steps"] == 4 and stats["calls"] == ["cond", "uncond"] and stats["reuse_rate"] == 0
    remove_cache(model)
    apply_cache(model, EveryN(interval=2))
    cached = run()
    assert cache_stats(model)["reuse_rate_per_step"] == [0, 1, 0, 1]
    remove_cache(model)
    for per_call in (True, False):
        handles = _every_n_by_hand(blocks, interval=2, calls_per_step=2, per_call=per_call)
        by_hand = run()
        for h in handles:
            h.remove()
        assert torch.equal(cached, by_hand) == per_call  # its own residuals, not the other call's
    apply_cache(model, ResidualThreshold(threshold=10.0, max_reuse=2))  # reuse whenever allowed: 2 steps in a row
    run()
    assert cache_stats(model)["reuse_rate_per_step"] == [0, 0.5, 0.5, 0]  # per call; unit 0 is the probe
    remove_cache(model)


def test_separate_unconditional_calls_without_cache_context():
    """Without a cache context, a call at the step's timestep with the step's input is the step's next call (own
    cache, checked by hand); the same timestep with another input is a new step (PLMS, Heun)."""
    model = tiny_dit(num_layers=2).eval()
    x, x1 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    cond, null = torch.tensor([0, 1]), torch.tensor([10, 10])  # 10: the null class of a 10-class DiT
    r_cond, r_null = _residuals(model, x, 900, cond), _residuals(model, x, 900, null)
    apply_cache(model, EveryN(interval=10_000))
    with torch.no_grad():
        model(x, timestep=torch.tensor([900, 900]), class_labels=cond)
        model(x.clone(), timestep=torch.tensor([900, 900]), class_labels=null)
        got_cond = model(x1, timestep=torch.tensor([800, 800]), class_labels=cond).sample
        got_null = model(x1, timestep=torch.tensor([800, 800]), class_labels=null).sample
    stats = cache_stats(model)
    assert stats["steps"] == 2 and stats["calls"] == ["0", "1"] and stats["reuse_rate_per_step"] == [0, 1]
    with torch.no_grad():
        model(x1 + 1, timestep=torch.tensor([800, 800]), class_labels=cond)
    assert cache_stats(model)["steps"] == 3
    remove_cache(model)
    assert torch.equal(got_cond, _with_block_residuals(model, r_cond, x1, 800, cond))
    assert torch.equal(got_null, _with_block_residuals(model, r_null, x1, 800, null))
    assert not torch.allclose(got_null, _with_block_residuals(model, r_cond, x1, 800, null), atol=1e-4)


@pytest.mark.parametrize("scheduler", ["plms", "heun"])
def test_train_router_with_samplers_that_call_the_model_more_than_once_per_step(scheduler):
    """PLMS (N + 1 calls) and Heun (2N - 1 calls): one router row and one lambda per model call; the trained plan
    then runs with the same sampler."""
    from fastdiff.cache import RouterConfig, apply_router, train_router
    from fastdiff.pipelines.sampling import make_scheduler

    pipe = _dit_pipe()
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    pipe.scheduler.set_timesteps(3)
    calls = len(pipe.scheduler.timesteps)
    assert calls == {"plms": 4, "heun": 5}[scheduler]
    cfg = RouterConfig(steps=3, iterations=2, batch_size=1, lambda_batch=1, lambda_every=1, beta=1.0)
    router, record = train_router(pipe, cfg, progress=False)
    assert len(router.rows) == calls and all(len(lam) == calls and all(v > 0 for v in lam[1:]) for lam in record["lambda"])
    assert router.units[:2] == ["transformer_blocks.0.attn1", "transformer_blocks.0.ff"]
    apply_router(pipe.transformer, router, threshold=0.5)
    _sample(pipe, steps=3)
    stats = cache_stats(pipe.transformer)
    assert stats["steps"] == calls and stats["units"] == router.units and stats["reuse_rate"] > 0
    remove_cache(pipe.transformer)


def _replace_outputs(modules, fn):
    """Plain forward hooks: module i returns ``fn(i, call, output)``, ``call`` counting its calls."""
    calls = {}

    def hook(i):
        def run(module, args, out):
            calls[i] = calls.get(i, -1) + 1
            return fn(i, calls[i], out)

        return run

    return [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]


def _sublayers(model):
    return [m for b in model.transformer_blocks for m in (b.attn1, b.ff)]


def test_attn_mlp_units_reuse_outputs_before_the_gates():
    """granularity="attn-mlp" (HarmoniCa): DiT's attention and feed-forward are units; a reused one returns its cached
    output, which the block scales with the *current* step's adaLN gate -- by hand: the plain model with those
    outputs swapped in; other blocks (Flux) stay whole, PixArt's are split."""
    from diffusers import PixArtTransformer2DModel

    from conftest import tiny_flux

    model = tiny_dit(num_layers=2).eval()
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([0, 1])
    saved = {}
    handles = _replace_outputs(_sublayers(model), lambda i, k, out: saved.setdefault(i, out))
    with torch.no_grad():
        model(x, timestep=torch.tensor([900, 900]), class_labels=labels)
    for h in handles:
        h.remove()
    apply_cache(model, EveryN(interval=10_000), granularity="attn-mlp")
    with torch.no_grad():
        model(x, timestep=torch.tensor([900, 900]), class_labels=labels)
        got = model(x, timestep=torch.tensor([800, 800]), class_labels=labels).sample
    stats = cache_stats(model)
    assert stats["units"] == ["transformer_blocks.0.attn1", "transformer_blocks.0.ff", "transformer_blocks.1.attn1", "transformer_blocks.1.ff"]
    assert stats["reuse_rate_per_step"] == [0, 1]
    remove_cache(model)
    handles = _replace_outputs(_sublayers(model), lambda i, k, out: saved[i])
    with torch.no_grad():
        expected = model(x, timestep=torch.tensor([800, 800]), class_labels=labels).sample
    for h in handles:
        h.remove()
    assert torch.equal(got, expected)
    apply_cache(model, EveryN(interval=10_000))  # per block: the step-900 residual, gates included
    with torch.no_grad():
        model(x, timestep=torch.tensor([900, 900]), class_labels=labels)
        per_block = model(x, timestep=torch.tensor([800, 800]), class_labels=labels).sample
    remove_cache(model)
    assert not torch.allclose(per_block, got, atol=1e-4)
    flux_units = [n for n, _, _ in cache_units(tiny_flux(), granularity="attn-mlp")]
    assert flux_units == [n for n, _, _ in cache_units(tiny_flux())]
    pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
                                      sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=8)  # fmt: skip
    assert [n for n, _, _ in cache_units(pixart, granularity="attn-mlp")] == ["transformer_blocks.0.attn1", "transformer_blocks.0.ff"]
    with pytest.raises(InputError, match="granularity must be one of block, attn-mlp; got 'mlp'"):
        cache_units(model, granularity="mlp")


def test_sdt_loss_is_taken_on_the_guided_output():
    """With guidance w, the SDT error at step 1 of a 2-step rollout is the relative MSE between the guided router-mixed
    output and the guided full output (lambda_1 = 1 after normalisation), recomputed here by hand: step 0 computes
    everything, step 1 mixes 0.5 * fresh + 0.5 * step 0's attention / feed-forward outputs (scores sigmoid(0))."""
    from fastdiff.cache import RouterConfig, train_router
    from fastdiff.cache.router import class_conditional_call, guided

    pipe = _dit_pipe()
    model = pipe.transformer
    cfg = RouterConfig(steps=2, iterations=1, batch_size=2, lambda_batch=1, guidance_scale=3.0)
    inputs, saved = [], {}
    pre = model.register_forward_pre_hook(lambda m, a, k: inputs.append(k), with_kwargs=True)
    handles = _replace_outputs(_sublayers(model), lambda i, k, out: saved.setdefault(i, out))
    class_conditional_call(pipe, 2, 2, seed=0, guidance_scale=3.0)  # the rollout's first call: what step 0 caches
    pre.remove()
    for h in handles:
        h.remove()
    with torch.no_grad():
        target = model(**inputs[1])[0]
        handles = _replace_outputs(_sublayers(model), lambda i, k, out: 0.5 * out + 0.5 * saved[i])
        mixed = model(**inputs[1])[0]
    for h in handles:
        h.remove()

    def rel_mse(a, b):
        return float((a - b).pow(2).mean() / b.pow(2).mean())

    expected = rel_mse(guided(mixed, 3.0), guided(target, 3.0))
    assert abs(expected - rel_mse(mixed, target)) > 0.1 * expected  # guidance changes the error
    _, record = train_router(pipe, cfg, progress=False)
    assert record["lambda"][0][1] == pytest.approx(1.0) and record["error"][0] == pytest.approx(expected, rel=1e-4)


def test_calibration_pairs_changes_within_each_call(tmp_path):
    """Flux with true CFG: the probe change is taken between the same call's first-block residuals (cond with cond,
    uncond with uncond) and the output change between the same call's outputs -- recomputed by hand."""
    from conftest import tiny_flux_pipeline

    from fastdiff.cache import calibrate
    from fastdiff.cache.calibrate import rel_l1

    pipe = tiny_flux_pipeline(tmp_path)

    def call(pipe, steps, batch, seed):
        return pipe("a photo", negative_prompt="photo", true_cfg_scale=3.0, num_inference_steps=steps, height=8, width=8,
                    output_type="latent", generator=torch.Generator().manual_seed(seed), max_sequence_length=8).images  # fmt: skip

    fit = calibrate(pipe, steps=3, call=call, degree=1, generations=1, batch=1)
    residuals, outputs = [], []
    block = pipe.transformer.transformer_blocks[0]
    handles = [block.register_forward_hook(lambda m, a, k, o: residuals.append(o[1] - k["hidden_states"]), with_kwargs=True),
               pipe.transformer.register_forward_hook(lambda m, a, o: outputs.append(o[0]))]  # fmt: skip
    with torch.no_grad():
        call(pipe, 3, 1, 0)
    for h in handles:
        h.remove()
    # calls alternate cond, uncond: the cond changes (steps 0->1, 1->2), then the uncond ones
    x = [rel_l1(residuals[i + 2], residuals[i]) for i in (0, 2, 1, 3)]
    y = [rel_l1(outputs[i + 2], outputs[i]) for i in (0, 2, 1, 3)]
    assert fit["probe_change"] == pytest.approx(x, rel=1e-5) and fit["output_change"] == pytest.approx(y, rel=1e-5)
