"""The one image-size form: a ``(height, width)`` tuple of positive ints, written ``HxW`` on command lines
(whose argparse type, :func:`irra_dist.engine.cli.image_size_arg`, wraps :func:`parse_image_size`).

Imports only the standard library, so the torch-free query path can use it.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence

_HXW = re.compile(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*")


def parse_image_size(value: str | Sequence[int], what: str = "image size") -> tuple[int, int]:
    """``(height, width)`` from ``"HxW"`` text (``"H,W"`` too, as weights files store it) or two integers.

    Args:
        value: the text or the pair.
        what: the name used in the error message (an option or argument name).

    Raises:
        ValueError: one line naming `what`, the value and the form to use.
    """
    if isinstance(value, str):
        match = _HXW.fullmatch(value)
        pair = (int(match.group(1)), int(match.group(2))) if match else None
    else:
        items = list(value) if isinstance(value, Sequence) else []
        integers = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items)
        ok = len(items) == 2 and integers
        pair = (int(items[0]), int(items[1])) if ok else None
    if pair is None or min(pair) < 1:
        raise ValueError(f"cannot read {what} {value!r}: write it as HxW (height x width), e.g. 384x128")
    return pair

