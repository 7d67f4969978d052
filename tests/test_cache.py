"""Feature-cache hooks: a never-reusing policy is bit-identical to no cache, always-reuse reproduces the hand-computed
reuse, removal restores the model, state resets between pipeline calls, CFG batches, UNets the DeepCache way."""

import pytest
import torch
from conftest import tiny_dit, tiny_unet

from fastdiff.cache import EveryN, NeverReuse, ResidualThreshold, StaticMask, apply_cache, cache_stats, cache_units, remove_cache
from fastdiff.errors import InputError


def _dit_pipe():
    from diffusers import DDIMScheduler

    from fastdiff.pipelines import ClassConditionalPipeline

    pipe = ClassConditionalPipeline(scheduler=DDIMScheduler(), transformer=tiny_dit(num_layers=4).eval())
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
    assert cache_stats(model)["reuse_rate_per_step"][1] == pytest.approx(2 / 3)  # unit 0, the probe, is always computed
    remove_cache(model)
    assert all(r.abs().mean() > 1e-3 for r in residuals)  # the blocks do change their input
    for b, r in list(zip(model.transformer_blocks, residuals))[1:]:  # by hand: blocks 1, 2 add step 0's residuals
        b.forward = lambda hidden_states, *a, r=r, **k: hidden_states + r
    expected = model(x, timestep=torch.tensor([800, 800]), class_labels=labels).sample
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for b in model.transformer_blocks[1:]:
        del b.forward
    assert not torch.allclose(model(x, timestep=torch.tensor([800, 800]), class_labels=labels).sample, got)  # reuse mattered


def test_state_resets_between_pipeline_calls_and_stats():
    pipe = _dit_pipe()
    apply_cache(pipe.transformer, EveryN(interval=2))
    first, second = _sample(pipe), _sample(pipe)
    assert torch.equal(first, second)  # the second call reuses nothing from the first
    stats = cache_stats(pipe.transformer)
    assert stats["steps"] == 6 and stats["reuse_rate_per_step"][:3] == [0, 0.75, 0]  # computed at steps 0, 2, 4
    assert 0 < stats["macs_saved"] < 1


def test_unet_deepcache_style():
    from diffusers import DDIMScheduler

    from fastdiff.pipelines import ClassConditionalPipeline

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
    with pytest.raises(InputError, match="has 2 units per step; the model has 4"):
        apply_cache(pipe.transformer, StaticMask(torch.ones(4, 2, dtype=torch.bool), model="tiny DiT"))
    apply_cache(pipe.transformer, StaticMask(torch.ones(4, 4, dtype=torch.bool), model="tiny DiT"))
    with pytest.raises(InputError, match="covers 4 steps; the sampler is at step 5"):
        _sample(pipe, steps=8)


def test_bad_input():
    with pytest.raises(InputError, match="no recognisable block structure"):
        apply_cache(torch.nn.Linear(2, 2), EveryN())
    with pytest.raises(InputError, match="interval must be an integer >= 1"):
        EveryN(interval=0)
    with pytest.raises(InputError, match="threshold must be > 0"):
        ResidualThreshold(threshold=-1)
    model = tiny_dit()
    apply_cache(model, EveryN())
    with pytest.raises(InputError, match="already has a fastdiff cache"):
        apply_cache(model, EveryN())
    with pytest.raises(InputError, match="branch must be in"):
        cache_units(tiny_unet(), branch=5)
