"""Consistency distillation from a teacher.

:class:`ConsistencyDistillation`: CD / LCM (Luo et al. 2023) from a discrete-time (VP) teacher users already have:
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
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastdiff.errors import InputError
from fastdiff.objectives.base import EMATarget, LossOutput, Objective, per_sample_rand, per_sample_randn
from fastdiff.objectives.conditioning import ClassConditioner, check_unconditional, condition_kwargs, dropout_mask, view
from fastdiff.objectives.denoising import predict_x0, vp_coefficients
from fastdiff.objectives.losses import distance
from fastdiff.param import lcm_scalings

__all__ = ["ConsistencyDistillation", "LORA_TARGETS", "guidance_embedding", "with_guidance_embedding"]


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
        teacher_eta, teacher_substeps: the teacher's step from ``t`` to ``t - k`` as ``teacher_substeps`` DDIM steps
            with noise ``eta`` (SCott's stochastic teacher, :mod:`fastdiff.objectives.stochastic_consistency`); 0 and 1
            are LCM's single deterministic DDIM step exactly.
    """

    phases = ("student",)

    def __init__(self, teacher: nn.Module, schedule, prediction_type: str, conditioner: Any, *,
                 num_ddim_timesteps: int = 50, guidance_scale: float = 1.0, guidance_max: float | None = None,
                 target_ema: float = 0.95, loss: str = "l2", huber_c: float = 0.001, timestep_scaling: float = 10.0,
                 p_uncond: float = 0.0, lora_rank: int | None = None, guidance_embedding: int | None = None,
                 teacher_eta: float = 0.0, teacher_substeps: int = 1):  # fmt: skip
        super().__init__()
        if loss not in ("l2", "pseudo_huber", "pseudo_huber_elementwise"):
            raise InputError(f"distillation loss must be 'l2', 'pseudo_huber' or 'pseudo_huber_elementwise'; got {loss!r}")
        if conditioner is None and (guidance_scale != 1 or (guidance_max or 1) != 1):
            raise InputError("classifier-free guidance needs a conditional teacher; pass a conditioner or guidance_scale=1")
        check_unconditional(conditioner is not None, p_uncond)
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
        if not 0 <= teacher_eta <= 1 or not 1 <= teacher_substeps <= self.k:
            raise InputError(f"teacher_eta must be in [0, 1] and teacher_substeps in 1..{self.k} (the skip); got {teacher_eta}, {teacher_substeps}")
        self.teacher_eta, self.teacher_substeps = teacher_eta, teacher_substeps

    def parameters_for(self, phase: str) -> Iterable[nn.Parameter]:
        return (p for p in self.net.parameters() if p.requires_grad)

    def export(self) -> nn.Module:
        return self.net

    def _x0(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: dict) -> tuple[Tensor, Tensor, Tensor]:
        alpha, beta = vp_coefficients(self.schedule, t, x_t)
        return predict_x0(model, self.schedule, self.prediction_type, x_t, t, cond), alpha, beta

    def consistency_fn(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: dict) -> Tensor:
        """LCM's ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t)`` (the form ``LCMScheduler.step`` applies)."""
        x0, _, _ = self._x0(model, x_t, t, cond)
        c = lcm_scalings(t.to(x_t.dtype), self.timestep_scaling)
        return view(c.c_skip, x_t) * x_t + view(c.c_out, x_t) * x0

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
    def teacher_solve(self, x_t: Tensor, t: Tensor, t_prev: Tensor, cond: dict, uncond: dict, w: Tensor, seeds: Tensor) -> Tensor:
        """The guided teacher from ``t`` to ``t_prev`` in ``teacher_substeps`` DDIM(eta) steps at rounded, evenly spaced
        timesteps; sub-step ``j``'s noise comes from stream ``10 + j`` of each sample's seed."""
        h, x = self.teacher_substeps, x_t
        for j in range(h):
            s, s_next = (t - ((t - t_prev) * j / h).round().long()), (t - ((t - t_prev) * (j + 1) / h).round().long())
            noise = per_sample_randn(x, seeds, 10 + j) if self.teacher_eta > 0 else None
            x = self._teacher_ddim(x, s, s_next, cond, uncond, w, noise)
        return x

    @torch.no_grad()
    def _teacher_ddim(self, x_t: Tensor, t: Tensor, t_prev: Tensor, cond: dict, uncond: dict, w: Tensor, noise: Tensor | None = None) -> Tensor:
        """One DDIM step of the guided teacher from ``t`` to ``t_prev`` (``t_prev = -1``: to the clean sample); with
        ``noise``, DDIM with ``eta`` (Song et al. 2021, eq. 12 and 16; diffusers' ``DDIMScheduler.step``):
        ``sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar')``, ``x' = sqrt(abar') x0 +
        sqrt(1 - abar' - sigma^2) eps + sigma z``."""
        with self._teacher() as teacher:
            if bool((w != 1).any()):
                both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
                x0_2, alpha, beta = self._x0(teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), both)
                x0_u, x0_c = x0_2.chunk(2)
                x0, alpha, beta = x0_u + view(w, x_t) * (x0_c - x0_u), alpha.chunk(2)[0], beta.chunk(2)[0]
            else:
                x0, alpha, beta = self._x0(teacher, x_t, t, cond)
        eps = (x_t - alpha * x0) / beta
        abar = self.schedule.alphas_cumprod.to(x_t.device, x_t.dtype)[t_prev.clamp(min=0)]  # cast first: no float64 on MPS
        abar_prev = view(torch.where(t_prev >= 0, abar, torch.ones_like(abar)), x_t)
        if noise is None:
            return abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
        abar_t = alpha**2
        sigma = self.teacher_eta * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).clamp(min=0).sqrt()
        return abar_prev.sqrt() * x0 + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps + sigma * noise

    def forward(self, batch: dict[str, Tensor], phase: str, step: int) -> LossOutput:
        loss, student, t, w, _ = self.consistency(batch)
        return LossOutput({"distillation": loss.mean()}, {"mean_t": float(t.float().mean()), "mean_w": float(w.mean())})

    def draw(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, dict, dict]:
        """A batch's ``x_t``, ``t``, ``t_prev``, ``w``, condition and null condition (every draw from the sample seeds)."""
        x, seeds = batch["x"], batch["seeds"]
        # Label dropout: the teacher, the student and the target all see the dropped sample's null condition, so its
        # guided teacher D_u + w (D_c - D_u) is the unconditional teacher D_u. diffusers' LCM scripts drop captions
        # the same way (--proportion_empty_prompts turns the caption into "" before it is encoded, for all three;
        # their uncond branch is "" too), though they pass proportion_empty_prompts=0, i.e. never drop.
        dropped = dropout_mask(seeds, self.p_uncond)
        cond = condition_kwargs(self.conditioner, batch, dropped)
        uncond = condition_kwargs(self.conditioner, batch, torch.ones_like(dropped))
        n_ddim = self.schedule.num_train_timesteps // self.k
        j = (per_sample_rand(seeds, 0, x.device) * n_ddim).long().clamp(max=n_ddim - 1) + 1  # 1..n_ddim
        t = j * self.k - 1  # 19, 39, ..., 999
        t_prev = t - self.k  # -1 for the first jump: to the clean sample
        lo, hi = self.guidance
        w = (lo + (hi - lo) * per_sample_rand(seeds, 3, x.device)).to(x.dtype)
        noise = per_sample_randn(x, seeds, 1)
        abar = view(self.schedule.alphas_cumprod.to(x.device)[t].to(x.dtype), x)
        x_t = abar.sqrt() * x + (1 - abar).sqrt() * noise
        return x_t, t, t_prev, w, cond, uncond

    def consistency(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, dict]:
        """The per-sample consistency loss, the student's ``f_theta(x_t, t)``, ``t``, ``w`` and the student's condition."""
        x, seeds = batch["x"], batch["seeds"]
        x_t, t, t_prev, w, cond, uncond = self.draw(batch)
        x_prev = self.teacher_solve(x_t, t, t_prev, cond, uncond, w, seeds)
        cond = self.student_cond(cond, w, x)
        student = self.consistency_fn(self.net, x_t, t, cond)
        with torch.no_grad():  # the target f_theta-(x_prev, t_prev): EMA copy, or (LCM-LoRA) the student itself
            target_net = self.target if getattr(self, "target", None) is not None else self.net
            target = self.consistency_fn(target_net, x_prev, t_prev.clamp(min=0), cond)
            target = torch.where(view(t_prev < 0, x).bool(), x_prev, target)  # f(x, 0) = x: the boundary, exactly
        return distance(self.loss_kind, student, target, self.huber_c), student, t, w, cond

    def student_cond(self, cond: dict, w: Tensor, like: Tensor) -> dict:
        """The student's (and target's) condition: the teacher's, plus the guidance embedding of ``w`` if it has one."""
        if not self.embed_dim:
            return cond
        return {**cond, "timestep_cond": guidance_embedding(w - 1, self.embed_dim).to(like.dtype)}

    def ema_targets(self, phase: str) -> Sequence[EMATarget]:
        """LCM's EMA target follows the student (none for LCM-LoRA or ``target_ema=0``: the student itself)."""
        target = getattr(self, "target", None)
        return () if target is None else (EMATarget(target, self.net, self.target_ema),)
