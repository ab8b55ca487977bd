"""The image modality of diffkit: a U-Net, data loaders, a text encoder, tasks and metrics.

    import diffkit
    imgs = diffkit.generate(modality="image")          # (16, 1, 16, 16) digits in [0, 1]

See :mod:`modalities.image.modality` for generation and the tasks (inpainting,
super-resolution, image-to-image), :mod:`modalities.image.unet` for the network and
``recipes/image_train.py`` for training.
"""

from .data import DIGITS_BIN_WIDTH, EIGHT_BIT_BIN_WIDTH, ImageDataset, ImageFolder, load_digits, torchvision_dataset
from .modality import (
    DEFAULT_CHECKPOINT,
    SUPER_RESOLUTION_CHECKPOINT,
    TEXT_CHECKPOINT,
    ImageModality,
    ImageModel,
    bits_per_dim,
    generate_images,
    img2img,
    inpaint,
    load_image,
    load_image_model,
    make_grid,
    save_grid,
    super_resolve,
)
from .text import TextEncoder, load_text_encoder
from .unet import UNet

__all__ = [
    "bits_per_dim",
    "DEFAULT_CHECKPOINT",
    "DIGITS_BIN_WIDTH",
    "EIGHT_BIT_BIN_WIDTH",
    "SUPER_RESOLUTION_CHECKPOINT",
    "TEXT_CHECKPOINT",
    "ImageDataset",
    "ImageFolder",
    "ImageModality",
    "ImageModel",
    "TextEncoder",
    "UNet",
    "generate_images",
    "img2img",
    "inpaint",
    "load_digits",
    "load_image",
    "load_image_model",
    "load_text_encoder",
    "make_grid",
    "save_grid",
    "super_resolve",
    "torchvision_dataset",
]
