"""fastdiff's samplers as drop-in diffusers schedulers.

``pipe.scheduler = GHVBScheduler.from_config(pipe.scheduler.config)`` swaps a fastdiff solver into any pipeline that
drives a scheduler (discrete VP models with epsilon / v / sample prediction, and flow-matching models). The schedulers
hold no step rule of their own: each ``step`` converts the model output to the x0 estimate at the current sigma
(:mod:`fastdiff.param`), moves to sigma space, and hands it to what the functional sampler uses -- a multistep rule
(:mod:`fastdiff.samplers.momentum`, :mod:`fastdiff.samplers.ode`) or a PNDM program (:mod:`fastdiff.samplers.pndm`),
keyed on ``step_index``, never on a call counter. The grid, the noising and the rest of the contract live in
:class:`SigmaGridScheduler`.

Grids are diffusers' own (:func:`~fastdiff.samplers.grids.grid_from_config`): the same ``timesteps`` as
FlowMatchEulerDiscreteScheduler for every flow config, as DDIM / DPM-Solver for VP ones. A flow grid starts at ``t = 1``
(pure noise, sigma = inf): the model is conditioned on ``t = 1`` as in diffusers, and the solver starts from that point
at ``t = FLOW_T_MAX`` (``1 - 1e-4``), reading the input as 1e-4 signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from fastdiff.errors import InputError, check_choice
from fastdiff.param import canonical_prediction_type, check_threshold, dynamic_threshold, x0_from_output
from fastdiff.samplers._common import step_dtype
from fastdiff.samplers.consistency import ctm_jump, ctm_renoise, ctm_target, reuse_noise_step
from fastdiff.samplers.grids import FLOW_T_MAX, check_sigmas, grid_from_config, sigma_spacing, solver_sigmas
from fastdiff.samplers.momentum import _check, ghvb_rule, hb_dpmpp_2m_rule, hb_plms_rule, nt_plms_rule
from fastdiff.samplers.ode import dpmpp_2m_rule
from fastdiff.samplers.pndm import PNDM_VARIANTS, Program, Query, ipndm_rule, ipndm_v_rule, pndm_program
from fastdiff.samplers.unipc import check_unipc, unipc_rule
from fastdiff.schedules import TIME_SHIFT_TYPES, FlowSchedule, VPSchedule

__all__ = [
    "SigmaGridScheduler", "MomentumScheduler", "GHVBScheduler", "HeavyBallPLMSScheduler", "NesterovPLMSScheduler", "UniPCHeavyBallScheduler", "HeavyBallDPMSolverScheduler",
    "IPNDMScheduler", "PseudoNumericalScheduler", "PLMSScheduler", "SPNDMScheduler", "FPNDMScheduler", "CTMScheduler", "ReflowScheduler", "FLOW_T_MAX",
]  # fmt: skip

SOLVERS = {
    "ghvb": ghvb_rule, "hb-plms": hb_plms_rule, "nt-plms": nt_plms_rule, "hb-dpmpp-2m": hb_dpmpp_2m_rule, "dpmpp-2m": dpmpp_2m_rule,
    "ipndm": ipndm_rule, "ipndm-v": ipndm_v_rule, "unipc-hb": unipc_rule,
}  # fmt: skip
_ORDERED = ("ghvb", "hb-plms", "nt-plms", "ipndm", "ipndm-v", "unipc-hb")  # solvers with a multistep order
_DAMPED = ("ghvb", "hb-plms", "nt-plms", "hb-dpmpp-2m", "unipc-hb")  # solvers with a momentum
_FLOW_COMPATIBLES = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]


@dataclass
class FastdiffSchedulerOutput(BaseOutput):
    """``prev_sample`` and the x0 estimate (tuple order: prev, pred_original), as PixArt's 1-step path expects."""

    prev_sample: Tensor
    pred_original_sample: Tensor


def _to_device(values: Tensor, device: str | torch.device | None) -> Tensor:
    """``values`` on ``device``; float64 grids in the step dtype there (float32 on MPS, which has no float64)."""
    if device is None:
        return values
    return values.to(device, step_dtype(device)) if values.dtype == torch.float64 else values.to(device)


