"""Tokenizer: ids against a naive BPE written here from the merges file, round trips, truncation."""

from __future__ import annotations

import gzip
import html
import random
from pathlib import Path

import ftfy
import pytest
import regex
import torch

import irra_dist
from irra_dist.tokenizer import (
    CONTEXT_LENGTH,
    EOT_ID,
    MASK_ID,
    SOT_ID,
    VOCAB_SIZE,
    SimpleTokenizer,
    TokenizerError,
    default_tokenizer,
    tokenize,
)

BPE_FILE = Path(irra_dist.__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"


# ------------------------------------------------------------------------------------------------
# Independent reference: vocabulary and BPE written from the file format, not from the module.


def _reference_vocab():
    printable = sorted(set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256)))
    others = [b for b in range(256) if b not in printable]
    char_of = {b: chr(b) for b in printable}
    char_of.update({b: chr(256 + n) for n, b in enumerate(others)})
    order = printable + others
    lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:48895]]
    vocab = [char_of[b] for b in order] + [char_of[b] + "</w>" for b in order]
    vocab += ["".join(m) for m in merges]
    ids = {tok: i for i, tok in enumerate(vocab)}
    ranks = {m: i for i, m in enumerate(merges)}
    return ids, ranks, merges, char_of


REF_IDS, REF_RANKS, REF_MERGES, REF_CHAR = _reference_vocab()


