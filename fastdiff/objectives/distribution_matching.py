"""Distribution-matching distillation: DMD2 (Yin et al., NeurIPS 2024) and f-distill (Xu, Nie & Vahdat 2025).

:class:`DistributionMatching` hosts three networks on any discrete VP diffusers teacher (through the denoiser
contract): the frozen teacher (the *real* score, with classifier-free guidance), a generator ``G`` and a *fake* score,
both initialised from the teacher, plus a GAN classifier head on the fake score's bottleneck (DMD2 sec. 4.3; a
removable hook, :mod:`fastdiff.objectives.critic`). Two phases per step, in the official order
(``main/edm/train_edm.py``, ``main/train_sd.py``):

* ``"generator"`` (``update_every = 5`` in the recipes: the two-time-scale rule, DMD2 sec. 4.2) -- ``x = G(z)``; at
  ``t ~ U{0.02 T .. 0.98 T}`` (``min/max_step_percent``) the distribution-matching loss :func:`dmd_loss` with the
  guided teacher's and the fake score's clean-sample predictions at ``x_t`` (no gradient through ``x_t``), plus
  ``gan_generator_weight * softplus(-D(x noised to t' ~ U{0 .. T-1}))`` with the critic frozen. No regression loss.
* ``"critic"`` (every step) -- the fake score's denoising loss on ``sg(G(z))`` (the teacher's own unweighted loss in
  its own prediction type, as the official SD code's epsilon-MSE for epsilon models) plus
  ``gan_critic_weight * (softplus(D(fake)) + softplus(-D(real)))`` on data images; both noised to ``t' ~ U{0 .. T-1}``
  ("diffusion GAN", ``diffusion_gan_max_timestep = 1000``).

f-distill: ``divergence`` other than ``"reverse_kl"`` weights each sample's gradient by :func:`f_weights` of the
density ratio ``exp(D(x_t))``, read from the same fake-score forward pass that gives ``mu_fake`` (so at the DM loss's
own ``x_t``, as FastGen does; the classifier reads the fake score's features as in DMD2, not the teacher's as
FastGen). ``"reverse_kl"`` skips the classifier there and is DMD2 exactly.

Multi-step generators (``generator_steps = K``, DMD2 sec. 4.4): timesteps ``T-1, T-1-T/K, ...`` (``[999, 749, 499,
249]`` for K = 4, ``LCMScheduler``'s grid with ``original_inference_steps = K``); each sample picks a step ``k`` and
is brought there by *backward simulation*: ``G`` itself, without gradient, from pure noise through the first ``k``
steps (fresh noise at each re-noising, ``sd_unified_model.py`` ``sample_backward``). The student samples with
diffusers' ``LCMScheduler``. Choices of ours, where the official code differs: ``k`` is drawn per sample (officially
once per step, shared by all GPUs), so a run does not depend on how the batch is split; the critic phase draws ``G``'s
samples again without gradient after the generator's update (officially the samples from before it).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fastdiff.errors import InputError, check_choice
from fastdiff.objectives.base import LossOutput, Objective, per_sample_rand, per_sample_randn
from fastdiff.objectives.conditioning import ClassConditioner, condition_kwargs, view
from fastdiff.objectives.critic import ClassifierHead, FeatureTap, bottleneck, probe
from fastdiff.objectives.denoising import denoising_loss, predict_x0, vp_coefficients
from fastdiff.objectives.divergences import F_DIVERGENCES, density_ratio, dmd_gradient, dmd_loss, f_weights
from fastdiff.objectives.divergences import gan_discriminator_loss, gan_generator_loss

__all__ = ["DistributionMatching", "generator_timesteps", "generator_of"]


ROLES = ("teacher", "generator", "fake")


def _with_adapters(base: nn.Module, names: tuple[str, ...], rank: int) -> nn.Module:
    """``base`` with one peft LoRA adapter per name (zero at start: each computes what ``base`` does), injected with
    peft's ``inject_adapter_in_model`` so any diffusers model takes them (``UNet2DModel`` has no ``add_adapter``)."""
    from peft import LoraConfig, inject_adapter_in_model

    from fastdiff.objectives.consistency_distillation import LORA_TARGETS

    targets = [n for n in LORA_TARGETS if any(name.endswith(n) for name, _ in base.named_modules())]
    for name in names:
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
        with warnings.catch_warnings():  # the second adapter is meant: peft warns that one is there already
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(config, base, adapter_name=name)
    for name, p in base.named_parameters():
        p.requires_grad_("lora_" in name)  # every adapter trainable (by its phase), the base frozen
    return base


def _lora_layers(net: nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in net.modules() if isinstance(m, BaseTunerLayer)]