class SigmaGridScheduler(SchedulerMixin, ConfigMixin):
    """The diffusers contract around a descending sigma grid: grids from ``num_inference_steps`` / ``timesteps`` /
    ``sigmas`` / ``mu`` for VP and flow models, ``step_index`` / ``begin_index``, ``add_noise`` / ``scale_noise``,
    model output -> x0 conversion (and diffusers' ``thresholding`` of it). Subclasses set the config
    (``@register_to_config``), call :meth:`_setup` and implement :meth:`_install` (what to do with a new grid) and
    :meth:`_advance` (one step in sigma space)."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + _FLOW_COMPATIBLES
    order = 1

    def _setup(self) -> None:
        cfg = self.config
        prediction = "flow" if cfg.use_flow_sigmas and cfg.prediction_type == "epsilon" else cfg.prediction_type
        self.prediction_type = canonical_prediction_type(prediction)
        self.flow = cfg.use_flow_sigmas or self.prediction_type == "flow"
        self.schedule = FlowSchedule(cfg.num_train_timesteps) if self.flow else VPSchedule.from_config(cfg)
        sigma_spacing(cfg)  # at most one use_*_sigmas
        check_choice("time_shift_type", cfg.time_shift_type, TIME_SHIFT_TYPES)
        if cfg.invert_sigmas:
            raise InputError("invert_sigmas (Mochi's reversed flow timesteps and velocity) is not supported by fastdiff's schedulers")
        if cfg.thresholding:
            check_threshold(cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        if not self.flow:  # diffusers' VP schedulers expose these; pipelines (LEDITS++, SAG, DiffEdit) and compute_snr read them
            self.betas = self.schedule.betas.float()
            self.alphas = 1.0 - self.betas
            self.alphas_cumprod = self.schedule.alphas_cumprod.float()
        self.sigmas = self.grid = torch.zeros(0)
        self.timesteps = self.grid_timesteps = torch.zeros(0)
        self.num_inference_steps = None
        self._step_index, self._begin_index = None, None

    @classmethod
    def from_config(cls, config: Any = None, **kwargs: Any) -> SigmaGridScheduler:
        """As diffusers' ``from_config``; a FlowMatch* config gives ``prediction_type="flow_prediction"``. (Not
        ``use_flow_sigmas``: FluxPipeline reads that as "the scheduler builds its own grid" and stops passing sigmas.)"""
        from fastdiff.schedules import is_flow_config

        mapping = dict(getattr(config, "config", config) or {})
        explicit = {"use_flow_sigmas", "prediction_type"} & set(kwargs)
        if is_flow_config(mapping) and not mapping.get("use_flow_sigmas") and not explicit:
            kwargs["prediction_type"] = "flow_prediction"
        return super().from_config(config, **kwargs)

    # -- the grid ----------------------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """diffusers' grid for this config from ``num_inference_steps``, explicit ``timesteps`` and / or ``sigmas`` (flow
        models: flow times, as FlowMatchEuler takes them) and Flux's ``mu`` (``use_dynamic_shifting``); resets all
        solver history."""
        grid = grid_from_config(self.schedule, self.config, num_inference_steps, timesteps=timesteps, sigmas=sigmas, mu=mu)
        self.integer_timesteps = grid.integer
        self.num_inference_steps = len(grid.timesteps)
        self._step_index, self._begin_index = None, None
        self.grid = check_sigmas(solver_sigmas(grid.sigmas), method=type(self).__name__)  # the solver's steps
        self.grid_timesteps = grid.timesteps  # diffusers' timesteps: the model's at grid[:-1]
        self._install(self.grid)
        moved = (_to_device(v, device) for v in (self.grid, self.grid_timesteps, self.sigmas, self.timesteps))
        self.grid, self.grid_timesteps, self.sigmas, self.timesteps = moved

    def _set_evaluations(self, sigmas: Tensor) -> None:
        """The model is evaluated at ``sigmas[:-1]``: ``self.sigmas`` and the matching ``self.timesteps`` -- the grid's
        own timesteps at grid points, the schedule's elsewhere (PRK half steps)."""
        self.sigmas = sigmas
        on_grid = sigmas[:-1, None] == self.grid[None, :-1]
        t = self.schedule.sigma_to_t(sigmas[:-1])
        t = torch.where(on_grid.any(1), self.grid_timesteps[on_grid.double().argmax(1)], t)
        self.timesteps = t.round().long() if self.integer_timesteps else t.to(torch.float32)  # integer grids stay integer

    # -- the diffusers contract ----------------------------------------------------------------------------------------

    @property
    def init_noise_sigma(self) -> float:
        """1, as diffusers' VP and flow schedulers: the starting noise is ``N(0, I)``. (Pipelines read it *before*
        ``set_timesteps``, so a value that depended on the grid would carry the previous call's grid into this one.)"""
        return 1.0

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """Models take ``x_t`` as it is."""
        return sample

    def index_for_timestep(self, timestep: Any) -> int:
        """Position of ``timestep`` in the grid; the second match if it appears twice (diffusers' img2img rule)."""
        t = torch.as_tensor(timestep, dtype=torch.float32, device=self.timesteps.device)
        matches = (self.timesteps.float() - t).abs().le(1e-3 * max(1.0, t.abs().item())).nonzero().flatten()
        if len(matches) == 0:
            raise InputError(f"timestep {float(t)} is not on this scheduler's grid; call set_timesteps first")
        return int(matches[1 if len(matches) > 1 else 0])

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, generator: Any = None,
             return_dict: bool = True) -> FastdiffSchedulerOutput | tuple:  # fmt: skip
        """One step from ``timestep`` to the next point of ``timesteps``."""
        if self.num_inference_steps is None:
            raise InputError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        i, dtype, maths = self._step_index, sample.dtype, step_dtype(sample.device)
        sigma, sigma_next = self.sigmas[i : i + 2].to(sample.device, maths)
        x_t, out = sample.to(maths), model_output.to(maths)
        alpha = self.schedule.scale(sigma)
        denoised = x0_from_output(out, x_t, alpha, alpha * sigma, self.prediction_type)
        if self.config.thresholding:  # diffusers' option (DDIM, DPM-Solver, UniPC): the x0 estimate, before the solver
            denoised = dynamic_threshold(denoised, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        prev = (self._advance(x_t / alpha, denoised, i) * self.schedule.scale(sigma_next)).to(dtype)
        self._step_index += 1
        if not return_dict:
            return prev, denoised.to(dtype)
        return FastdiffSchedulerOutput(prev_sample=prev, pred_original_sample=denoised.to(dtype))

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Forward noising at discrete timesteps (img2img): ``s(sigma_t) (x0 + sigma_t noise)``."""
        maths = step_dtype(original_samples.device)
        t = torch.as_tensor(timesteps).to("cpu", torch.float64).reshape(-1)  # the schedule's tables live on the CPU
        sigma = self.schedule.t_to_sigma(t).to(original_samples.device, maths)
        sigma = sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))
        noised = self.schedule.scale(sigma) * (original_samples.to(maths) + sigma * noise.to(maths))
        return noised.to(original_samples.dtype)

    def scale_noise(self, sample: Tensor, timestep: Tensor, noise: Tensor) -> Tensor:
        """Flow-matching forward noising (Flux/SD3 img2img): ``(1 - t) sample + t noise``."""
        maths = step_dtype(sample.device)
        t = torch.as_tensor(timestep).to(sample.device, maths).reshape(-1, *([1] * (sample.ndim - 1))) / self.config.num_train_timesteps
        return ((1 - t) * sample.to(maths) + t * noise.to(maths)).to(sample.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _install(self, grid: Tensor) -> None:
        raise NotImplementedError

    def _advance(self, x: Tensor, denoised: Tensor, i: int) -> Tensor:
        raise NotImplementedError


class MomentumScheduler(SigmaGridScheduler):
    """Momentum multistep solvers (Wizadwongsa et al., ICLR 2024) as a diffusers scheduler.

    Args:
        solver: ``ghvb`` (generalized heavy ball), ``hb-plms`` (heavy ball on PLMS), ``nt-plms`` (Nesterov on PLMS),
            ``hb-dpmpp-2m`` (heavy ball on DPM-Solver++(2M)), ``unipc-hb`` (heavy ball on UniPC), ``ipndm`` (PLMS with
            Adams-Bashforth warm-up), ``ipndm-v`` (iPNDM with variable-step weights: full order on non-uniform grids)
            or ``dpmpp-2m``; default per class.
        solver_order: multistep order 1-4 (GHVB, HB-PLMS, NT-PLMS, iPNDM; default 4) or 1-2 (UniPC-HB; default 2).
        momentum: damping ``beta`` in (0, 1]; 1 is the base solver exactly.
        use_karras_sigmas: Karras grid between the schedule's sigma_min and sigma_max instead of ``timestep_spacing``
            (``use_exponential_sigmas``, ``use_beta_sigmas``: those spacings; all as DPM-Solver / FlowMatchEuler).
        use_flow_sigmas: treat the model as flow matching even if the config has betas.
        thresholding: diffusers' dynamic thresholding of each x0 estimate before the step (``dynamic_thresholding_ratio``,
            ``sample_max_value``; :func:`~fastdiff.param.dynamic_threshold`), as in DDIM / DPM-Solver / UniPC; every
            fastdiff scheduler takes it (pixel-space models at high guidance).
        The remaining arguments are diffusers' usual VP and FlowMatchEuler config fields, with FlowMatchEuler's grid
        (``shift``, ``use_dynamic_shifting`` + ``time_shift_type``, ``shift_terminal``); ``invert_sigmas`` is refused.
    """

    _default_solver = "ghvb"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        solver: str | None = None,
        solver_order: int | None = None,
        momentum: float = 0.8,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        invert_sigmas: bool = False,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
    ):
        solver = solver or self._default_solver
        check_choice("solver", solver, SOLVERS)
        solver_order = solver_order or (2 if solver == "unipc-hb" else 4)  # UniPC's default order is 2
        self.register_to_config(solver=solver, solver_order=solver_order)  # resolved, so any class reloads the same one
        _check(solver_order if solver in _ORDERED else 1, momentum if solver in _DAMPED else 1.0)
        if solver == "unipc-hb":
            check_unipc(solver_order, momentum)
        params = {"beta": momentum} if solver in _DAMPED else {}
        if solver in _ORDERED:
            params["order"] = solver_order
        self.rule = partial(SOLVERS[solver], **params)
        self._state = None
        self._setup()

    def _install(self, grid: Tensor) -> None:
        self._state = None
        self._set_evaluations(grid)

    def _advance(self, x: Tensor, denoised: Tensor, i: int) -> Tensor:
        sigma, sigma_next = self.sigmas[i : i + 2].to(x.device, x.dtype)
        x_next, self._state = self.rule(x, denoised, sigma, sigma_next, self._state)
        return x_next


class PseudoNumericalScheduler(SigmaGridScheduler):
    """The PNDM family (Liu et al., ICLR 2022) as a diffusers scheduler, warm-up stages included as timesteps.

    ``variant``: ``plms`` (pseudo improved Euler first step, then 4th-order pseudo linear multistep; N steps = N + 1
    timesteps, like diffusers' ``PNDMScheduler(skip_prk_steps=True)``), ``s-pndm`` (same warm-up, then 2nd order) or
    ``f-pndm`` (three pseudo Runge-Kutta steps at the timestep midpoints, then 4th order; N + 9 timesteps, N >= 4).
    Every entry of ``timesteps`` is a real model evaluation at that timestep (a repeated timestep is the warm-up's
    second evaluation there), and the step sizes come from the actual grid, whatever the spacing. Started part-way
    (img2img: ``set_begin_index(k)``) past the warm-up, it continues with Adams-Bashforth orders 1..4 from that point.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        variant: str | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        invert_sigmas: bool = False,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
    ):
        variant = variant or self._default_variant
        check_choice("variant", variant, ("plms", "s-pndm", "f-pndm"))
        self.register_to_config(variant=variant)
        self._program: Program | None = None
        self._setup()

    _default_variant = "plms"

    def _install(self, grid: Tensor) -> None:
        _, _, min_steps = PNDM_VARIANTS[self.config.variant]
        if len(grid) - 1 < min_steps:
            raise InputError(f"{self.config.variant} needs at least {min_steps} inference steps for its warm-up; got {len(grid) - 1}")
        self._program = None
        dry = self._program_for(grid.new_zeros(1), grid)  # the evaluation points, in order
        points, q = [], next(dry)
        try:
            while True:
                points.append(q.sigma)
                q = dry.send((q.x, q.x))
        except StopIteration:
            pass
        self._set_evaluations(torch.cat([torch.stack(points).reshape(-1), grid.new_zeros(1)]))

    def _advance(self, x: Tensor, denoised: Tensor, i: int) -> Tensor:
        if self._program is None:
            self._program = self._start(x, i)
        try:
            q: Query = self._program.send((x, denoised))
        except StopIteration as done:
            self._program = None
            return done.value
        return q.x

    def _program_for(self, x: Tensor, grid: Tensor) -> Program:
        """This variant's program on ``grid``; F-PNDM's half steps at the timestep midpoints of this schedule."""
        return pndm_program(x, grid, self.config.variant, self.schedule, self.integer_timesteps)

    def _start(self, x: Tensor, i: int) -> Program:
        """The program, advanced to its first query (which is evaluation ``i``)."""
        if i == 0:
            program = self._program_for(x, self.grid.to(x.device, x.dtype))
        else:
            tail = self.sigmas[i:].to(x.device, x.dtype)
            if not bool((tail[1:] < tail[:-1]).all()):
                raise InputError(f"{self.config.variant} cannot start at evaluation {i}: it is inside the warm-up; start at "
                                 f"index 0 or after the warm-up (>= {len(self.sigmas) - len(self.grid)})")  # fmt: skip
            program = pndm_program(x, tail, "ipndm")
        next(program)
        return program


