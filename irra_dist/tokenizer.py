"""CLIP byte-level BPE tokenizer with IRRA's extra ``<|mask|>`` token (IRRA_SPEC 3.2).

The ids are those of the official IRRA code: the 256 byte symbols, their 256 ``</w>`` variants, the first
48,894 CLIP merges minus the last one ('jekyll</w>'), then ``<|mask|>`` = 49405, ``<|startoftext|>`` = 49406
and ``<|endoftext|>`` = 49407. A caption becomes ``[SOT] + bpe + [EOT]``, cut to 77 ids with the last one
forced to EOT, and zero padded (0 is also the id of "!", as in CLIP).
"""

from __future__ import annotations

import functools
import gzip
import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import numpy as np
import regex

if TYPE_CHECKING:
    import torch

# torch is imported only where a tensor is made: the ONNX query path tokenises without the training stack.

VOCAB_SIZE = 49408
MASK_ID = 49405
SOT_ID = 49406
EOT_ID = 49407
CONTEXT_LENGTH = 77

MASK_TOKEN = "<|mask|>"
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"

DEFAULT_BPE_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

# CLIP uses the merges on lines 1 .. 48894 of the file (line 0 is a version header).
_NUM_MERGES = 49152 - 256 - 2

_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|mask\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
_NO_RANK = float("inf")


class TokenizerError(ValueError):
    """A caption or vocabulary file that cannot be used; the message names the fix."""


@functools.lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character (CLIP's reversible byte alphabet).

    Printable latin-1 bytes map to themselves; the others (control characters, space, ...) map to
    code points from 256 upwards, so BPE never sees whitespace or control characters.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clean_text(text: str) -> str:
    """Clean a caption as the official tokenizer does before BPE.

    ftfy repair, HTML unescaping twice (captions hold double-escaped entities such as ``&amp;amp;``),
    whitespace collapsed to single spaces, stripped, lower-cased.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _WHITESPACE.sub(" ", text.strip()).strip().lower()


class SimpleTokenizer:
    """CLIP BPE tokenizer producing the official IRRA ids.

    Args:
        bpe_path: gzipped merges file (CLIP's ``bpe_simple_vocab_16e6.txt.gz``); defaults to the copy
            shipped in the package.

    Deviation from the official code: the dropped 'jekyll</w>' merge is also removed from the merge ranks,
    so a caption containing "jekyll" tokenises (as 'jek' + 'yll</w>') instead of raising KeyError. Every
    caption the official tokenizer accepts gets the same ids.
    """

    def __init__(self, bpe_path: str | Path = DEFAULT_BPE_PATH) -> None:
        bpe_path = Path(bpe_path)
        if not bpe_path.is_file():
            raise FileNotFoundError(f"BPE merges file not found: {bpe_path} (pass the path of CLIP's "
                                    "bpe_simple_vocab_16e6.txt.gz or use the packaged default)")
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:_NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise TokenizerError(f"{bpe_path} is not a CLIP BPE merges file (expected {_NUM_MERGES} merge "
                                 "lines of two symbols): use CLIP's bpe_simple_vocab_16e6.txt.gz")
        # The official vocabulary pops the last merge to make room for <|mask|>; drop it from the ranks
        # too so that it is never applied (see the class docstring).
        merges = merges[:-1]

        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        # bytes.decode("latin-1") maps each byte to the code point of the same value, so str.translate
        # with the byte map converts a whole word at C speed.
        self._byte_table = dict(self.byte_encoder)
        base = list(self.byte_encoder.values())
        vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
        vocab += [MASK_TOKEN, SOT_TOKEN, EOT_TOKEN]
        if len(vocab) != VOCAB_SIZE:
            raise TokenizerError(f"vocabulary built from {bpe_path} has {len(vocab)} entries, expected "
                                 f"{VOCAB_SIZE}: use CLIP's bpe_simple_vocab_16e6.txt.gz")
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        # Word (in byte alphabet) -> its ids; special tokens are never split.
        self._cache: dict[str, tuple[int, ...]] = {
            tok: (self.encoder[tok],) for tok in (MASK_TOKEN, SOT_TOKEN, EOT_TOKEN)}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> list[str]:
        """Split one word (already in the byte alphabet) into BPE symbols, lowest merge rank first."""
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda p: ranks.get(p, _NO_RANK))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            ids = tuple(self.encoder[s] for s in self.bpe(word))
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Clean `text` and return its BPE ids, without SOT/EOT."""
        ids: list[int] = []
        for word in _PATTERN.findall(clean_text(text)):
            ids.extend(self._word_ids(word.encode("utf-8").decode("latin-1").translate(self._byte_table)))
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """Turn ids back into text; each word is followed by a space (CLIP's ``</w>`` marker).

        Raises:
            TokenizerError: an id outside ``[0, VOCAB_SIZE)``.
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        try:
            text = "".join(self.decoder[int(i)] for i in ids)
        except KeyError as err:
            raise TokenizerError(f"token id {err.args[0]} is outside the vocabulary [0, {VOCAB_SIZE}): "
                                 "decode ids produced by this tokenizer") from None
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> SimpleTokenizer:
    """The process-wide tokenizer over the packaged merges (built once, about a second)."""
    return SimpleTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: bool = True, *,
             tokenizer: SimpleTokenizer | None = None) -> torch.Tensor:
    """Tokenise captions into fixed-length id rows as the official IRRA ``tokenize``.

    Args:
        texts: one caption or a list of captions.
        context_length: row length; ids past it are cut and the last kept id is set to EOT.
        truncate: if False, a caption longer than `context_length` is an error instead.
        tokenizer: tokenizer to use; defaults to :func:`default_tokenizer`.

    Returns:
        LongTensor ``[context_length]`` for a str, ``[N, context_length]`` for a list, zero padded.

    Raises:
        TokenizerError: a caption is too long and `truncate` is False, or `context_length` < 2.
    """
    import torch

    return torch.from_numpy(tokenize_numpy(texts, context_length, truncate, tokenizer=tokenizer))


def tokenize_numpy(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: bool = True, *,
                   tokenizer: SimpleTokenizer | None = None) -> np.ndarray:
    """:func:`tokenize` as an int64 numpy array, without importing torch (the ONNX query path)."""
    if context_length < 2:
        raise TokenizerError(f"context_length must be >= 2 to hold SOT and EOT, got {context_length}")
    tok = tokenizer or default_tokenizer()
    single = isinstance(texts, str)
    captions = [texts] if single else list(texts)
    out = np.zeros((len(captions), context_length), dtype=np.int64)
    for row, caption in enumerate(captions):
        ids = [SOT_ID, *tok.encode(caption), EOT_ID]
        if len(ids) > context_length:
            if not truncate:
                raise TokenizerError(f"caption {row} has {len(ids)} tokens, more than context_length "
                                     f"{context_length}: shorten it or pass truncate=True")
            ids = ids[:context_length]
            ids[-1] = EOT_ID
        out[row, :len(ids)] = ids
    return out[0] if single else out
