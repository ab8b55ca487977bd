"""The text modality of diffkit: Diffusion-LM-style diffusion on word embeddings.

    import diffkit
    texts = diffkit.generate(modality="text", num_samples=16, seed=0)        # list[str]
    texts = diffkit.generate(modality="text", control={"food": "Italian"})
    texts = diffkit.generate(modality="text", infill="The Eagle is a [MASK] [MASK] in the city centre .")

See :mod:`modalities.text.modality` for generation, :mod:`modalities.text.model` for the
network, :mod:`modalities.text.objective` for the loss and ``recipes/text_train.py`` for
training.
"""

from .data import (
    SLOTS,
    MRVocabulary,
    TextCorpus,
    format_mr,
    is_held_out,
    load_corpus,
    load_e2e,
    load_text_file,
    parse_mr,
)
from .model import NoisyMRClassifier, TextDenoiser
from .modality import (
    DEFAULT_CHECKPOINT,
    EMBEDDING_CHECKPOINT,
    TextModality,
    TextModel,
    generate_text,
    load_classifier,
    load_text_model,
    nll_per_token,
    parse_control,
    save_text,
)
from .objective import ClassifierObjective, TextObjective
from .tokenizer import TextTokenizer

__all__ = [
    "DEFAULT_CHECKPOINT",
    "EMBEDDING_CHECKPOINT",
    "SLOTS",
    "ClassifierObjective",
    "MRVocabulary",
    "NoisyMRClassifier",
    "TextCorpus",
    "TextDenoiser",
    "TextModality",
    "TextModel",
    "TextObjective",
    "TextTokenizer",
    "format_mr",
    "generate_text",
    "is_held_out",
    "load_corpus",
    "load_e2e",
    "load_text_file",
    "load_classifier",
    "load_text_model",
    "nll_per_token",
    "parse_control",
    "parse_mr",
    "save_text",
]
