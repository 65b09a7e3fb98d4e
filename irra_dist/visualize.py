"""Retrieval grids as PNG: one row per text query, its top-k gallery images with rank and score.

Used by ``irra-search`` (free-text search) and by the trainer, which renders a few fixed test queries
after each evaluation (:func:`save_retrieval_examples`) and logs the PNG to W&B.

The layout is fully determined by :class:`GridStyle` and the inputs (number of rows, the largest k,
whether any hit carries a label), so the picture size is predictable::

    cell   = (thumb_w + 2 * frame) x (thumb_h + 2 * frame)
    width  = max(min_width, 2 * margin + k * cell_w + (k - 1) * gap)
    row_h  = query_lines * line_height + text_gap + cell_h + label_lines * line_height
    height = 2 * margin + rows * row_h + (rows - 1) * row_gap

``label_lines`` is 3 when any hit has a label (e.g. "pid 12"), otherwise 2 (rank, score).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from PIL import Image, ImageDraw, ImageFont, ImageOps

from irra_dist.fileio import atomic_write

if TYPE_CHECKING:
    import torch

# torch is imported only by the functions that take tensors: drawing a grid (the ONNX query path of
# irra-search --index) must not load the training stack.

logger = logging.getLogger(__name__)

GREEN = (0, 160, 60)
RED = (210, 30, 30)
GREY = (170, 170, 170)
BACKGROUND = (255, 255, 255)
THUMB_BACKGROUND = (228, 228, 228)
TEXT = (20, 20, 20)
ELLIPSIS = "…"


class VisualizeError(ValueError):
    """Inputs that cannot be drawn; the message names the problem and the fix."""


class Hit(NamedTuple):
    """One retrieved gallery image."""

    image: Image.Image
    score: float
    correct: bool | None = None
    """True/False when the query's and the image's pids are known (green/red frame); None: grey frame."""
    label: str = ""
    """An optional third line under the thumbnail, e.g. ``"pid 12"`` or a file name."""


class QueryRow(NamedTuple):
    """A query text and its ranked hits (best first)."""

    text: str
    hits: Sequence[Hit]


@dataclass(frozen=True)
class GridStyle:
    """Layout constants of a retrieval grid (pixels)."""

    thumb_size: tuple[int, int] = (128, 48)
    """(height, width) of each thumbnail, like ``model.image_size``; images keep their aspect ratio."""
    frame: int = 3
    """Width of the coloured frame around each thumbnail."""
    gap: int = 6
    """Horizontal space between cells."""
    margin: int = 8
    row_gap: int = 12
    text_gap: int = 4
    """Space between the query text and the thumbnails."""
    line_height: int = 14
    font_size: int = 11
    query_lines: int = 3
    """Lines reserved for the query text; longer text is cut with an ellipsis."""
    min_width: int = 240
    """Narrow grids (small k) are widened so the query text stays readable."""

    def __post_init__(self) -> None:
        if len(self.thumb_size) != 2 or min(self.thumb_size) < 1:
            raise VisualizeError(f"thumb_size must be two positive integers (height, width), "
                                 f"got {self.thumb_size}")
        if self.query_lines < 1:
            raise VisualizeError(f"query_lines must be >= 1, got {self.query_lines}")

    @property
    def cell_size(self) -> tuple[int, int]:
        """(width, height) of a framed thumbnail."""
        return self.thumb_size[1] + 2 * self.frame, self.thumb_size[0] + 2 * self.frame

    def canvas_size(self, num_rows: int, k: int, labelled: bool) -> tuple[int, int]:
        """(width, height) of a grid with `num_rows` rows of at most `k` hits."""
        cell_w, cell_h = self.cell_size
        width = max(self.min_width, 2 * self.margin + k * cell_w + max(k - 1, 0) * self.gap)
        label_lines = 3 if labelled else 2
        row_h = (self.query_lines * self.line_height + self.text_gap + cell_h
                 + label_lines * self.line_height)
        height = 2 * self.margin + num_rows * row_h + max(num_rows - 1, 0) * self.row_gap
        return width, height


# --------------------------------------------------------------------------------------------------
# Text in any script

FONT_FILES = (
    "DejaVuSans.ttf",                                   # Latin, Greek, Cyrillic, Arabic, Hebrew, symbols
    "NotoSans-Regular.ttf",
    "NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf", "NotoSansSC-Regular.otf",  # CJK
    "DroidSansFallbackFull.ttf",
    "Symbola.ttf", "Symbola_hint.ttf", "NotoEmoji-Regular.ttf",                       # emoji (monochrome)
    "unifont.otf", "unifont.ttf", "unifont_upper.otf", "unifont_upper.ttf",          # the rest of Unicode
)
"""Fonts tried in this order for each character (file names, found in the usual font folders). DejaVu Sans
comes with Debian's fonts-dejavu-core (and matplotlib); the others with fonts-noto-cjk, fonts-symbola or
fonts-unifont when installed. Characters no font has fall back to Pillow's built-in font."""


