"""Consistency training and distillation.

* :class:`ConsistencyTraining` -- iCT (Song & Dhariwal, ICLR 2024) and, with its switches, iLCT / sLCT (Dao et al.,
  ICLR 2025): the network is its own stop-gradient teacher (no EMA target), adjacent levels of a Karras grid whose
  size doubles (10 -> 1280), discretised lognormal level sampling, weighting ``1 / (sigma_{i+1} - sigma_i)``,
  pseudo-Huber on the whole-sample norm (iCT) or Cauchy with the adaptive ``c(N)`` (iLCT), a diffusion loss on the
  lowest-noise quarter, minibatch optimal-transport pairing of noise and data, dropout masks shared by both passes.
  The student is ``f(x, sigma) = c_skip x + c_out F(c_in x, 250 ln sigma)`` with ``f(x, sigma_min) = x`` exactly --
  the convention of diffusers' ``CMStochasticIterativeScheduler``, which therefore samples the saved students.
* :class:`ConsistencyDistillation` -- CD / LCM (Luo et al. 2023) from a discrete-time (VP) teacher users already have:
  the student starts as a copy of the teacher, keeps its input and output convention and adds LCM's boundary
  scalings, so diffusers' ``LCMScheduler`` samples it; the target is one DDIM step of the (guided) teacher on the
  ``k``-skipped grid, evaluated by an EMA copy of the student.

Both are class-conditional with label dropout (the null label or prompt, seen by every pass of a dropped sample),
or, built without classes, unconditional: the network then gets no labels.

Grids here are ascending: index 0 is ``sigma_min`` (the reference notes' index-direction trap).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from fastdiff.denoisers import call_model, consistency_precond
from fastdiff.errors import InputError
from fastdiff.objectives.base import LossOutput, Objective, per_sample_rand, per_sample_randn
from fastdiff.objectives.losses import distance, ict_huber_c, weighted_denoising_mse
from fastdiff.param import lcm_scalings, x0_from_output

__all__ = [
    "karras_levels", "ict_num_levels", "lognormal_level_probs", "lct_cauchy_c", "lct_diffusion_mask", "ot_pairing",
    "ConsistencyTraining", "ConsistencyDistillation", "ClassConditioner", "TextConditioner", "non_scaling_layernorm",
    "guidance_embedding", "with_guidance_embedding",
]  # fmt: skip


def karras_levels(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """``n`` noise levels of the Karras grid, **ascending** (index 0 = sigma_min), float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def ict_num_levels(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's doubling curriculum (sec. 3.4): ``N(k) = min(s0 2^floor(k / K'), s1) + 1``,
    ``K' = floor(K / (log2 floor(s1 / s0) + 1))`` -- 11, 21, 41, ..., 1281 levels."""
    stage_len = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (step // stage_len), s1) + 1


def lognormal_level_probs(levels: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """iCT's discretised lognormal over the pairs ``(i, i + 1)`` of an ascending grid (eq. 11):
    ``p(i) ~ erf((ln s_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_i - P_mean) / (sqrt 2 P_std))``."""
    cdf = torch.erf((levels.log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


def lct_cauchy_c(num_levels: int, dim: int, s0: int = 10) -> float:
    """iLCT's adaptive Cauchy scale for samples of ``dim`` numbers: iCT's ``0.00054 sqrt(dim)`` on the first stage
    (LCT ``train_cm_latent.py`` L198; 0.0346 only for its 4x32x32 latents), then ``exp(-1.15 ln(N - 1) - 0.85)``
    once ``N > s0 + 1`` (L351-352)."""
    return ict_huber_c(dim) if num_levels <= s0 + 1 else math.exp(-1.15 * math.log(num_levels - 1) - 0.85)


def lct_diffusion_mask(i: Tensor, num_levels: int) -> Tensor:
    """iLCT's diffusion-loss subset: the pairs ``i`` (student at level ``i + 1`` of the ascending grid) whose student
    level is in the lowest-noise quarter, ``i <= N - 2 - int(0.75 N)`` (N = 11: i <= 1; 21: i <= 4; 81: i <= 19)."""
    # LCT (models/karras_diffusion.py L200) keeps `indices >= int(0.75 N)`, `indices` being the student's index m on
    # its grid indexed from sigma_max (student at m, target at m + 1). Ascending level i + 1 is LCT's m = N - 2 - i.
    return (num_levels - 2 - i) >= int(0.75 * num_levels)


def _selected_mean(values: Tensor, selected: Tensor) -> Tensor:
    """Mean of ``values`` over the ``selected`` samples; 0 (with a gradient graph) when none is selected."""
    # LCT averages over the selected samples only (`losses["diff_loss"].mean()`, train_cm_latent.py L373, of the
    # already-masked `diff_loss`, karras_diffusion.py L234). For an empty selection that mean is NaN and LCT's loop
    # skips the step and exits (L383-397); LCT is silent on a better choice -- here such a batch trains on the
    # consistency term alone. The mean is per micro-batch (as LCT's is per GPU).
    return torch.where(selected, values, torch.zeros_like(values)).sum() / selected.sum().clamp(min=1)


def ot_pairing(x: Tensor, noise: Tensor) -> Tensor:
    """Minibatch optimal transport (iLCT): the permutation of ``noise`` minimising ``sum ||x_i - noise_pi(i)||^2``."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x.flatten(1).double(), noise.flatten(1).double()).pow(2)
    _, cols = linear_sum_assignment(cost.cpu().numpy())
    return noise[torch.as_tensor(cols, device=noise.device)]


def non_scaling_layernorm(model: nn.Module) -> int:
    """iLCT's non-scaling LayerNorm: fix every affine LayerNorm's scale to 1 (bias stays trainable). Returns how many
    LayerNorms were changed (0 for models whose norms have no affine scale, like diffusers' DiT with adaLN-Zero)."""
    changed = 0
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.fill_(1.0)
            m.weight.requires_grad_(False)
            changed += 1
    return changed


@contextlib.contextmanager
def _same_dropout(seed: int, device: torch.device):
    """Run a block with the global RNG (CPU and, when used, the accelerator) seeded by ``seed``, restoring it after:
    both branches of a consistency loss then draw the same dropout masks."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _dropped(seeds: Tensor, p_uncond: float) -> Tensor:
    """Which samples lose their condition (label dropout with probability ``p_uncond``; stream 2 of each seed)."""
    return per_sample_rand(seeds, 2, seeds.device) < p_uncond


def _condition(conditioner: Any, batch: dict[str, Tensor], null: Tensor) -> dict[str, Tensor]:
    """The model's keyword arguments for ``batch`` (none for an unconditional objective); ``null`` marks the samples
    that get the null condition."""
    if conditioner is None:
        return {}
    if "labels" not in batch:
        raise InputError("this objective is conditional, so the batch needs 'labels'; build it without classes "
                         "(num_classes=None / conditioner=None) for unconditional training")  # fmt: skip
    return conditioner(batch["labels"], null)


def _check_unconditional(conditional: bool, p_uncond: float) -> None:
    if not conditional and p_uncond > 0:
        raise InputError(f"p_uncond={p_uncond} drops labels, but this objective is unconditional; set p_uncond=0")


def _view(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class ConsistencyTraining(Objective):
    """iCT (``loss="pseudo_huber"``) and iLCT (``loss="cauchy"``, ``diffusion_weight=5``, ``ot=True``) from data.

    Args:
        net: the raw network ``F`` (a diffusers model), conditioned on ``250 ln sigma``.
        num_classes: real classes; label ``num_classes`` is the null label (dropped with ``p_uncond``). ``None``:
            unconditional -- ``net`` gets no labels and the batch needs none (iCT's CIFAR-10 results).
        total_steps: training steps, for the curriculum.
        huber_c: pseudo-Huber ``c``; ``None`` = ``0.00054 sqrt(d)``. For Cauchy, ``None`` = the adaptive ``c(N)``.
        diffusion_weight: iLCT's diffusion loss weight (5), on the samples whose student level is in the
            lowest-noise quarter (:func:`lct_diffusion_mask`), averaged over those samples.
    """

    phases = ("student",)

    def __init__(self, net: nn.Module, num_classes: int | None, total_steps: int, *, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, sigma_data: float = 0.5, rho: float = 7.0, p_mean: float = -1.1,
                 p_std: float = 2.0, s0: int = 10, s1: int = 1280, loss: str = "pseudo_huber", huber_c: float | None = None,
                 diffusion_weight: float = 0.0, ot: bool = False, p_uncond: float = 0.1):  # fmt: skip
        super().__init__()
        if loss not in ("pseudo_huber", "cauchy"):
            raise InputError(f"consistency loss must be 'pseudo_huber' or 'cauchy'; got {loss!r}")
        _check_unconditional(num_classes is not None, p_uncond)
        self.student = consistency_precond(net, sigma_min, sigma_data, noise_scale=1000.0)  # registers net once
        self.conditioner = ClassConditioner(num_classes) if num_classes is not None else None
        self.num_classes, self.total_steps, self.loss_kind = num_classes, total_steps, loss
        self.grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        self.p_mean, self.p_std, self.s0, self.s1 = p_mean, p_std, s0, s1
        self.sigma_data, self.huber_c, self.diffusion_weight, self.ot, self.p_uncond = sigma_data, huber_c, diffusion_weight, ot, p_uncond

    @property
    def net(self) -> nn.Module:
        return self.student.net

    def parameters_for(self, phase: str) -> Iterable[nn.Parameter]:
        return (p for p in self.net.parameters() if p.requires_grad)

    def export(self) -> nn.Module:
        return self.net

    def levels(self, step: int) -> Tensor:
        return karras_levels(ict_num_levels(step, self.total_steps, self.s0, self.s1), **self.grid)

    def scale_c(self, num_levels: int, dim: int) -> float:
        """The robust loss's ``c`` for samples of ``dim`` numbers on a grid of ``num_levels``."""
        if self.huber_c is not None:
            return self.huber_c
        return ict_huber_c(dim) if self.loss_kind == "pseudo_huber" else lct_cauchy_c(num_levels, dim, self.s0)

    def forward(self, batch: dict[str, Tensor], phase: str, step: int) -> LossOutput:
        x, seeds = batch["x"], batch["seeds"]
        levels = self.levels(step).to(x.device)
        n = len(levels)
        probs = lognormal_level_probs(levels, self.p_mean, self.p_std)
        u = per_sample_rand(seeds, 0, x.device)
        i = torch.searchsorted(probs.cumsum(0), u.to(probs.dtype), right=True).clamp(max=n - 2)
        z = per_sample_randn(x, seeds, 1)
        if self.ot:
            z = ot_pairing(x, z)
        cond = _condition(self.conditioner, batch, _dropped(seeds, self.p_uncond))
        sigma, sigma_next = levels[i], levels[i + 1]
        dropout_seed = int(seeds[0]) % (2**62)
        with _same_dropout(dropout_seed, x.device):
            student = self.student(x + _view(sigma_next, x) * z, sigma_next.to(x.dtype), **cond)
        with _same_dropout(dropout_seed, x.device), torch.no_grad():  # iCT: the target is sg(f_theta), EMA rate 0
            target = self.student(x + _view(sigma, x) * z, sigma.to(x.dtype), **cond)
        weight = (1 / (sigma_next - sigma)).to(torch.float32)
        c = self.scale_c(n, x[0].numel())
        terms = {"consistency": (weight * distance(self.loss_kind, student, target, c)).mean()}
        if self.diffusion_weight > 0:  # L = mean(L_CM) + 5 mean(L_diff over the selected samples), LCT L370-378
            per_sample = weighted_denoising_mse(student.float(), x.float(), sigma_next.float(), self.sigma_data)
            terms["diffusion"] = self.diffusion_weight * _selected_mean(per_sample, lct_diffusion_mask(i, n))
        return LossOutput(terms, {"num_levels": n, "c": c, "mean_sigma": float(sigma_next.mean())})


class ClassConditioner:
    """Class labels as the model's ``class_labels``; label ``num_classes`` is the null (unconditional) one."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def __call__(self, labels: Tensor, null: Tensor) -> dict[str, Tensor]:
        return {"class_labels": torch.where(null, torch.full_like(labels, self.num_classes), labels)}


class TextConditioner(nn.Module):
    """Text conditioning for UNet2DConditionModel students: ``labels`` index a table of prompt embeddings (one per
    caption, computed once); the null prompt's embedding stands in where a label is dropped."""

    def __init__(self, prompt_embeds: Tensor, null_embed: Tensor):
        super().__init__()
        self.register_buffer("table", prompt_embeds, persistent=False)
        self.register_buffer("null_embed", null_embed.reshape(1, *prompt_embeds.shape[1:]), persistent=False)

    def __call__(self, labels: Tensor, null: Tensor) -> dict[str, Tensor]:
        embeds = self.table[labels]
        return {"encoder_hidden_states": torch.where(_view(null, embeds).bool(), self.null_embed.to(embeds.dtype), embeds)}


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """LCM's Fourier embedding of the guidance scale (VDM-style, of ``1000 w``), what
    ``LatentConsistencyModelPipeline`` feeds as ``timestep_cond`` with ``w = guidance_scale - 1``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    angles = 1000.0 * w.float()[:, None] * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def with_guidance_embedding(unet: nn.Module, dim: int = 256) -> nn.Module:
    """A copy of a ``UNet2DConditionModel`` with LCM's guidance-embedding input (``time_cond_proj_dim``); the new
    projection starts at zero, so the copy computes exactly what ``unet`` does until it is trained."""
    new = type(unet).from_config({**unet.config, "time_cond_proj_dim": dim})
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in k for k in missing):
        raise InputError(f"cannot add a guidance embedding to {type(unet).__name__}: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(new.time_embedding.cond_proj.weight)
    return new


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]  # fmt: skip


class ConsistencyDistillation(Objective):
    """Consistency distillation (CD with a DDIM teacher step, LCM-style) from a discrete-time teacher.

    Args:
        teacher: the teacher's network; ``schedule`` its :class:`~fastdiff.schedules.VPSchedule` and
            ``prediction_type`` its output.
        conditioner: turns the batch's labels into model keyword arguments (:class:`ClassConditioner`,
            :class:`TextConditioner`); an ``int`` means class labels with that many classes; ``None``: an
            unconditional teacher (no labels, no guidance, no label dropout).
        num_ddim_timesteps: the skipping grid (LCM: 50 -> k = 20 training timesteps per jump).
        guidance_scale: the teacher's classifier-free guidance ``w`` (``D_u + w (D_c - D_u)``, 1 = none); with
            ``guidance_max``, ``w`` is drawn per sample from ``U[guidance_scale, guidance_max]`` (LCM's ``w + 1``).
        target_ema: decay of the target network (LCM: 0.95; 0 = the student itself under stop-gradient).
        loss: ``"l2"`` (per-element mean of squares; the default of diffusers' LCM scripts),
            ``"pseudo_huber_elementwise"`` (their ``--loss_type huber``, ``c = huber_c``) or ``"pseudo_huber"``
            (iCT's whole-sample norm); see :mod:`fastdiff.objectives.losses`.
        p_uncond: label dropout; a dropped sample is unconditional for the teacher, the student and the target.
        lora_rank: train a LoRA adapter (peft) on the teacher instead of a full copy (LCM-LoRA): the teacher is the
            same network with the adapter disabled, the target the student under stop-gradient.
        guidance_embedding: give the (full) student LCM's guidance-scale embedding of dimension
            ``guidance_embedding`` (``UNet2DConditionModel`` only), conditioned on the ``w`` the teacher used.
    """

    phases = ("student",)

    def __init__(self, teacher: nn.Module, schedule, prediction_type: str, conditioner: Any, *,
                 num_ddim_timesteps: int = 50, guidance_scale: float = 1.0, guidance_max: float | None = None,
                 target_ema: float = 0.95, loss: str = "l2", huber_c: float = 0.001, timestep_scaling: float = 10.0,
                 p_uncond: float = 0.0, lora_rank: int | None = None, guidance_embedding: int | None = None):  # fmt: skip
        super().__init__()
        if loss not in ("l2", "pseudo_huber", "pseudo_huber_elementwise"):
            raise InputError(f"distillation loss must be 'l2', 'pseudo_huber' or 'pseudo_huber_elementwise'; got {loss!r}")
        if conditioner is None and (guidance_scale != 1 or (guidance_max or 1) != 1):
            raise InputError("classifier-free guidance needs a conditional teacher; pass a conditioner or guidance_scale=1")
        _check_unconditional(conditioner is not None, p_uncond)
        if schedule.num_train_timesteps % num_ddim_timesteps:
            raise InputError(f"num_ddim_timesteps={num_ddim_timesteps} must divide the teacher's {schedule.num_train_timesteps} timesteps")
        self.conditioner = ClassConditioner(conditioner) if isinstance(conditioner, int) else conditioner
        self.lora = lora_rank is not None
        if self.lora:
            from peft import LoraConfig

            teacher.requires_grad_(False)
            targets = [n for n in LORA_TARGETS if any(name.endswith(n) for name, _ in teacher.named_modules())]
            teacher.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian", target_modules=targets))
            self.net = teacher  # one network: adapters on = student and target, off = teacher
        else:
            self.teacher = teacher.requires_grad_(False)
            student = with_guidance_embedding(teacher, guidance_embedding) if guidance_embedding else copy.deepcopy(teacher)
            self.net = student.requires_grad_(True)
            self.target = copy.deepcopy(self.net).requires_grad_(False) if target_ema > 0 else None
        if guidance_embedding and self.lora:
            raise InputError("LCM-LoRA has no guidance embedding (the adapter must load into the base UNet); use lora_rank or guidance_embedding")
        self.embed_dim = guidance_embedding
        self.schedule, self.prediction_type = schedule, prediction_type
        self.k = schedule.num_train_timesteps // num_ddim_timesteps
        self.guidance = (guidance_scale, guidance_max if guidance_max is not None else guidance_scale)
        self.target_ema, self.loss_kind, self.huber_c = target_ema, loss, huber_c
        self.timestep_scaling, self.p_uncond = timestep_scaling, p_uncond

    def parameters_for(self, phase: str) -> Iterable[nn.Parameter]:
        return (p for p in self.net.parameters() if p.requires_grad)

    def export(self) -> nn.Module:
        return self.net

    def _x0(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: dict) -> tuple[Tensor, Tensor, Tensor]:
        abar = self.schedule.alphas_cumprod.to(x_t.device)[t].to(x_t.dtype)
        alpha, beta = _view(abar.sqrt(), x_t), _view((1 - abar).sqrt(), x_t)
        return x0_from_output(call_model(model, x_t, t, cond), x_t, alpha, beta, self.prediction_type), alpha, beta

    def consistency_fn(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        """LCM's ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t)`` (the form ``LCMScheduler.step`` applies)."""
        x0, _, _ = self._x0(model, x_t, t, cond)
        c = lcm_scalings(t.to(x_t.dtype), self.timestep_scaling)
        return _view(c.c_skip, x_t) * x_t + _view(c.c_out, x_t) * x0

    @contextlib.contextmanager
    def _teacher(self):
        """The teacher network (LoRA: the student with its adapter switched off)."""
        if not self.lora:
            yield self.teacher
            return
        self.net.disable_adapters()
        try:
            yield self.net
        finally:
            self.net.enable_adapters()

    @torch.no_grad()
    def _teacher_ddim(self, x_t: Tensor, t: Tensor, t_prev: Tensor, cond: dict, uncond: dict, w: Tensor) -> Tensor:
        """One DDIM step of the guided teacher from ``t`` to ``t_prev`` (``t_prev = -1``: to the clean sample)."""
        with self._teacher() as teacher:
            if bool((w != 1).any()):
                both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
                x0_2, alpha, beta = self._x0(teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), both)
                x0_u, x0_c = x0_2.chunk(2)
                x0, alpha, beta = x0_u + _view(w, x_t) * (x0_c - x0_u), alpha.chunk(2)[0], beta.chunk(2)[0]
            else:
                x0, alpha, beta = self._x0(teacher, x_t, t, cond)
        eps = (x_t - alpha * x0) / beta
        abar_prev = torch.where(t_prev >= 0, self.schedule.alphas_cumprod.to(x_t.device)[t_prev.clamp(min=0)], torch.ones_like(t_prev, dtype=torch.float64))
        abar_prev = _view(abar_prev.to(x_t.dtype), x_t)
        return abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps

    def forward(self, batch: dict[str, Tensor], phase: str, step: int) -> LossOutput:
        x, seeds = batch["x"], batch["seeds"]
        # Label dropout: the teacher, the student and the target all see the dropped sample's null condition, so its
        # guided teacher D_u + w (D_c - D_u) is the unconditional teacher D_u. diffusers' LCM scripts drop captions
        # the same way (--proportion_empty_prompts turns the caption into "" before it is encoded, for all three;
        # their uncond branch is "" too), though they pass proportion_empty_prompts=0, i.e. never drop.
        dropped = _dropped(seeds, self.p_uncond)
        cond = _condition(self.conditioner, batch, dropped)
        uncond = _condition(self.conditioner, batch, torch.ones_like(dropped))
        n_ddim = self.schedule.num_train_timesteps // self.k
        j = (per_sample_rand(seeds, 0, x.device) * n_ddim).long().clamp(max=n_ddim - 1) + 1  # 1..n_ddim
        t = j * self.k - 1  # 19, 39, ..., 999
        t_prev = t - self.k  # -1 for the first jump: to the clean sample
        lo, hi = self.guidance
        w = (lo + (hi - lo) * per_sample_rand(seeds, 3, x.device)).to(x.dtype)
        noise = per_sample_randn(x, seeds, 1)
        abar = _view(self.schedule.alphas_cumprod.to(x.device)[t].to(x.dtype), x)
        x_t = abar.sqrt() * x + (1 - abar).sqrt() * noise
        x_prev = self._teacher_ddim(x_t, t, t_prev, cond, uncond, w)
        if self.embed_dim:
            cond = {**cond, "timestep_cond": guidance_embedding(w - 1, self.embed_dim).to(x.dtype)}
        student = self.consistency_fn(self.net, x_t, t, cond)
        with torch.no_grad():  # the target f_theta-(x_prev, t_prev): EMA copy, or (LCM-LoRA) the student itself
            target_net = self.target if getattr(self, "target", None) is not None else self.net
            target = self.consistency_fn(target_net, x_prev, t_prev.clamp(min=0), cond)
            target = torch.where(_view(t_prev < 0, x).bool(), x_prev, target)  # f(x, 0) = x: the boundary, exactly
        loss = distance(self.loss_kind, student, target, self.huber_c).mean()
        return LossOutput({"distillation": loss}, {"mean_t": float(t.float().mean()), "mean_w": float(w.mean())})

    @torch.no_grad()
    def after_step(self, phase: str) -> None:
        """Move the target towards the student (LCM's EMA target)."""
        if getattr(self, "target", None) is None:
            return
        for e, p in zip(self.target.parameters(), self.net.parameters()):
            e.lerp_(p.detach(), 1 - self.target_ema)
