"""The audio modality of diffkit: DiffWave, FSDD and folder loaders, log-mel tools, generation.

    import diffkit
    out = diffkit.generate(modality="audio", labels=[7] * 8, num_samples=8, steps=6, seed=0)
    out.audio, out.sample_rate          # (8, 1, T) in [-1, 1], 8000

See :mod:`modalities.audio.modality` for generation, likelihood and saving,
:mod:`modalities.audio.model` for the networks, :mod:`modalities.audio.data` for the data,
:mod:`modalities.audio.mel` for the spectrogram route, :mod:`modalities.audio.vocoder` for the
learned harmonic-plus-noise vocoder that turns its frames into sound, and
``recipes/audio_train.py`` for training.
"""

from .data import (
    DEFAULT_WINDOW,
    FSDD_DIR,
    FSDD_SAMPLE_RATE,
    AudioData,
    AudioDataset,
    fit_length,
    load_audio_folder,
    load_fsdd,
    read_clip,
    resample,
    window_mask,
)
from .mel import MelConfig, griffin_lim, log_mel
from .modality import (
    BIN_WIDTH_16BIT,
    DEFAULT_CHECKPOINT,
    FAST_BETAS,
    AudioModality,
    AudioModel,
    AudioSamples,
    bits_per_sample,
    bits_per_sample_of,
    generate_audio,
    load_audio_model,
    load_vocoder,
    sampling_grid,
    save_audio,
    spectrogram_image,
    vocode,
)
from .model import DiffWave, MelDenoiser
from .vocoder import HarmonicVocoder

__all__ = [
    "BIN_WIDTH_16BIT",
    "DEFAULT_CHECKPOINT",
    "DEFAULT_WINDOW",
    "FAST_BETAS",
    "FSDD_DIR",
    "FSDD_SAMPLE_RATE",
    "AudioData",
    "AudioDataset",
    "AudioModality",
    "AudioModel",
    "AudioSamples",
    "DiffWave",
    "HarmonicVocoder",
    "MelConfig",
    "MelDenoiser",
    "bits_per_sample",
    "bits_per_sample_of",
    "fit_length",
    "generate_audio",
    "griffin_lim",
    "load_audio_folder",
    "load_audio_model",
    "load_fsdd",
    "load_vocoder",
    "log_mel",
    "read_clip",
    "resample",
    "sampling_grid",
    "save_audio",
    "spectrogram_image",
    "vocode",
    "window_mask",
]