class GHVBScheduler(MomentumScheduler):
    """Generalized heavy ball (order ``solver_order``, damping ``momentum``)."""

    _default_solver = "ghvb"


class HeavyBallPLMSScheduler(MomentumScheduler):
    """Heavy-ball momentum on PLMS."""

    _default_solver = "hb-plms"


class NesterovPLMSScheduler(MomentumScheduler):
    """Nesterov momentum on PLMS (the paper code's PLMS-NT)."""

    _default_solver = "nt-plms"


class UniPCHeavyBallScheduler(MomentumScheduler):
    """Heavy-ball momentum on UniPC (bh2 with the corrector; ``solver_order`` 1 or 2; ``momentum=1`` is UniPC exactly)."""

    _default_solver = "unipc-hb"


class HeavyBallDPMSolverScheduler(MomentumScheduler):
    """Heavy-ball momentum on DPM-Solver++(2M)."""

    _default_solver = "hb-dpmpp-2m"


class IPNDMScheduler(MomentumScheduler):
    """iPNDM: PLMS with Adams-Bashforth warm-up (orders 1..4), one evaluation per step; ``solver="ipndm-v"``: the
    variable-step weights (order 4 on Karras / VP / optimised grids, where the fixed weights give order 2)."""

    _default_solver = "ipndm"


