"""diffkit: one small, shape-generic diffusion core behind every modality.

    import diffkit
    diff = diffkit.Diffusion(schedule="linear", num_timesteps=1000, prediction="eps")
    loss = diff.loss(model, x0)
    x = diff.sample(model, (16, 3, 32, 32), sampler="unipc", steps=10)
    bpd = diff.nll(model, x0)
"""

__version__ = "0.1.0"

from .schedules import SCHEDULES, SPACINGS, NoiseSchedule, rescale_zero_terminal_snr, respace  # noqa: E402
from .parameterization import PREDICTIONS  # noqa: E402
from .sampling import SAMPLERS, Prediction, SamplingGrid, get_sampler, model_calls  # noqa: E402
from .diffusion import DECODERS, LOSS_TYPES, LOSS_WEIGHTINGS, VARIANCES, Diffusion  # noqa: E402
from .analytic import GaussianData  # noqa: E402
from .utils import resolve_device, seed_everything  # noqa: E402
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from .registry import (  # noqa: E402
    ModalityLoadError,
    UnknownModalityError,
    available_modalities,
    generate,
    get_modality,
    register_modality,
)
from .trainer import TrainConfig, Trainer, TrainingError  # noqa: E402

__all__ = [
    "__version__",
    "Diffusion",
    "NoiseSchedule",
    "SamplingGrid",
    "Prediction",
    "GaussianData",
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
    "generate",
    "register_modality",
    "available_modalities",
    "get_modality",
    "UnknownModalityError",
    "ModalityLoadError",
    "seed_everything",
    "SAMPLERS",
    "SCHEDULES",
    "SPACINGS",
    "PREDICTIONS",
    "VARIANCES",
    "LOSS_TYPES",
    "LOSS_WEIGHTINGS",
    "DECODERS",
]
