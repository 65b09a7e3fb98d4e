"""MLM masking of tokenised captions, as the official IRRA dataset does it (IRRA_SPEC 3.3).

Every id in ``1 .. MASK_ID-1`` (not padding, mask, SOT or EOT) is selected with probability 0.15; a selected
id becomes ``MASK_ID`` (80%), a uniformly random id in ``1 .. MASK_ID-1`` (10%), or stays (10%), and its label
is the original id. Unselected positions get label 0, which the MLM loss ignores. A caption where nothing
was selected has position 1 masked instead, so every caption contributes to the loss.

The official code draws from Python's global RNG and writes into the caption in place (so SDM/ID also see
the masked caption); here the draws come from an explicit ``torch.Generator`` seeded per sample, and the
input is never modified: the data pipeline reproduces the aliasing explicitly.
"""

from __future__ import annotations

import torch

from irra_dist.tokenizer import MASK_ID

SELECT_PROB = 0.15
"""Probability that a candidate id is selected for prediction."""
MASK_FRACTION = 0.8
"""Share of the selected ids replaced by MASK_ID."""
RANDOM_FRACTION = 0.1
"""Share of the selected ids replaced by a random id (the rest are kept)."""


def mask_tokens(caption_ids: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the MLM corruption of one caption ``[L]`` or of a batch ``[N, L]``.

    Args:
        caption_ids: integer ids from :func:`irra_dist.tokenizer.tokenize` (not modified); L >= 2.
        generator: source of randomness (on the ids' device); the global generator when None.

    Returns:
        ``(masked_ids, labels)``, LongTensors shaped like `caption_ids`; labels are the original ids at the
        selected positions and 0 elsewhere.

    Raises:
        ValueError: `caption_ids` is not 1-D or 2-D, not integer, or shorter than 2.
    """
    if caption_ids.dim() not in (1, 2) or caption_ids.dtype.is_floating_point or caption_ids.shape[-1] < 2:
        raise ValueError(f"mask_tokens expects integer token ids shaped [L] or [N, L] with L >= 2, got "
                         f"{caption_ids.dtype} {tuple(caption_ids.shape)}: pass the output of tokenize()")
    ids = caption_ids.long()
    device = ids.device
    # One uniform per position decides both selection and what happens to a selected id, as the
    # official `prob < 0.15`, then `prob / 0.15 < 0.8 / < 0.9` chain does.
    u = torch.rand(ids.shape, generator=generator, device=device)
    random_ids = torch.randint(1, MASK_ID, ids.shape, generator=generator, device=device)

    candidate = (ids > 0) & (ids < MASK_ID)
    selected = candidate & (u < SELECT_PROB)
    r = u / SELECT_PROB
    to_mask = selected & (r < MASK_FRACTION)
    to_random = selected & (r >= MASK_FRACTION) & (r < MASK_FRACTION + RANDOM_FRACTION)

    masked = torch.where(to_mask, MASK_ID, torch.where(to_random, random_ids, ids))
    labels = torch.where(selected, ids, 0)

    # Forced fallback: a caption with nothing selected predicts position 1 (whatever id it holds).
    none = ~selected.any(dim=-1)
    masked[..., 1] = torch.where(none, MASK_ID, masked[..., 1])
    labels[..., 1] = torch.where(none, ids[..., 1], labels[..., 1])
    return masked, labels