class PLMSScheduler(PseudoNumericalScheduler):
    """PLMS: pseudo improved Euler first step, then 4th-order pseudo linear multistep (N steps, N + 1 evaluations)."""

    _default_variant = "plms"


class SPNDMScheduler(PseudoNumericalScheduler):
    """S-PNDM: pseudo improved Euler first step, then 2nd-order pseudo linear multistep."""

    _default_variant = "s-pndm"


class FPNDMScheduler(PseudoNumericalScheduler):
    """F-PNDM: three pseudo Runge-Kutta steps, then 4th-order PLMS (N >= 4 steps, N + 9 evaluations)."""

    _default_variant = "f-pndm"


class CTMScheduler(SigmaGridScheduler):
    """CTM gamma-sampling (Kim et al., ICLR 2024, Algorithm 2) for two-time students
    (:class:`fastdiff.two_time.TwoTimeModel`), with the step rule of :func:`~fastdiff.samplers.sample_ctm`.

    Each step jumps from ``t_n`` to ``s_n = sqrt(1 - gamma^2)(t_{n+1} - sigma_min) + sigma_min`` with ``G(x, t, s) =
    (s/t) x + (1 - s/t) g`` and re-noises to ``t_{n+1}``; the last jump lands on ``sigma_min``. ``gamma = 0`` is
    deterministic, ``gamma = 1`` consistency multistep. The model needs ``s`` as well as ``t``: pipelines read it from
    ``jump_timesteps[i]`` (aligned with ``timesteps``) and pass it as ``s_timestep`` -- fastdiff's
    ``ClassConditionalPipeline`` does. Grids are the teacher config's (``timestep_spacing`` trailing: 1 step = 999).

    Args:
        gamma: CTM's gamma in [0, 1].
        sigma_min: where the last jump lands; ``None``: the schedule's smallest sigma (timestep 0).
        The rest: diffusers' usual VP config fields.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "trailing",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        gamma: float = 0.0,
        sigma_min: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        invert_sigmas: bool = False,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
    ):
        ctm_target(torch.ones(()), gamma, 0.0, False)  # checks gamma
        self._setup()
        if self.flow:
            raise InputError("CTMScheduler samples VP (discrete-time) two-time students; flow-matching configs are not supported")
        self.jump_sigmas = self.jump_timesteps = torch.zeros(0)
        self._generator = None

    @property
    def sigma_min(self) -> float:
        return self.config.sigma_min if self.config.sigma_min is not None else self.schedule.sigma_min

    def _install(self, grid: Tensor) -> None:
        self._set_evaluations(grid)
        last = len(grid) - 2
        s = [ctm_target(grid[i + 1].clamp(min=self.sigma_min), self.config.gamma, self.sigma_min, i == last) for i in range(last + 1)]
        self.jump_sigmas = torch.stack(s)
        self.jump_timesteps = self.schedule.sigma_to_t(self.jump_sigmas).to(torch.float32)

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, generator: Any = None,
             return_dict: bool = True) -> FastdiffSchedulerOutput | tuple:  # fmt: skip
        """One CTM jump and re-noising; ``generator`` draws the re-noising (``gamma > 0``)."""
        self._generator = generator
        try:
            return super().step(model_output, timestep, sample, generator, return_dict)
        finally:
            self._generator = None

    def _advance(self, x: Tensor, denoised: Tensor, i: int) -> Tensor:
        t = self.sigmas[i].to(x.device, x.dtype)
        t_next = self.sigmas[i + 1].to(x.device, x.dtype).clamp(min=self.sigma_min)
        s = self.jump_sigmas[i].to(x.device, x.dtype)
        x_hat = ctm_jump(x, denoised, t, s)
        if i == len(self.sigmas) - 2:
            return ctm_renoise(x_hat, s, t_next, None)
        gamma = self.config.gamma  # a list of generators draws each image's noise from its own (diffusers' randn_tensor)
        noise = randn_tensor(x.shape, generator=self._generator, device=x.device, dtype=x.dtype) if gamma > 0 else torch.zeros_like(x)
        return ctm_renoise(x_hat, s, t_next, noise)


class ReflowScheduler(SigmaGridScheduler):
    """2-RF++'s sampler (:func:`~fastdiff.samplers.sample_reflow`) as a diffusers scheduler: each step moves to the
    next level along the line from ``x0_hat`` to the *initial* noise, kept from the first step. For flow-matching
    models (rectified-flow students; ``FlowMatchEulerDiscreteScheduler``'s grid and config) and VP ones alike. Started
    part-way (img2img, ``set_begin_index``), the first sample it sees stands in for the initial noise."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        invert_sigmas: bool = False,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
    ):
        self._eps1 = None
        self._setup()

    def _install(self, grid: Tensor) -> None:
        self._eps1 = None
        self._set_evaluations(grid)

    def _advance(self, x: Tensor, denoised: Tensor, i: int) -> Tensor:
        sigma, sigma_next = self.sigmas[i : i + 2].to(x.device, x.dtype)
        if self._eps1 is None:
            self._eps1 = x / sigma
        return reuse_noise_step(denoised, sigma_next, self._eps1)
