"""Bring your own model: a network trained with 🤗 diffusers, run with diffkit's samplers, calibration and likelihoods.

:func:`from_diffusers` takes a diffusers network (``UNet2DModel``, ``UNet2DConditionModel``, or
any callable ``model(sample, timestep, **kwargs)`` that predicts eps, v, x0 or a flow velocity)
and the ``config`` of the scheduler it was trained with, and returns a :class:`~diffkit.Diffusion`
with the same forward process and a network that follows diffkit's convention
``model(x_t, t, **cond) -> Tensor``::

    diff, net = from_diffusers(unet, scheduler.config)
    x = diff.sample(net, (16, 3, 32, 32), steps=10)
    diff = calibrate(diff, net, (64, 3, 32, 32), steps=(10,))
    bpd = diff.nll(net, images, method="ode", divergence="hutchinson")

diffusers is not imported here: the config is read as a plain mapping (a scheduler's
``FrozenDict`` is one) and the network's output is recognised by its shape (a tensor, an object
with ``.sample``, or a tuple whose first entry is the prediction).

Only what fixes the training is read: the betas (``beta_schedule``, ``beta_start``,
``beta_end``, ``num_train_timesteps``, ``trained_betas``, ``rescale_betas_zero_snr``),
``prediction_type`` and ``variance_type``. The settings of diffusers' samplers (timestep
spacing, solver orders, Karras sigmas, ...) are accepted and left out: diffkit picks its own
grids, or samples on diffusers' grid when given ``grid=scheduler.timesteps``. Two sampling
settings are translated rather than dropped: ``clip_sample`` becomes a
:class:`~diffkit.guidance.ClipX0` wrapper (see :func:`sampling_wrappers`), and
``thresholding=True`` is refused, since diffkit has no dynamic thresholding. Any setting this
module does not know is refused, so that nothing that changed the training goes unnoticed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

from .diffusion import Diffusion
from .guidance import ClipX0
from .schedules import NoiseSchedule
from .utils import append_dims

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}
VARIANCE_TYPES = {None: "fixed_small", "fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                  "fixed_large": "fixed_large", "fixed_large_log": "fixed_large", "learned_range": "learned_range"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Settings that fix the forward process or the network's target: read.
_TRAINING_KEYS = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr", "prediction_type", "variance_type"}
# Settings of diffusers' samplers only (which grid, which solver, which noise between steps): the
# network learned the same thing whatever they hold, and diffkit's samplers choose their own.
_SAMPLING_KEYS = {
    "timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample", "clip_sample_range",
    "sample_max_value", "thresholding", "dynamic_thresholding_ratio", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "sigma_min", "sigma_max",
    "interpolation_type", "timestep_type", "final_sigmas_type", "solver_order", "solver_type",
    "algorithm_type", "lower_order_final", "euler_at_final", "lambda_min_clipped", "predict_x0",
    "disable_corrector", "solver_p", "skip_prk_steps", "eta", "use_flow_sigmas", "flow_shift",
    "shift", "shift_terminal", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
    "max_image_seq_len", "time_shift_type", "invert_sigmas", "stochastic_sampling",
}
# Mapped by hand: the Diffusion these options would override.
_SET_HERE = ("schedule", "num_timesteps", "prediction", "variance", "time_input", "zero_terminal_snr")


def _plain_config(scheduler_config) -> dict:
    """The config as a dict: a mapping (diffusers' FrozenDict), or a scheduler carrying one in ``.config``."""
    if not isinstance(scheduler_config, Mapping) and isinstance(getattr(scheduler_config, "config", None), Mapping):
        scheduler_config = scheduler_config.config
    if not isinstance(scheduler_config, Mapping):
        raise TypeError(f"scheduler_config must be a dict (a diffusers scheduler's .config), "
                        f"got {type(scheduler_config).__name__}")
    return dict(scheduler_config)


def _is_flow(config: dict) -> bool:
    """Whether the config describes a flow-matching model (diffusers' FlowMatch* schedulers)."""
    if str(config.get("_class_name", "")).startswith("FlowMatch") or bool(config.get("use_flow_sigmas")):
        return True
    if config.get("prediction_type") == "flow_prediction":
        return True
    # A FlowMatch* config built in memory carries no _class_name: it has a shift and no betas.
    has_betas = any(key in config for key in ("beta_schedule", "beta_start", "beta_end", "trained_betas"))
    return not has_betas and "shift" in config


def _check_settings(config: dict, flow: bool) -> None:
    """Refuse what diffkit cannot honour, one setting at a time, each with what to do instead."""
    for key in config:
        if key.startswith("_") or key in _TRAINING_KEYS or key in _SAMPLING_KEYS:
            continue
        raise ValueError(f"unknown scheduler setting {key}={config[key]!r}: diffkit cannot tell whether it changed "
                         "the training; remove it from the config if it only affects sampling")
    if "num_train_timesteps" not in config:
        raise ValueError("num_train_timesteps is missing from the scheduler config; add the number of training "
                         "timesteps the model was trained with (diffusers' default is 1000)")
    T = config["num_train_timesteps"]
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise ValueError(f"num_train_timesteps={T!r} must be an integer of at least 2")
    if config.get("thresholding"):
        raise ValueError("thresholding=True (dynamic thresholding) has no diffkit counterpart; set thresholding=False "
                         "and sample with wrappers=[ClipX0(low, high)] to keep samples in range")
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing={spacing!r} is unknown; use one of {', '.join(TIMESTEP_SPACINGS)} "
                         "(it only picks diffusers' sampling grid; diffkit picks its own)")
    if config.get("timestep_type", "discrete") != "discrete":
        raise ValueError(f"timestep_type={config['timestep_type']!r} feeds the network a function of sigma instead "
                         "of the timestep; only timestep_type='discrete' is supported")
    if config.get("invert_sigmas"):
        raise ValueError("invert_sigmas=True runs the flow from data to noise; only invert_sigmas=False is supported")
    variance = config.get("variance_type")
    if variance == "learned":
        raise ValueError("variance_type='learned' (a raw log variance per element) has no diffkit counterpart; "
                         "use a model trained with variance_type='learned_range', or wrap the network to return "
                         "its first half of channels and set variance_type='fixed_small'")
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"variance_type={variance!r} is unknown; use one of "
                         f"{', '.join(repr(v) for v in VARIANCE_TYPES if v is not None)}")
    if flow:
        if config.get("prediction_type", "flow_prediction") != "flow_prediction":
            raise ValueError(f"prediction_type={config['prediction_type']!r} with flow sigmas is not supported; "
                             "a flow-matching model predicts the velocity (prediction_type='flow_prediction')")
        return
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction!r} is unknown; use one of "
                         f"{', '.join(repr(p) for p in PREDICTION_TYPES)}")
    if "trained_betas" in config and config["trained_betas"] is not None:
        return
    schedule = config.get("beta_schedule", "linear")
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule={schedule!r} is not supported; use one of {', '.join(BETA_SCHEDULES)} "
                         "or pass the betas themselves as trained_betas")