def _naive_bpe_ids(word: str) -> list[int]:
    """Lowest-rank adjacent pair merged first, one occurrence at a time, scanning left to right."""
    symbols = [REF_CHAR[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    while True:
        best = None
        for k in range(len(symbols) - 1):
            rank = REF_RANKS.get((symbols[k], symbols[k + 1]))
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, k)
        if best is None:
            break
        k = best[1]
        symbols[k:k + 2] = [symbols[k] + symbols[k + 1]]
    return [REF_IDS[s] for s in symbols]


def _clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return regex.sub(r"\s+", " ", text).strip().lower()


def _no_space(text: str) -> str:
    return regex.sub(r"\s+", "", text)


WORDS = ("a man woman person wearing red blue black white shirt jacket pants jeans shoes carrying bag "
         "backpack walking hair long short glasses hat dress skirt holding umbrella phone striped "
         "T-shirt sneakers grey-ish ponytail").split()
ODD = ["café", "naïve", "Ångström", "日本語の服", "🙂👜", "&amp;", "&amp;amp;", "&quot;hi&quot;", "&lt;b&gt;",
       "&#39;", "jekyll", "Jekyll's", "JEKYLL", "don't", "she'll", "it's", "1990s", "3/4", "$20", "...",
       "!!!", "(left)", "—", "ﬁne", "Straße", "İstanbul", "x\u00a0y", "tab\there", "new\nline",
       "Ã©", "<|mask|>", "<b>", "''", "@#%^&*"]


def _captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([1, 3, 8, 15, 30]) if i % 10 else rng.choice([60, 90, 120])
        parts = [rng.choice(WORDS) if rng.random() < 0.75 else rng.choice(ODD) for _ in range(length)]
        text = " ".join(parts)
        if rng.random() < 0.3:
            text = text.capitalize() + rng.choice([".", "!", " .", ",", ""])
        if rng.random() < 0.2:
            text = "  " + text.replace(" ", "   ", 2) + "  "
        out.append(text)
    return out


CAPTIONS = _captions(300)


# ------------------------------------------------------------------------------------------------


def test_constants_follow_from_the_merges_file():
    # 512 byte symbols + 48894 merges, minus the popped last merge, plus mask/SOT/EOT.
    assert "".join(REF_MERGES[-1]) == "jekyll</w>"
    assert 512 + len(REF_MERGES) - 1 + 3 == VOCAB_SIZE == 49408
    assert (MASK_ID, SOT_ID, EOT_ID, CONTEXT_LENGTH) == (49405, 49406, 49407, 77)
    tok = default_tokenizer()
    assert tok.vocab_size == VOCAB_SIZE
    assert tok.encoder["<|mask|>"] == MASK_ID
    assert tok.encoder["<|startoftext|>"] == SOT_ID
    assert tok.encoder["<|endoftext|>"] == EOT_ID


def test_hand_computed_ids():
    # 'a' is byte 97, the 65th printable byte (from '!' = 33), and '</w>' variants start at 256.
    assert default_tokenizer().encode("a") == [256 + 97 - 33] == [320]
    assert default_tokenizer().encode("!") == [256 + 0]
    # Pad id 0 is "!" without </w>: "!a" never splits that way, but the id is the first byte symbol.
    assert default_tokenizer().decoder[0] == "!"


@pytest.mark.parametrize("word", ["person", "wearing", "backpack", "ponytail", "sneakers", "umbrella",
                                  "striped", "café", "日本語", "antidisestablishmentarianism", "zzzzzz",
                                  "aaaaa", "mississippi", "🙂"])
def test_word_ids_match_naive_bpe(word):
    assert default_tokenizer().encode(word) == _naive_bpe_ids(word)


def test_caption_ids_match_naive_bpe():
    pattern = regex.compile(r"""<\|startoftext\|>|<\|mask\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                            r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    tok = default_tokenizer()
    for caption in CAPTIONS[:80]:
        expected = []
        for word in pattern.findall(_clean(caption)):
            if word == "<|mask|>":
                expected.append(MASK_ID)
            elif word == "jekyll":
                # The dropped last merge is never applied: the word stays as that merge's two parts.
                expected.extend(REF_IDS[part] for part in REF_MERGES[-1])
            else:
                expected.extend(_naive_bpe_ids(word))
        assert tok.encode(caption) == expected, caption


def test_jekyll_tokenises():
    ids = tokenize("Mr Jekyll and jekyll's coat")
    eot = int((ids == EOT_ID).nonzero()[0])
    assert ids.max().item() == EOT_ID and eot == 9  # each "jekyll" takes two ids
    assert default_tokenizer().decode(ids[1:eot]).split() == ["mr", "jekyll", "and", "jekyll", "'s", "coat"]


def test_batch_ids_range_roundtrip_and_truncation():
    tok = default_tokenizer()
    ids = tokenize(CAPTIONS)
    assert ids.shape == (len(CAPTIONS), CONTEXT_LENGTH) and ids.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < VOCAB_SIZE
    assert (ids[:, 0] == SOT_ID).all()
    truncated = 0
    for row, caption in zip(ids, CAPTIONS):
        bpe = tok.encode(caption)
        eot = int((row == EOT_ID).nonzero()[0])
        if len(bpe) + 2 <= CONTEXT_LENGTH:
            assert eot == len(bpe) + 1
            assert (row[eot + 1:] == 0).all()
            assert _no_space(tok.decode(row[1:eot])) == _no_space(_clean(caption))
        else:
            truncated += 1
            assert eot == CONTEXT_LENGTH - 1
            assert row[1:-1].tolist() == bpe[:CONTEXT_LENGTH - 2]
    assert truncated >= 10
    # The batch path gives the same rows as one caption at a time.
    for k in (0, 9, 10, 123):
        assert torch.equal(tokenize(CAPTIONS[k]), ids[k])


def test_single_caption_shape_and_padding():
    ids = tokenize("a person")
    assert ids.shape == (CONTEXT_LENGTH,)
    assert ids[:4].tolist() == [SOT_ID, 320, REF_IDS["person</w>"], EOT_ID]
    assert (ids[4:] == 0).all()
    assert tokenize("").tolist()[:3] == [SOT_ID, EOT_ID, 0]
    assert tokenize(["a", "b"], context_length=5).shape == (2, 5)


def test_mask_literal_and_html_entities():
    tok = default_tokenizer()
    assert tok.encode("a <|MASK|> bag") == [320, MASK_ID, REF_IDS["bag</w>"]]
    assert tok.encode("black &amp;amp; white") == tok.encode("black & white")


def test_errors():
    with pytest.raises(TokenizerError, match="truncate=True"):
        tokenize("a " * 100, truncate=False)
    with pytest.raises(TokenizerError, match="context_length"):
        tokenize("a", context_length=1)
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab"):
        SimpleTokenizer("/nonexistent/merges.txt.gz")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        default_tokenizer().decode([VOCAB_SIZE])