def _activate(net: nn.Module, adapter: str | None) -> None:
    """Make ``adapter`` the active one (``None``: adapters off) without touching ``requires_grad`` (peft's
    ``set_adapter`` makes the active adapter trainable and the others not; which parameters train is the trainer's
    business, per phase)."""
    flags = [(p, p.requires_grad) for p in net.parameters()]
    for layer in _lora_layers(net):
        layer.enable_adapters(adapter is not None)
        if adapter is not None:
            layer.set_adapter(adapter)
    for p, flag in flags:
        p.requires_grad_(flag)


def generator_of(net: nn.Module) -> nn.Module:
    """The trained generator as a plain network from what :meth:`DistributionMatching.export` gave (or its EMA): the
    network itself, or, for the LoRA layout, a copy of the base with the generator's adapter merged into its weights."""
    if not _lora_layers(net):
        return net
    merged = copy.deepcopy(net)
    modules = dict(merged.named_modules())
    for name, layer in [(n, m) for n, m in merged.named_modules() if m in _lora_layers(merged)]:
        layer.merge(adapter_names=["generator"])
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else merged, child, layer.get_base_layer())
    return merged.requires_grad_(False)


def _check_generator(generator: nn.Module | None, teacher: nn.Module, lora: bool) -> None:
    """A starting generator must be the teacher's network (config without ``_name_or_path`` etc.) with other weights."""
    arch = lambda net: (type(net), {k: v for k, v in dict(getattr(net, "config", {})).items() if not k.startswith("_")})  # noqa: E731
    if generator is not None and lora:
        raise InputError("a starting generator needs the three-network layout (its weights are not the base's); drop lora_rank")
    if generator is not None and arch(generator) != arch(teacher):
        raise InputError(f"the starting generator must be the teacher's network with other weights; got a {type(generator).__name__} of another config")


