"""The official IRRA image transforms (IRRA_SPEC 3.4), drawing every random number from an explicit generator.

The official code composes torchvision transforms that draw from the global torch RNG, so the augmentation of
a sample depends on which worker made it and what that worker drew before. Here each sample gets its own
``torch.Generator`` (seeded by the data pipeline from the run seed, the epoch and the sample's position), and
the draws follow torchvision's algorithms call for call, in the same order: with a generator seeded like
``torch.manual_seed`` the pixels are bit-identical to the official ``Compose``.

Train, with ``image_aug`` (the official script's ``--img_aug``)::

    Resize((H, W)) bilinear -> RandomHorizontalFlip(0.5) -> Pad(10, fill 0) -> RandomCrop((H, W))
    -> ToTensor -> Normalize(CLIP mean, std) -> RandomErasing(p=0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3),
    value=CLIP mean)

Train without ``image_aug``: Resize -> RandomHorizontalFlip(0.5) -> ToTensor -> Normalize.
Test: Resize -> ToTensor -> Normalize.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FLIP_PROB = 0.5
PAD = 10
"""Pixels of zero padding on every side before the random crop."""
ERASE_PROB = 0.5
ERASE_SCALE = (0.02, 0.4)
"""Range of the erased area as a share of the image area."""
ERASE_RATIO = (0.3, 3.3)
"""Range of the erased box's aspect ratio (h / w), drawn log-uniformly."""
ERASE_ATTEMPTS = 10
"""torchvision tries this many boxes and erases nothing if none fits."""

# Normalisation constants as torchvision's Normalize builds them: float32, broadcast over H and W.
_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
_STD = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
# The official RandomErasing fills with the raw mean, written after normalisation (not zero).
_ERASE_VALUE = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
_LOG_RATIO = torch.log(torch.tensor(ERASE_RATIO))

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


def resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """torchvision's ``Resize((H, W))`` on a PIL image: PIL bilinear (antialiased when shrinking).

    An image that already has the target size comes back as an identical copy, so pre-resized shards give
    the same pixels as resizing at load time.
    """
    height, width = size
    return img.resize((width, height), Image.BILINEAR)


def _to_normalized(hwc: np.ndarray) -> torch.Tensor:
    """ToTensor + Normalize of an ``[H, W, 3]`` uint8 array, with torchvision's operation order."""
    # PIL hands out read-only views; torch wants a writable, C-ordered buffer (a copy only when needed).
    chw = torch.from_numpy(np.require(hwc, requirements=("C", "W"))).permute(2, 0, 1).contiguous()
    return chw.to(torch.float32).div_(255).sub_(_MEAN).div_(_STD)


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    # float32 draw, as torchvision's `torch.empty(1).uniform_(low, high).item()`.
    return torch.empty(1).uniform_(low, high, generator=generator).item()


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(0, high, (1,), generator=generator).item())


def _pad_and_crop(hwc: np.ndarray, top: int, left: int) -> np.ndarray:
    """The ``(H, W)`` window at (top, left) of the image zero-padded by PAD, without building the padding."""
    height, width = hwc.shape[:2]
    out = np.zeros_like(hwc)
    # Window rows top..top+H of the padded image are source rows top-PAD..top-PAD+H.
    src_y0, src_x0 = max(0, top - PAD), max(0, left - PAD)
    src_y1, src_x1 = min(height, top - PAD + height), min(width, left - PAD + width)
    dst_y0, dst_x0 = src_y0 - (top - PAD), src_x0 - (left - PAD)
    out[dst_y0:dst_y0 + src_y1 - src_y0, dst_x0:dst_x0 + src_x1 - src_x0] = hwc[src_y0:src_y1, src_x0:src_x1]
    return out


def random_erasing_box(height: int, width: int,
                       generator: torch.Generator) -> tuple[int, int, int, int] | None:
    """Draw torchvision's ``RandomErasing.get_params`` box (after its p-draw has passed).

    Args:
        height: image height.
        width: image width.
        generator: source of the draws.

    Returns:
        ``(top, left, h, w)`` of the box, or None when none of the 10 attempts fits.
    """
    area = height * width
    for _ in range(ERASE_ATTEMPTS):
        erase_area = area * _uniform(ERASE_SCALE[0], ERASE_SCALE[1], generator)
        log_ratio = torch.empty(1).uniform_(float(_LOG_RATIO[0]), float(_LOG_RATIO[1]), generator=generator)
        aspect = torch.exp(log_ratio).item()
        h = int(round(math.sqrt(erase_area * aspect)))
        w = int(round(math.sqrt(erase_area / aspect)))
        if not (h < height and w < width):
            continue
        top = _randint(height - h + 1, generator)
        left = _randint(width - w + 1, generator)
        return top, left, h, w
    return None


def train_transform(img: Image.Image, generator: torch.Generator, size: tuple[int, int] = (384, 128),
                    image_aug: bool = True) -> torch.Tensor:
    """Apply the official training transform to one image.

    Args:
        img: an RGB PIL image of any size.
        generator: the sample's own generator; consumed in torchvision's draw order (flip, crop, erasing).
        size: output ``(height, width)``.
        image_aug: the full augmentation (flip, pad + crop, erasing); False keeps only the flip.

    Returns:
        Float32 tensor ``[3, H, W]``, CLIP-normalised.
    """
    height, width = size
    hwc = np.asarray(resize(img, size))
    if torch.rand(1, generator=generator).item() < FLIP_PROB:
        hwc = hwc[:, ::-1]
    if not image_aug:
        return _to_normalized(hwc)
    # RandomCrop((H, W)) of the (H + 2 PAD, W + 2 PAD) padded image: never the identity, so always two draws.
    top = _randint(2 * PAD + 1, generator)
    left = _randint(2 * PAD + 1, generator)
    out = _to_normalized(_pad_and_crop(hwc, top, left))
    if torch.rand(1, generator=generator).item() < ERASE_PROB:
        box = random_erasing_box(height, width, generator)
        if box is not None:
            y, x, h, w = box
            out[:, y:y + h, x:x + w] = _ERASE_VALUE
    return out


def test_transform(img: Image.Image, size: tuple[int, int] = (384, 128)) -> torch.Tensor:
    """Apply the official evaluation transform (Resize, ToTensor, Normalize) to one image.

    Args:
        img: an RGB PIL image.
        size: output ``(height, width)``.

    Returns:
        Float32 tensor ``[3, H, W]``, CLIP-normalised.
    """
    return _to_normalized(np.asarray(resize(img, size)))