def _betas_for_alpha_bar(num_timesteps: int, alpha_bar_fn: Callable[[float], float], max_beta: float = 0.999):
    """diffusers' ``betas_for_alpha_bar``, in Python floats, rounded to float32 as diffusers stores them."""
    betas = [min(1 - alpha_bar_fn((i + 1) / num_timesteps) / alpha_bar_fn(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float32)


def _laplace_alpha_bar(t: float) -> float:
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def diffusers_betas(scheduler_config) -> torch.Tensor:
    """The betas a diffusers scheduler builds from ``scheduler_config``, float32 as diffusers holds them.

    The same formulas as diffusers' ``DDPMScheduler``/``DDIMScheduler`` (float32 arithmetic
    included), so ``alphas_cumprod`` agrees with diffusers' to float32 rounding.
    """
    config = _plain_config(scheduler_config)
    _check_settings(config, flow=False)
    T = config["num_train_timesteps"]
    start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32).flatten()
        if betas.numel() != T:
            raise ValueError(f"trained_betas holds {betas.numel()} values but num_train_timesteps={T}; "
                             "make them agree")
    else:
        schedule = config.get("beta_schedule", "linear")
        if schedule == "linear":
            betas = torch.linspace(start, end, T, dtype=torch.float32)
        elif schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = _betas_for_alpha_bar(T, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
        elif schedule == "laplace":
            betas = _betas_for_alpha_bar(T, _laplace_alpha_bar)
        else:  # sigmoid (GeoDiff)
            betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float32)) * (end - start) + start
    if config.get("rescale_betas_zero_snr"):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """:func:`diffkit.schedules.rescale_zero_terminal_snr` in diffusers' order of float32 operations (same betas, bit for bit)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    return 1 - torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])


class DiffusersNetwork(torch.nn.Module):
    """A diffusers network in diffkit's convention ``model(x_t, t, **cond) -> Tensor``.

    ``t`` (float, (B,)) is multiplied by ``time_scale`` (1 for discrete schedules, whose
    training steps are diffusers' timesteps; ``num_train_timesteps`` on the flow path, where
    diffusers feeds sigma x 1000) and passed as ``timestep``; ``cond`` (``class_labels``,
    ``encoder_hidden_states``, ``added_cond_kwargs``, ...) goes through by name. The output may
    be a tensor, an object with ``.sample`` or a tuple. With ``null_cond`` (e.g.
    ``{"encoder_hidden_states": empty_prompt_embeds}`` or ``{"class_labels": null_class}``) it
    accepts diffkit's ``drop_cond`` mask for classifier-free guidance: the rows to drop get the
    null condition.
    """

    def __init__(self, model: Callable[..., Any], *, time_scale: float = 1.0, null_cond: Optional[dict] = None):
        super().__init__()
        if not callable(model):
            raise TypeError(f"the network must be callable, got {type(model).__name__}")
        if isinstance(model, torch.nn.Module):
            self.model = model
        else:  # a plain callable: kept outside the module tree
            self.__dict__["model"] = model
        self.time_scale = float(time_scale)
        self.null_cond = None if null_cond is None else dict(null_cond)
        if self.null_cond is not None:
            for key, value in self.null_cond.items():
                if torch.is_tensor(value):
                    self.register_buffer(f"_null_{key}", value, persistent=False)

    def _with_null(self, cond: dict, drop: torch.Tensor) -> dict:
        if self.null_cond is None:
            raise ValueError("classifier-free guidance with a diffusers network needs its null condition: "
                             "from_diffusers(model, config, null_cond={'encoder_hidden_states': empty_prompt_embeds}) "
                             "or {'class_labels': null_class_id}")
        cond = dict(cond)
        for key in self.null_cond:
            if key not in cond:
                continue
            value = cond[key]
            null = torch.as_tensor(getattr(self, f"_null_{key}", self.null_cond[key]), device=value.device,
                                   dtype=value.dtype)
            cond[key] = torch.where(append_dims(drop.to(value.device), value.ndim), null, value)
        return cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, drop_cond: Optional[torch.Tensor] = None, **cond) -> torch.Tensor:
        if drop_cond is not None:
            cond = self._with_null(cond, torch.as_tensor(drop_cond, dtype=torch.bool))
        dtype = getattr(self.model, "dtype", None)
        x_in = x.to(dtype) if isinstance(dtype, torch.dtype) and dtype.is_floating_point else x
        timestep = t if self.time_scale == 1.0 else t * self.time_scale
        output = self.model(x_in, timestep, **cond)
        if hasattr(output, "sample") and not torch.is_tensor(output):
            output = output.sample
        elif isinstance(output, (tuple, list)):
            output = output[0]
        if not torch.is_tensor(output):
            raise TypeError(f"the network returned {type(output).__name__}; expected a tensor, an object with "
                            ".sample (diffusers' output) or a tuple whose first entry is the prediction")
        return output.to(x.dtype)


def from_diffusers(model: Callable[..., Any], scheduler_config, *, null_cond: Optional[dict] = None,
                   **diffusion_options) -> tuple[Diffusion, DiffusersNetwork]:
    """The :class:`~diffkit.Diffusion` a diffusers model was trained for, and the model in diffkit's convention.

    Args:
        model: the network, called ``model(sample, timestep, **cond)``; a diffusers
            ``UNet2DModel`` or any eps / v / x0 (or flow-velocity) network.
        scheduler_config: the training scheduler's ``config`` (a dict; a scheduler object with
            ``.config`` is accepted too). Discrete schedulers (DDPM, DDIM, PNDM, DPM-Solver,
            Euler, UniPC, ...) give a diffusion on their betas with ``prediction_type``
            epsilon / v_prediction / sample -> eps / v / x0 and ``variance_type`` fixed_small /
            fixed_large / learned_range; ``FlowMatchEulerDiscreteScheduler`` (or
            ``use_flow_sigmas=True``) gives ``schedule="flow", prediction="flow"``.
        null_cond: the null condition for classifier-free guidance (see :class:`DiffusersNetwork`).
        diffusion_options: further :class:`~diffkit.Diffusion` options (``decoder``,
            ``data_range``, ``bin_width``, ``calibration``, ...).

    Returns:
        ``(diffusion, network)``; ``diffusion`` counts timesteps 0..T-1 as diffusers does, so its
        ``schedule.alpha_bar`` equals the scheduler's ``alphas_cumprod``, and the network is told
        the same timesteps diffusers would tell it (fractional ones between steps).

    Raises:
        ValueError: naming the first setting diffkit cannot honour and what to do about it.
    """
    config = _plain_config(scheduler_config)
    clash = sorted(set(diffusion_options) & set(_SET_HERE))
    if clash:
        raise ValueError(f"{', '.join(clash)} come from the scheduler config; set them there, not as options")
    flow = _is_flow(config)
    _check_settings(config, flow)
    T = config["num_train_timesteps"]
    if flow:
        diffusion = Diffusion("flow", T, "flow", **diffusion_options)
        return diffusion, DiffusersNetwork(model, time_scale=T, null_cond=null_cond)
    prediction = PREDICTION_TYPES[config.get("prediction_type", "epsilon")]
    betas = diffusers_betas(config)
    if config.get("rescale_betas_zero_snr") and prediction == "eps":
        raise ValueError("rescale_betas_zero_snr=True leaves no signal at the last step, where an epsilon "
                         "prediction says nothing about the data; use a model trained with "
                         "prediction_type='v_prediction' (or 'sample')")
    schedule = NoiseSchedule.from_betas(betas.to(torch.float64))
    variance = VARIANCE_TYPES[config.get("variance_type")]
    diffusion = Diffusion(schedule, prediction=prediction, variance=variance, time_input="timestep",
                          **diffusion_options)
    return diffusion, DiffusersNetwork(model, null_cond=null_cond)


def sampling_wrappers(scheduler_config) -> list:
    """diffusers' ``clip_sample`` as diffkit wrappers: ``[ClipX0(-r, r)]`` with ``r = clip_sample_range``, or ``[]``.

    Pass them as ``diff.sample(net, shape, wrappers=sampling_wrappers(config))`` to clip x0_hat
    as diffusers' DDPM/DDIM schedulers do. (diffusers' DDIM keeps the unclipped eps unless
    ``use_clipped_model_output=True``; ClipX0 recomputes eps from the clipped x0, as that
    option does.)
    """
    config = _plain_config(scheduler_config)
    if not config.get("clip_sample"):
        return []
    bound = float(config.get("clip_sample_range", 1.0))
    return [ClipX0(-bound, bound)]