def generator_timesteps(num_train_timesteps: int, steps: int) -> Tensor:
    """The multi-step generator's timesteps ``range(T - 1, 0, -T // K)`` (DMD2's ``denoising_step_list``)."""
    if not 1 <= steps <= num_train_timesteps:
        raise InputError(f"generator_steps must be in 1..{num_train_timesteps}; got {steps}")
    return torch.arange(num_train_timesteps - 1, 0, -(num_train_timesteps // steps))[:steps]


class DistributionMatching(Objective):
    """DMD2 / f-distill from a discrete VP teacher (``schedule``: its :class:`~fastdiff.schedules.VPSchedule`).

    Args:
        teacher: the teacher network (frozen here); the generator and the fake score start as copies of it.
        conditioner: the batch's labels as model arguments (:class:`~fastdiff.objectives.ClassConditioner`,
            :class:`~fastdiff.objectives.TextConditioner`); an ``int``: class labels with that many classes (label
            ``num_classes`` is the null one); ``None``: unconditional.
        guidance_scale: classifier-free guidance of the real score (``real_guidance_scale``; the fake has none).
        generator_steps: ``K`` of the multi-step generator (1: one step from pure noise at ``T - 1``).
        dm_range: the DM loss's timesteps as fractions of ``T`` (``min/max_step_percent``, 0.02 and 0.98).
        divergence: a key of :data:`~fastdiff.objectives.divergences.F_DIVERGENCES` (``reverse_kl``: DMD2).
        gan_generator_weight, gan_critic_weight: the GAN terms' weights (DMD2 ImageNet: 3e-3 and 1e-2; 0 and 0: no
            GAN, then the classifier head is not trained and f-distill's ratio is meaningless).
        lora_rank: the memory-saving layout: no copies; the generator and the fake score are two peft LoRA adapters
            (rank ``lora_rank``) on the one frozen teacher, which is the base with adapters off. The trained generator
            is :func:`generator_of` the exported network.
        gradient_checkpointing: recompute the generator's and the fake score's activations in the backward pass.
        generator: ``G``'s starting network, the teacher's architecture (default: the teacher), e.g. a consistency
            student: DMD2's one-step SD ``G`` starts from a regression-trained one (``train_sd_ode.py``).
    """

    phases = ("generator", "critic")

    def __init__(self, teacher: nn.Module, schedule, prediction_type: str, conditioner: Any, *,
                 guidance_scale: float = 1.0, generator_steps: int = 1, dm_range: tuple[float, float] = (0.02, 0.98),
                 divergence: str = "reverse_kl", gan_generator_weight: float = 3e-3, gan_critic_weight: float = 1e-2,
                 ratio_bins: int = 10, lora_rank: int | None = None, gradient_checkpointing: bool = False,
                 generator: nn.Module | None = None):  # fmt: skip
        super().__init__()
        check_choice("divergence", divergence, tuple(F_DIVERGENCES))
        if divergence != "reverse_kl" and gan_critic_weight <= 0:
            raise InputError(f"divergence={divergence!r} reads the density ratio off the GAN classifier; set gan_critic_weight > 0")
        if conditioner is None and guidance_scale != 1:
            raise InputError("classifier-free guidance needs a conditional teacher; pass a conditioner or guidance_scale=1")
        n = schedule.num_train_timesteps
        lo, hi = int(dm_range[0] * n), int(dm_range[1] * n)
        if not 0 <= lo <= hi < n:
            raise InputError(f"dm_range={dm_range} must give 0 <= min_step <= max_step < {n}; got {lo}..{hi}")
        self.lora = lora_rank is not None
        _check_generator(generator, teacher, self.lora)
        if self.lora:  # one frozen base: the teacher with adapters off, the generator and the fake score as adapters
            self.net = _with_adapters(teacher.requires_grad_(False), ROLES[1:], lora_rank)
        else:
            self.teacher = teacher.requires_grad_(False)
            self.generator = copy.deepcopy(teacher if generator is None else generator).requires_grad_(True)
            self.fake = copy.deepcopy(teacher).requires_grad_(True)
        if gradient_checkpointing:
            for role in ROLES[1:]:
                self._network(role).enable_gradient_checkpointing()
        self.schedule, self.prediction_type = schedule, prediction_type
        self.conditioner = ClassConditioner(conditioner) if isinstance(conditioner, int) else conditioner
        self.guidance_scale, self.dm_steps, self.divergence, self.ratio_bins = guidance_scale, (lo, hi), divergence, ratio_bins
        self.gan_weights = (gan_generator_weight, gan_critic_weight)
        self.register_buffer("timesteps", generator_timesteps(n, generator_steps), persistent=False)
        self._tap = FeatureTap(bottleneck(self._network("fake")))
        self.head = ClassifierHead.for_features(self._probe())

    def _probe(self) -> Tensor:
        net = self._network("teacher")
        c, device = net.config, next(net.parameters()).device
        x = torch.zeros(1, c["in_channels"], c["sample_size"], c["sample_size"], device=device)
        null = torch.zeros(1, dtype=torch.bool, device=device)
        cond = {} if self.conditioner is None else self.conditioner(self.conditioner.probe_labels(1, device), null)
        with self._use("fake") as fake:
            return probe(fake, self._tap, x, torch.zeros(1, dtype=torch.long, device=device), cond)

    def parameters_for(self, phase: str) -> Iterable[nn.Parameter]:
        role = "generator" if phase == "generator" else "fake"
        if self.lora:
            params = [p for name, p in self.net.named_parameters() if "lora_" in name and f".{role}." in name]
        else:
            params = list(self._network(role).parameters())
        return params if role == "generator" else [*params, *self.head.parameters()]

    def export(self) -> nn.Module:
        """The generator (with the LoRA layout: the base with its adapters; :func:`generator_of` makes the student)."""
        return self.net if self.lora else self.generator

    # -- the networks ------------------------------------------------------------------------------------------------

    def _network(self, role: str) -> nn.Module:
        return self.net if self.lora else getattr(self, role)

    @contextlib.contextmanager
    def _use(self, role: str):
        """The network playing ``role``: its own copy, or the shared base with that adapter (the teacher: none) on."""
        net = self._network(role)
        if self.lora:
            _activate(net, None if role == "teacher" else role)
        yield net

    def _x0(self, role: str, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        with self._use(role) as net:
            return predict_x0(net, self.schedule, self.prediction_type, x_t, t, cond)

    def _real_x0(self, x_t: Tensor, t: Tensor, cond: dict, uncond: dict) -> Tensor:
        """The teacher's guided prediction ``D_u + w (D_c - D_u)`` (one batched call of both branches)."""
        if self.guidance_scale == 1:
            return self._x0("teacher", x_t, t, cond)
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        x0_u, x0_c = self._x0("teacher", torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return x0_u + self.guidance_scale * (x0_c - x0_u)

    def _noised(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        alpha, beta = vp_coefficients(self.schedule, t, x0)
        return alpha * x0 + beta * noise

    def logits(self, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        """The classifier's realism logits ``(B, 1)`` of samples ``x_t`` at timesteps ``t`` (fake-score features; the
        fake score runs only up to its bottleneck)."""
        return self.head(self._tap.run_to(lambda: self._x0("fake", x, t, cond)))

    def _gan_logits(self, x: Tensor, cond: dict, seeds: Tensor, stream: int) -> Tensor:
        n = self.schedule.num_train_timesteps
        t = (per_sample_rand(seeds, stream, x.device) * n).long().clamp(max=n - 1)  # diffusion GAN: U{0 .. T-1}
        return self.logits(self._noised(x, t, per_sample_randn(x, seeds, stream + 1)), t, cond)

    def generate(self, batch: dict[str, Tensor], grad: bool = True) -> Tensor:
        """``G``'s clean samples for the batch's seeds and labels: from pure noise, or for a multi-step generator from
        the step each sample drew, reached by backward simulation."""
        x, seeds = batch["x"], batch["seeds"]
        cond = condition_kwargs(self.conditioner, batch, torch.zeros_like(seeds, dtype=torch.bool))
        steps = self.timesteps.to(x.device)
        k = (per_sample_rand(seeds, 20, x.device) * len(steps)).long().clamp(max=len(steps) - 1)
        x_t = per_sample_randn(x, seeds, 21)  # pure noise at T - 1 (DMD2's pure_noise_mask)
        with torch.no_grad():
            for j in range(int(k.max())):  # backward simulation through steps 0 .. k - 1
                t = steps[j].expand(len(x))
                x0 = self._x0("generator", x_t, t, cond)
                renoised = self._noised(x0, steps[j + 1].expand(len(x)), per_sample_randn(x, seeds, 30 + j))
                x_t = torch.where(view(k > j, x).bool(), renoised, x_t)
        with contextlib.nullcontext() if grad else torch.no_grad():
            return self._x0("generator", x_t, steps[k], cond).float()

    # -- the phases --------------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor], phase: str, step: int) -> LossOutput:
        return self._generator_loss(batch) if phase == "generator" else self._critic_loss(batch)

    def _conditions(self, batch: dict[str, Tensor]) -> tuple[dict, dict]:
        seeds = batch["seeds"]
        cond = condition_kwargs(self.conditioner, batch, torch.zeros_like(seeds, dtype=torch.bool))
        uncond = condition_kwargs(self.conditioner, batch, torch.ones_like(seeds, dtype=torch.bool))
        return cond, uncond

    def _generator_loss(self, batch: dict[str, Tensor]) -> LossOutput:
        seeds = batch["seeds"]
        cond, uncond = self._conditions(batch)
        x = self.generate(batch)
        lo, hi = self.dm_steps
        t = lo + (per_sample_rand(seeds, 10, x.device) * (hi - lo + 1)).long().clamp(max=hi - lo)
        weights = None
        with torch.no_grad():
            x_t = self._noised(x.detach(), t, per_sample_randn(x, seeds, 11))
            mu_real = self._real_x0(x_t, t, cond, uncond)
            mu_fake = self._x0("fake", x_t, t, cond)
            features = self._tap.take()
            if self.divergence != "reverse_kl":
                ratio = density_ratio(self.head(features))
                weights = f_weights(self.divergence, ratio, t, (lo, hi), self.ratio_bins)
        grad = dmd_gradient(x, mu_real, mu_fake)
        terms = {"distribution_matching": dmd_loss(x, grad, weights)}
        logs = {"grad_norm": grad.detach().flatten(1).norm(dim=1).mean()}
        if weights is not None:
            logs.update(h_min=weights.min(), h_max=weights.max())
        if self.gan_weights[0] > 0:
            terms["gan"] = self._through_sample(x, self.gan_weights[0] * gan_generator_loss(self._gan_logits(x, cond, seeds, 12)))
        with self._use("generator"):  # the backward pass recomputes checkpointed generator blocks with this adapter on
            return LossOutput(terms, logs)

    @staticmethod
    def _through_sample(x: Tensor, loss: Tensor) -> Tensor:
        """``loss`` (a function of the generator's sample ``x`` through the critic) as a term whose gradient reaches the
        generator only through ``x``: ``dloss/dx`` is taken now, while the critic's adapter is on, so that a backward
        pass through checkpointed blocks of a shared base never recomputes them with another adapter. Same value,
        same gradient."""
        (grad_x,) = torch.autograd.grad(loss, x)
        surrogate = (x * grad_x).sum()
        return surrogate - surrogate.detach() + loss.detach()

    def _critic_loss(self, batch: dict[str, Tensor]) -> LossOutput:
        seeds, n = batch["seeds"], self.schedule.num_train_timesteps
        cond, _ = self._conditions(batch)
        fake = self.generate(batch, grad=False)
        t = (per_sample_rand(seeds, 13, fake.device) * n).long().clamp(max=n - 1)  # U{0 .. T-1}
        noise = per_sample_randn(fake, seeds, 14)
        with self._use("fake") as net:
            terms = {"fake_denoising": denoising_loss(net, self.schedule, fake, t, noise, cond, self.prediction_type)}
        self._tap.take()
        logs = {}
        if self.gan_weights[1] > 0:
            logits_fake = self._gan_logits(fake, cond, seeds, 15)
            logits_real = self._gan_logits(batch["x"], cond, seeds, 17)
            terms["gan"] = self.gan_weights[1] * gan_discriminator_loss(logits_fake, logits_real)
            logs.update(p_real=torch.sigmoid(logits_real.detach()).mean(), p_fake=torch.sigmoid(logits_fake.detach()).mean())
        return LossOutput(terms, logs)