def _font_dirs() -> list[Path]:
    dirs = [Path.home() / ".local/share/fonts", Path.home() / ".fonts", Path("/usr/local/share/fonts"),
            Path("/usr/share/fonts")]
    extra = os.environ.get("IRRA_FONT_DIR")
    if extra:
        dirs.insert(0, Path(extra))
    try:
        import matplotlib

        dirs.append(Path(matplotlib.get_data_path()) / "fonts" / "ttf")
    except ImportError:
        pass
    return [d for d in dirs if d.is_dir()]


@functools.lru_cache(maxsize=1)
def font_chain_files() -> tuple[Path, ...]:
    """The installed files of :data:`FONT_FILES`, in that order (looked up once per process)."""
    found: dict[str, Path] = {}
    for folder in _font_dirs():
        for path in folder.rglob("*"):
            if path.name in FONT_FILES and path.name not in found:
                found[path.name] = path
    return tuple(found[name] for name in FONT_FILES if name in found)


@functools.cache
def _codepoints(path: Path) -> frozenset[int] | None:
    """The characters a font file has glyphs for (its cmap); None when it cannot be read."""
    try:
        from fontTools.ttLib import TTFont

        with TTFont(str(path), fontNumber=0, lazy=True) as font:
            return frozenset(font.getBestCmap() or ())
    except Exception:  # noqa: BLE001 - a damaged or unsupported font is skipped, never fatal
        return None


class TextFont:
    """Measures and draws text with, for each character, the first font of the chain that has its glyph.

    Pillow draws characters its font lacks as empty boxes; one font rarely covers Latin, Cyrillic, CJK and
    emoji together, hence the chain (:data:`FONT_FILES`), ending with Pillow's built-in font.
    """

    def __init__(self, size: int) -> None:
        self.fonts: list[tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, frozenset[int] | None]] = []
        for path in font_chain_files():
            codepoints = _codepoints(path)
            if codepoints is None:
                continue
            try:
                self.fonts.append((ImageFont.truetype(str(path), size), codepoints))
            except OSError:
                continue
        self.fonts.append((ImageFont.load_default(size=size), None))

    def font_for(self, char: str) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        code = ord(char)
        for font, codepoints in self.fonts:
            if codepoints is None or code in codepoints:
                return font
        return self.fonts[-1][0]

    def runs(self, text: str) -> list[tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, str]]:
        """`text` cut into pieces that each use one font."""
        pieces: list[tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont, str]] = []
        for char in text:
            font = pieces[-1][0] if char == " " and pieces else self.font_for(char)
            if pieces and pieces[-1][0] is font:
                pieces[-1] = (font, pieces[-1][1] + char)
            else:
                pieces.append((font, char))
        return pieces

    def getlength(self, text: str) -> float:
        return sum(font.getlength(piece) for font, piece in self.runs(text))

    def draw(self, draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str,
             fill: tuple[int, ...]) -> None:
        x, y = xy
        for font, piece in self.runs(text):
            draw.text((x, y), piece, fill=fill, font=font)
            x += font.getlength(piece)


