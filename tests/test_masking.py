"""MLM masking: rates, the forced-mask rule, determinism, special ids, no mutation."""

from __future__ import annotations

import pytest
import torch

from irra_dist.masking import mask_tokens
from irra_dist.tokenizer import EOT_ID, MASK_ID, SOT_ID


def _random_captions(n: int, seed: int = 0, min_words: int = 5) -> torch.Tensor:
    """[n, 77] rows shaped like tokenised captions: SOT, word ids (a few MASK_ID), EOT, zero padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_words, 61, (n,), generator=g)
    words = torch.randint(1, MASK_ID, (n, 77), generator=g)
    pos = torch.arange(77)
    ids = torch.where(pos <= lengths[:, None], words, 0)
    ids[:, 0] = SOT_ID
    ids[torch.arange(n), lengths + 1] = EOT_ID
    literal_mask = torch.rand(n, 77, generator=g) < 0.02  # "<|mask|>" typed in a caption
    ids = torch.where(literal_mask & (pos > 1) & (pos <= lengths[:, None]), MASK_ID, ids)
    return ids


def test_rates_over_10000_captions_one_at_a_time():
    # >= 25 words per caption: the forced-mask rule (0.85**25 < 2% of captions, one id each) then moves
    # the rates by well under a tenth of a point.
    captions = _random_captions(10_000, min_words=25)
    masked, labels = [], []
    for i, row in enumerate(captions):
        m, lab = mask_tokens(row, torch.Generator().manual_seed(1000 + i))
        masked.append(m)
        labels.append(lab)
    masked, labels = torch.stack(masked), torch.stack(labels)

    candidate = (captions > 0) & (captions < MASK_ID)
    selected = labels != 0
    assert not selected[~candidate].any()
    assert abs(selected[candidate].float().mean().item() - 0.15) < 0.01
    sel_masked = masked[selected]
    sel_orig = captions[selected]
    to_mask = (sel_masked == MASK_ID).float().mean().item()
    kept = (sel_masked == sel_orig).float().mean().item()
    replaced = ((sel_masked != MASK_ID) & (sel_masked != sel_orig)).float().mean().item()
    assert abs(to_mask - 0.80) < 0.01
    assert abs(replaced - 0.10) < 0.01
    assert abs(kept - 0.10) < 0.01
    # Labels are the original ids; unselected positions are untouched.
    assert torch.equal(labels[selected], captions[selected])
    assert torch.equal(masked[~selected], captions[~selected])
    # Random replacements are regular ids.
    repl = sel_masked[(sel_masked != MASK_ID) & (sel_masked != sel_orig)]
    assert repl.min() >= 1 and repl.max() < MASK_ID


def test_rates_batched_match_naive_per_position_rates():
    captions = _random_captions(10_000, seed=1, min_words=25)
    masked, labels = mask_tokens(captions, torch.Generator().manual_seed(7))
    candidate = (captions > 0) & (captions < MASK_ID)
    n_sel = (labels != 0).sum().item()
    assert abs(n_sel / candidate.sum().item() - 0.15) < 0.01
    sel = labels != 0
    assert abs((masked[sel] == MASK_ID).float().mean().item() - 0.8) < 0.01


def test_special_ids_never_selected():
    captions = _random_captions(2000, seed=2)
    special = (captions == 0) | (captions >= MASK_ID)
    special[:, 1] = False  # position 1 is the forced fallback; it holds a regular word here
    for seed in range(3):
        masked, labels = mask_tokens(captions, torch.Generator().manual_seed(seed))
        assert (labels[special] == 0).all()
        assert torch.equal(masked[special], captions[special])


def test_forced_mask_at_position_one():
    caption = torch.zeros(77, dtype=torch.long)
    caption[:4] = torch.tensor([SOT_ID, 1234, 567, EOT_ID])
    forced_like = 0
    for seed in range(300):
        masked, labels = mask_tokens(caption, torch.Generator().manual_seed(seed))
        assert labels.ne(0).any(), "every caption must contribute a label"
        assert labels[3:].eq(0).all() and labels[0] == 0
        if labels[2] == 0:
            # Nothing selected at 2, so position 1 carries a label: drawn (15%) or forced (the rest).
            assert labels[1] == 1234
            forced_like += int(masked[1] == MASK_ID)
    # P(label at 1 | none at 2) = 1 and P(mask at 1 | none at 2) = 0.85 + 0.15 * 0.8 = 0.97.
    assert forced_like > 0.9 * 300 * 0.85


def test_forced_mask_on_empty_caption_masks_eot_like_the_official_code():
    caption = torch.zeros(77, dtype=torch.long)
    caption[:2] = torch.tensor([SOT_ID, EOT_ID])
    masked, labels = mask_tokens(caption, torch.Generator().manual_seed(0))
    assert masked[:3].tolist() == [SOT_ID, MASK_ID, 0]
    assert labels[:3].tolist() == [0, EOT_ID, 0] and labels[2:].eq(0).all()


def test_every_row_of_a_batch_has_a_label():
    captions = torch.zeros(500, 77, dtype=torch.long)
    captions[:, 0], captions[:, 1], captions[:, 2] = SOT_ID, 42, EOT_ID  # one candidate each
    masked, labels = mask_tokens(captions, torch.Generator().manual_seed(3))
    assert ((labels != 0).sum(1) == 1).all()
    assert (labels[:, 1] == 42).all()
    # About 85% of rows hit the forced rule and must be MASK_ID; the rest follow 80/10/10.
    assert (masked[:, 1] == MASK_ID).float().mean() > 0.9


def test_deterministic_and_input_untouched():
    captions = _random_captions(64, seed=4)
    before = captions.clone()
    a = mask_tokens(captions, torch.Generator().manual_seed(11))
    b = mask_tokens(captions, torch.Generator().manual_seed(11))
    c = mask_tokens(captions, torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(captions, before)
    single = mask_tokens(captions[5], torch.Generator().manual_seed(11))
    assert single[0].shape == (77,) and single[0].dtype == torch.long


def test_bad_input():
    with pytest.raises(ValueError, match="tokenize"):
        mask_tokens(torch.zeros(77))
    with pytest.raises(ValueError, match="tokenize"):
        mask_tokens(torch.zeros(2, 3, 77, dtype=torch.long))
