"""diffkit: one small, shape-generic diffusion core behind every modality.

    import diffkit
    diff = diffkit.Diffusion(schedule="linear", num_timesteps=1000, prediction="eps")
    loss = diff.loss(model, x0)
    x = diff.sample(model, (16, 3, 32, 32), sampler="unipc", steps=10)
    bpd = diff.nll(model, x0)                    # the variational bound; method="ode": exact
    flow = diffkit.Diffusion(schedule="flow", prediction="flow")   # flow matching / rectified flow
"""

__version__ = "0.1.0"

from .schedules import SCHEDULES, SPACINGS, FlowSchedule, NoiseSchedule, rescale_zero_terminal_snr, respace  # noqa: E402
from .parameterization import PREDICTIONS  # noqa: E402
from .sampling import (  # noqa: E402
    SAMPLERS,
    TIME_INPUTS,
    ModelStatistics,
    Prediction,
    SamplerSpec,
    SamplingGrid,
    get_sampler,
    model_calls,
    register_sampler,
    sampler_spec,
)
from .guidance import (  # noqa: E402
    ClipX0,
    GradientGuidance,
    GradientSteps,
    KnownValues,
    PriorMeanStart,
    SamplingContext,
    StateHook,
    X0Transform,
)
from .diffusion import (  # noqa: E402
    DECODERS,
    LOSS_TYPES,
    LOSS_WEIGHTINGS,
    TIME_SAMPLINGS,
    VARIANCES,
    Candidates,
    Diffusion,
)
from .analytic import GaussianData  # noqa: E402
from .likelihood import Estimate  # noqa: E402
from .masked import MaskedDiffusion, TokenSampling  # noqa: E402
from .starts import NoiseStart, PriorStart, WarmStart  # noqa: E402
from . import interop, nn  # noqa: E402
from .utils import resolve_device, seed_everything  # noqa: E402
from .checkpoint import (  # noqa: E402
    Checkpoint,
    CheckpointError,
    LoadedNetwork,
    load_checkpoint,
    load_network,
    save_checkpoint,
)
from .registry import (  # noqa: E402
    CliCommand,
    Modality,
    ModalityLoadError,
    Policy,
    UnknownModalityError,
    available_modalities,
    generate,
    get_modality,
    load_policy,
    register_modality,
)
from .trainer import TrainConfig, Trainer, TrainingError  # noqa: E402

__all__ = [
    "__version__",
    "Diffusion",
    "Candidates",
    "NoiseSchedule",
    "FlowSchedule",
    "SamplerSpec",
    "register_sampler",
    "sampler_spec",
    "Estimate",
    "MaskedDiffusion",
    "TokenSampling",
    "NoiseStart",
    "PriorStart",
    "WarmStart",
    "SamplingGrid",
    "ModelStatistics",
    "SamplingContext",
    "Prediction",
    "ClipX0",
    "X0Transform",
    "KnownValues",
    "GradientGuidance",
    "GradientSteps",
    "StateHook",
    "PriorMeanStart",
    "GaussianData",
    "nn",
    "interop",
    "respace",
    "rescale_zero_terminal_snr",
    "get_sampler",
    "model_calls",
    "resolve_device",
    "Trainer",
    "TrainConfig",
    "TrainingError",
    "save_checkpoint",
    "load_checkpoint",
    "Checkpoint",
    "CheckpointError",
    "load_network",
    "LoadedNetwork",
    "CliCommand",
    "Modality",
    "Policy",
    "load_policy",
    "generate",
    "register_modality",
    "available_modalities",
    "get_modality",
    "UnknownModalityError",
    "ModalityLoadError",
    "seed_everything",
    "SAMPLERS",
    "TIME_INPUTS",
    "TIME_SAMPLINGS",
    "SCHEDULES",
    "SPACINGS",
    "PREDICTIONS",
    "VARIANCES",
    "LOSS_TYPES",
    "LOSS_WEIGHTINGS",
    "DECODERS",
]