def _fit(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """`text` cut (with an ellipsis) to at most `width` pixels."""
    if font.getlength(text) <= width:
        return text
    # Longest prefix that fits with the ellipsis: a bisection, since long queries would make a
    # character-by-character search quadratic.
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength(text[:mid] + ELLIPSIS) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + ELLIPSIS


def wrap_text(text: str, font: ImageFont.ImageFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels; at most `max_lines` lines, the last cut with an ellipsis.

    Args:
        text: The text; runs of whitespace count as one space.
        font: The font used to measure it.
        width: Line width in pixels.
        max_lines: The most lines returned.

    Returns:
        The lines (at least one, possibly empty).
    """
    lines: list[str] = []
    current = ""
    words = text.split()
    for i, word in enumerate(words):
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= width or not current:
            current = candidate
            continue
        lines.append(current)
        current = word
        if len(lines) == max_lines:
            # Out of lines: the rest of the text goes on the last line and is cut there.
            lines[-1] = _fit(" ".join([lines[-1], *words[i:]]), font, width)
            return [_fit(line, font, width) for line in lines]
    lines.append(current)
    return [_fit(line, font, width) for line in lines]


def _thumbnail(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` scaled to fit (height, width) `size`, centred on a grey tile of exactly that size."""
    height, width = size
    tile = Image.new("RGB", (width, height), THUMB_BACKGROUND)
    fitted = ImageOps.contain(image.convert("RGB"), (width, height))
    tile.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
    return tile


def _save_png_atomic(image: Image.Image, out_path: Path) -> None:
    atomic_write(out_path, lambda tmp: image.save(tmp, format="PNG"))


def render_retrieval_grid(rows: Sequence[QueryRow | tuple], out_path: str | os.PathLike, *,
                          thumb_size: tuple[int, int] = (128, 48),
                          style: GridStyle | None = None) -> Path:
    """Draw one row per query (wrapped text on top, framed thumbnails below) and save it as a PNG.

    Each thumbnail has its rank and score underneath (and the hit's label, when any hit has one). The
    frame is green for a correct match, red for a wrong one and grey when correctness is unknown.

    Args:
        rows: ``QueryRow(text, hits)`` or plain ``(text, [(image, score, correct[, label]), ...])``.
        out_path: Where the PNG goes; written to a temporary name in the same folder, then renamed.
        thumb_size: (height, width) of the thumbnails; ignored when `style` is given.
        style: All layout constants; defaults to ``GridStyle(thumb_size=thumb_size)``.

    Returns:
        The path written.
    """
    if not rows:
        raise VisualizeError("no query rows to draw: pass at least one (query text, hits) row")
    style = style or GridStyle(thumb_size=tuple(thumb_size))
    rows = [QueryRow(str(text), [Hit(*hit) for hit in hits]) for text, hits in rows]
    k = max(len(row.hits) for row in rows)
    labelled = any(hit.label for row in rows for hit in row.hits)
    width, height = style.canvas_size(len(rows), k, labelled)
    cell_w, cell_h = style.cell_size
    font = TextFont(style.font_size)

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    label_lines = 3 if labelled else 2
    row_h = style.query_lines * style.line_height + style.text_gap + cell_h + label_lines * style.line_height
    text_width = width - 2 * style.margin
    for r, row in enumerate(rows):
        top = style.margin + r * (row_h + style.row_gap)
        if r:
            sep_y = top - style.row_gap // 2
            draw.line([(style.margin, sep_y), (width - style.margin, sep_y)], fill=GREY, width=1)
        for j, line in enumerate(wrap_text(row.text, font, text_width, style.query_lines)):
            font.draw(draw, (style.margin, top + j * style.line_height), line, fill=TEXT)
        cell_top = top + style.query_lines * style.line_height + style.text_gap
        for rank, hit in enumerate(row.hits, start=1):
            left = style.margin + (rank - 1) * (cell_w + style.gap)
            colour = GREY if hit.correct is None else (GREEN if hit.correct else RED)
            draw.rectangle([left, cell_top, left + cell_w - 1, cell_top + cell_h - 1], fill=colour)
            thumb = _thumbnail(hit.image, style.thumb_size)
            canvas.paste(thumb, (left + style.frame, cell_top + style.frame))
            labels = [f"#{rank}", f"{hit.score:.3f}"] + ([hit.label] if labelled else [])
            for j, text in enumerate(labels):
                text = _fit(text, font, cell_w + style.gap)
                x = left + (cell_w - font.getlength(text)) / 2
                font.draw(draw, (x, cell_top + cell_h + j * style.line_height), text, fill=TEXT)
    out_path = Path(out_path)
    _save_png_atomic(canvas, out_path)
    return out_path


# --------------------------------------------------------------------------------------------------
# Trainer hook


@dataclass
class FixedQueries:
    """Queries rendered after every evaluation, fixed for the whole run so the grids are comparable."""

    texts: list[str]
    pids: torch.Tensor
    """LongTensor[Q]: each query's person id."""
    caption_ids: torch.Tensor
    """LongTensor[Q, 77]: the tokenised texts."""
    query_index: torch.Tensor | None = None
    """LongTensor[Q]: each query's position in the evaluation's query list (all captions of the split in
    record order), when it is one of them; lets the trainer reuse the evaluation's text features."""

    def __post_init__(self) -> None:
        counts = {len(self.texts), len(self.pids), len(self.caption_ids)}
        if self.query_index is not None:
            counts.add(len(self.query_index))
        if len(counts) != 1:
            raise VisualizeError(f"FixedQueries needs as many pids ({len(self.pids)}), caption_ids rows "
                                 f"({len(self.caption_ids)}) and query indices as texts ({len(self.texts)})")


GalleryImageLoader = Callable[[Sequence[int]], list[Image.Image]]
"""Returns the PIL images of the given gallery indices, in that order."""


def _no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.no_grad()`` as a decorator that imports torch at call time, not at import."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


@_no_grad
def top_k_matches(text_feats: torch.Tensor, gallery_feats: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity top-k of each text among the gallery images.

    Args:
        text_feats: [Q, D] text features (any norm).
        gallery_feats: [G, D] image features (any norm).
        k: How many to keep; capped at G.

    Returns:
        (scores [Q, k], indices [Q, k]), best first.
    """
    import torch.nn.functional as F

    sims = F.normalize(text_feats.float(), dim=-1) @ F.normalize(gallery_feats.float(), dim=-1).t()
    return sims.topk(min(k, sims.shape[1]), dim=1)


@_no_grad
def save_retrieval_examples(model: torch.nn.Module | None, gallery_feats: torch.Tensor,
                            gallery_pids: torch.Tensor, gallery_images: GalleryImageLoader,
                            queries: FixedQueries, out_path: str | os.PathLike, *, top_k: int = 5,
                            thumb_size: tuple[int, int] = (128, 48),
                            gallery_index: torch.Tensor | None = None,
                            query_feats: torch.Tensor | None = None) -> Path:
    """Render the top-k of a few fixed queries against an evaluation's gallery features (trainer hook).

    Cheap by design: the gallery features are the ones the evaluation just computed, only the top-k images
    are read, and the text tower runs on the few queries only (or not at all, given `query_feats`).

    Args:
        model: The (unwrapped) IRRA model, for ``model.encode_text(queries.caption_ids)``; may be None when
            `query_feats` is given. Under DeepSpeed ZeRO-3 the parameters must be gathered around the call,
            or pass `query_feats` instead.
        gallery_feats: [G, D] image features.
        gallery_pids: [G] their person ids.
        gallery_images: Loads the PIL images of gallery indices (e.g. ``ShardGallery.load_images``).
        queries: The fixed queries.
        out_path: The PNG to write (atomically).
        top_k: Images per query.
        thumb_size: (height, width) of each thumbnail.
        gallery_index: [G] the gallery index of each feature row, when rows were skipped or reordered
            (the evaluation's gathered ``index``); None means row i is gallery image i.
        query_feats: [Q, D] text features of the queries, e.g. the evaluation's rows at
            ``queries.query_index``.

    Returns:
        The path written.
    """
    if len(gallery_feats) != len(gallery_pids) or (gallery_index is not None
                                                   and len(gallery_index) != len(gallery_feats)):
        raise VisualizeError(f"gallery_feats has {len(gallery_feats)} rows but gallery_pids has "
                             f"{len(gallery_pids)} (and gallery_index "
                             f"{'None' if gallery_index is None else len(gallery_index)}): pass one per row")
    if query_feats is None:
        if model is None:
            raise VisualizeError("save_retrieval_examples needs the model or query_feats: pass one of them")
        was_training = model.training
        model.eval()
        query_feats = model.encode_text(queries.caption_ids.to(gallery_feats.device))
        model.train(was_training)
    scores, rows = top_k_matches(query_feats.to(gallery_feats.device), gallery_feats, top_k)
    scores, rows = scores.cpu(), rows.cpu()
    hit_pids = gallery_pids.cpu()[rows]
    correct = hit_pids == queries.pids.cpu().view(-1, 1)
    indices = gallery_index.cpu()[rows] if gallery_index is not None else rows
    # One read for all queries: unique indices, in a stable order.
    wanted = sorted(set(indices.flatten().tolist()))
    images = dict(zip(wanted, gallery_images(wanted)))
    out_rows = []
    for q, text in enumerate(queries.texts):
        hits = [Hit(images[i], s, c, f"pid {p}") for i, s, c, p in
                zip(indices[q].tolist(), scores[q].tolist(), correct[q].tolist(), hit_pids[q].tolist())]
        out_rows.append(QueryRow(f"[pid {int(queries.pids[q])}] {text}", hits))
    return render_retrieval_grid(out_rows, out_path, thumb_size=thumb_size)
