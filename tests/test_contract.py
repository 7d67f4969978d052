"""The objective contract (issue 12, sections 2, 3 and 7): a two-network objective fits the trainer unchanged -- a
generator and a critic on a 2-D problem, separate optimisers, the critic stepped 5x as often, each phase's gradient
reaching only its own network, a run stopped after a checkpoint and resumed equal to the uninterrupted one bit for bit
(both networks, both optimisers, the EMA) -- the trainer synchronises with the host once per optimiser step and once
per log step, and there is one EMA implementation in the library."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch import nn

from fastdiff.errors import InputError
from fastdiff.objectives.base import EMATarget, LossOutput, Objective, per_sample_randn
from fastdiff.training.trainer import OptimConfig, TrainerConfig, train

PACKAGE = Path(__file__).resolve().parent.parent / "fastdiff"


class Crash(RuntimeError):
    """Stands in for a killed process."""


class ToyGAN(Objective):
    """A non-saturating GAN on 2-D points: phase ``generator`` trains ``generator`` against the critic, phase
    ``critic`` trains ``critic`` to tell data from samples. Neither phase detaches the other network: keeping each
    phase's gradient on its own parameters is the trainer's job."""

    phases = ("generator", "critic")

    def __init__(self, crash_at: int | None = None):
        super().__init__()
        self.generator = nn.Linear(2, 2)
        self.critic = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
        self.crash_at = crash_at

    def parameters_for(self, phase: str):
        return getattr(self, phase).parameters()

    def export(self) -> nn.Module:
        return self.generator

    def forward(self, batch, phase, step):
        if step == self.crash_at:
            raise Crash(f"killed at step {step}")
        x = batch["x"]
        fake = self.generator(per_sample_randn(x, batch["seeds"], 0))
        if phase == "generator":
            loss = nn.functional.softplus(-self.critic(fake)).mean()
        else:
            loss = nn.functional.softplus(self.critic(fake)).mean() + nn.functional.softplus(-self.critic(x)).mean()
        return LossOutput({phase: loss}, {"fake_mean": fake.mean().detach()})


def _data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, generator=g) * 0.5 + torch.tensor([2.0, -1.0]), torch.zeros(n, dtype=torch.long)


def _cfg(steps: int = 20, **kw) -> TrainerConfig:
    phases = {"generator": OptimConfig(kind="adamw", lr=1e-2, update_every=5), "critic": OptimConfig(kind="radam", lr=5e-3)}
    base = dict(steps=steps, batch_size=16, checkpoint_every=5, log_every=5, tracker="none", ema_decay=0.9, phase_optim=phases)
    return TrainerConfig(**{**base, **kw})


class _Steps:
    """Records every optimiser step (global hook): the phase it belongs to, and which parameters hold gradients."""

    def __init__(self, objective: ToyGAN):
        self.ids = {phase: {id(p) for p in objective.parameters_for(phase)} for phase in objective.phases}
        self.params = {phase: list(objective.parameters_for(phase)) for phase in objective.phases}
        self.counts = {phase: 0 for phase in objective.phases}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.leaks: list[str] = []

    def __call__(self, opt, args, kwargs):
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        (phase,) = [ph for ph, own in self.ids.items() if own == ids]  # each optimiser holds exactly one phase's parameters
        self.counts[phase] += 1
        self.optimizers[phase] = opt
        for other, params in self.params.items():
            has = [p.grad is not None for p in params]
            if (other == phase and not all(has)) or (other != phase and any(has)):
                self.leaks.append(f"step of {phase}: gradients of {other} are {has}")


def _run(tmp_path, objective, steps=20, resume=None, **kw):
    images, labels = _data()
    record_steps = _Steps(objective)
    handle = register_optimizer_step_pre_hook(record_steps)
    try:
        ema, record = train(objective, images, labels, _cfg(steps, **kw), tmp_path, {"recipe": "toy"}, resume=resume, progress=False)
    finally:
        handle.remove()
    return ema, record, record_steps


def _equal_states(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    return a == b


def test_two_phases_ratio_5_separate_optimisers_isolated_gradients(tmp_path):
    torch.manual_seed(0)
    obj = ToyGAN()
    _, record, steps = _run(tmp_path / "run", obj, log_every=1)
    assert steps.counts == {"generator": 4, "critic": 20}  # update_every=5: the critic steps 5x as often
    assert not steps.leaks, steps.leaks[:3]  # at each step, only the stepping phase's network holds gradients
    gen, critic = steps.optimizers["generator"], steps.optimizers["critic"]
    assert isinstance(gen, torch.optim.AdamW) and isinstance(critic, torch.optim.RAdam)
    assert [int(s["step"]) for s in gen.state_dict()["state"].values()] == [4, 4]
    assert all(p.requires_grad for p in obj.parameters())  # the trainer's freezing is undone
    first, second = record["history"][:2]  # step 1 ran both phases, step 2 the critic only
    assert set(first) == set(second) == {"step", "loss/critic/critic", "critic/fake_mean", "loss/generator/generator",
                                         "generator/fake_mean", "images_per_s"}  # fmt: skip
    assert second["loss/generator/generator"] == first["loss/generator/generator"]  # each phase's latest value is logged
    assert second["loss/critic/critic"] != first["loss/critic/critic"]


def test_two_phase_run_stopped_and_resumed_is_bitwise(tmp_path):
    torch.manual_seed(0)
    full = ToyGAN()
    ema_full, _, steps_full = _run(tmp_path / "full", full)
    torch.manual_seed(0)
    with pytest.raises(Crash):
        _run(tmp_path / "cut", ToyGAN(crash_at=12))  # checkpoints at steps 5 and 10, then killed
    torch.manual_seed(1)  # a different initialisation: everything must come from the checkpoint
    resumed = ToyGAN()
    ema_resumed, record, steps_resumed = _run(tmp_path / "cut", resumed, resume="latest")
    assert record["start_step"] == 10 and steps_resumed.counts == {"generator": 2, "critic": 10}
    assert _equal_states(full.state_dict(), resumed.state_dict())  # generator and critic
    assert _equal_states(ema_full.state_dict(), ema_resumed.state_dict())
    for phase in ("generator", "critic"):
        assert _equal_states(steps_full.optimizers[phase].state_dict(), steps_resumed.optimizers[phase].state_dict()), phase


def test_host_syncs_once_per_optimiser_step_and_once_per_log_step(tmp_path, monkeypatch):
    """Over 10 steps with log_every = 10: one synchronisation for the NaN guard per optimiser step (12: the critic 10,
    the generator 2) and one for all logged terms at the log step; none per micro-batch or per term."""
    calls: list[str] = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith(str(Path("training") / "trainer.py")):
                calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    torch.manual_seed(0)
    _, record, steps = _run(tmp_path / "run", ToyGAN(), steps=10, log_every=10, checkpoint_every=1000, grad_accum=2)
    monkeypatch.undo()
    assert sum(steps.counts.values()) == 12 and len(record["history"]) == 1
    assert len(calls) == 12 + 1, calls


class WithTarget(ToyGAN):
    """A CD / CTM-like target network: follows the generator with decay 0 (a copy after every generator step); its
    ``after_step`` sees the target already moved."""

    def __init__(self):
        super().__init__()
        self.target = ToyGAN().generator.requires_grad_(False)
        self.seen_after_step: list[bool] = []

    def ema_targets(self, phase):
        return (EMATarget(self.target, self.generator, 0.0),) if phase == "generator" else ()

    def after_step(self, phase):
        if phase == "generator":
            self.seen_after_step.append(torch.equal(self.target.weight, self.generator.weight))


def test_declared_ema_targets_follow_their_source(tmp_path):
    torch.manual_seed(0)
    obj = WithTarget()
    _run(tmp_path / "run", obj, steps=6)
    assert _equal_states(obj.target.state_dict(), obj.generator.state_dict())  # moved after the generator's last step
    assert obj.seen_after_step == [True, True]  # generator steps 0 and 5: after_step comes after the target moved
    with pytest.raises(InputError, match="EMA target decay must be in"):
        EMATarget(obj.target, obj.generator, 1.0)


def test_phase_settings_must_name_a_phase(tmp_path):
    cfg = _cfg()
    cfg.phase_optim["critc"] = cfg.phase_optim.pop("critic")
    with pytest.raises(InputError, match="phase_optim names 'critc', but ToyGAN's phases are 'generator', 'critic'"):
        train(ToyGAN(), *_data(), cfg, tmp_path, {}, progress=False)


def test_one_ema_implementation():
    """Weights are averaged only by fastdiff.training.ema (the bench's plain-PyTorch baseline loop excepted)."""
    pattern = re.compile(r"\.lerp_\(|\.mul_\([^)]*decay|_ema_update")
    allowed = {PACKAGE / "training" / "ema.py", PACKAGE / "bench" / "distill.py"}
    offenders = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if p not in allowed and pattern.search(p.read_text())]
    assert not offenders, offenders


def test_the_contract_is_declared():
    """Objective is abstract in what every objective must define; the hooks have no-op defaults."""

    class Incomplete(Objective):
        phases = ("a",)

        def forward(self, batch, phase, step):
            return LossOutput({})

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
    toy = ToyGAN()
    assert toy.ema_targets("critic") == () and toy.after_step("critic") is None
