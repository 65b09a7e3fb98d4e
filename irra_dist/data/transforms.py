"""The official IRRA image transforms (IRRA_SPEC 3.4): torchvision's own, with the draws fixed per sample.

The official code composes torchvision transforms that draw from the global torch RNG, so the augmentation of
a sample depends on which worker made it and what that worker drew before. Here the same torchvision
``Compose`` runs with the global CPU generator seeded by the sample's own seed (the data pipeline derives it
from the run seed, the epoch and the sample's position) inside ``torch.random.fork_rng``: the pixels are the
official ``Compose``'s after ``torch.manual_seed(seed)``, and the caller's random stream is left untouched.

Train, with ``image_aug`` (the official script's ``--img_aug``)::

    Resize((H, W)) bilinear -> RandomHorizontalFlip(0.5) -> Pad(10, fill 0) -> RandomCrop((H, W))
    -> ToTensor -> Normalize(CLIP mean, std) -> RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3),
    value=CLIP mean)

Train without ``image_aug``: Resize -> RandomHorizontalFlip(0.5) -> ToTensor -> Normalize.
Test: Resize -> ToTensor -> Normalize.
"""

from __future__ import annotations

import functools
import io

import torch
from PIL import Image
from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD = 10
"""Pixels of zero padding on every side before the random crop."""
ERASE_SCALE = (0.02, 0.4)
"""Range of the erased area as a share of the image area (probability and aspect ratio: torchvision's)."""

# What a corrupt or truncated image raises while PIL opens or decodes it.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, fully loaded.

    Args:
        data: the bytes of a JPEG, PNG or any format PIL reads.

    Returns:
        The image converted to RGB, as the official ``read_image`` does.

    Raises:
        OSError, ValueError, SyntaxError, EOFError: the bytes are not a readable image (see
            :data:`DECODE_ERRORS`). Truncated images are errors here, not grey-filled.
    """
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


@functools.cache
def _compose(size: tuple[int, int], kind: str) -> T.Compose:
    """The official transform `kind` ("aug", "flip" or "test") for output ``(H, W)`` `size`."""
    head = [T.Resize(size)]  # PIL bilinear; an image already of `size` comes back as an identical copy
    # In place: ToTensor made a fresh tensor, so the same values without two copies (about 10 % faster).
    tail = [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD, inplace=True)]
    if kind == "test":
        return T.Compose(head + tail)
    head.append(T.RandomHorizontalFlip(0.5))
    if kind == "flip":
        return T.Compose(head + tail)
    # The official RandomErasing fills with the raw mean, written after normalisation (not zero).
    return T.Compose([*head, T.Pad(PAD), T.RandomCrop(size), *tail,
                      T.RandomErasing(scale=ERASE_SCALE, value=CLIP_MEAN, inplace=True)])


def train_transform(img: Image.Image, seed: int, size: tuple[int, int] = (384, 128),
                    image_aug: bool = True) -> torch.Tensor:
    """Apply the official training transform to one image, its random draws fixed by `seed`.

    Args:
        img: an RGB PIL image of any size.
        seed: the sample's seed; the result equals the official ``Compose`` after ``torch.manual_seed(seed)``.
        size: output ``(height, width)``.
        image_aug: the full augmentation (flip, pad + crop, erasing); False keeps only the flip.

    Returns:
        Float32 tensor ``[3, H, W]``, CLIP-normalised.
    """
    transform = _compose(tuple(size), "aug" if image_aug else "flip")
    # torchvision draws from the global CPU generator only. Not torch.manual_seed: that also reseeds CUDA
    # generators, which fork_rng(devices=[]) would not restore. Fine in a process or the training thread.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform(img)


def test_transform(img: Image.Image, size: tuple[int, int] = (384, 128)) -> torch.Tensor:
    """Apply the official evaluation transform (Resize, ToTensor, Normalize) to one image.

    Args:
        img: an RGB PIL image.
        size: output ``(height, width)``.

    Returns:
        Float32 tensor ``[3, H, W]``, CLIP-normalised.
    """
    return _compose(tuple(size), "test")(img)
