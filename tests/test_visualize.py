"""Retrieval grid rendering and the trainer's retrieval-examples hook (irra_dist.visualize)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from irra_dist.model import build_irra
from irra_dist.tokenizer import tokenize
from irra_dist.visualize import (
    FixedQueries,
    GridStyle,
    Hit,
    QueryRow,
    VisualizeError,
    render_retrieval_grid,
    save_retrieval_examples,
    top_k_matches,
    wrap_text,
)

TINY = dict(embed_dim=32, image_size=(32, 16), patch_size=8, stride_size=8, vision_width=32, vision_layers=1,
            vision_heads=2, text_width=32, text_heads=2, text_layers=1)


def _image(seed: int, size: tuple[int, int] = (96, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _colour(i: int) -> tuple[int, int, int]:
    """A distinct saturated colour per index (never a grey: text and the grey frame are greys)."""
    return (20 + (37 * i) % 200, 230 - (53 * i) % 150, 60 + (91 * i) % 170)


def _solid(i: int, size: tuple[int, int]) -> Image.Image:
    """A solid image of colour i at (height, width) `size`: any resize keeps its colour, so each thumbnail
    can be found in the rendered pixels."""
    return Image.new("RGB", (size[1], size[0]), _colour(i))


def _runs(positions: np.ndarray) -> list[tuple[int, int]]:
    """Sorted integer positions grouped into [start, stop) runs of consecutive values."""
    cuts = np.nonzero(np.diff(positions) > 1)[0]
    starts, ends = np.r_[positions[0], positions[cuts + 1]], np.r_[positions[cuts], positions[-1]]
    return [(int(a), int(b) + 1) for a, b in zip(starts, ends)]


def _rectangles(pixels: np.ndarray, i: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of every block of colour i, each checked to be a solid rectangle."""
    mask = (pixels == _colour(i)).all(-1)
    boxes = []
    for top, bottom in _runs(np.nonzero(mask.any(1))[0]) if mask.any() else []:
        for left, right in _runs(np.nonzero(mask[top:bottom].any(0))[0]):
            assert mask[top:bottom, left:right].all(), f"thumbnail {i} is not a rectangle"
            boxes.append((left, top, right, bottom))
    return boxes


def _thumb_boxes(png: Path, indices: list[int]) -> list[tuple[int, int, int, int]]:
    """The one rectangle of each index's colour in the picture."""
    pixels = np.asarray(Image.open(png).convert("RGB"))
    found = [_rectangles(pixels, i) for i in indices]
    assert [len(f) for f in found] == [1] * len(indices), "each thumbnail must appear exactly once"
    return [f[0] for f in found]


def _frame_width(pixels: np.ndarray, box: tuple[int, int, int, int]) -> tuple[tuple[int, ...], int]:
    """The colour just left of a thumbnail and how many pixels of it lie between the thumbnail and the
    background, walking left, right, up and down (all four must agree)."""
    left, top, right, bottom = box
    colour = tuple(int(v) for v in pixels[top, left - 1])
    widths = set()
    for dx, dy, x, y in ((-1, 0, left - 1, top), (1, 0, right, top), (0, -1, left, top - 1),
                         (0, 1, left, bottom)):
        n = 0
        while tuple(pixels[y + n * dy, x + n * dx]) == colour:
            n += 1
        widths.add(n)
    assert len(widths) == 1, widths
    return colour, widths.pop()


@pytest.mark.parametrize("rows,k,labelled,thumb", [(1, 1, False, (128, 48)), (3, 10, True, (128, 48)),
                                                   (2, 5, False, (64, 24))])
def test_grid_shows_every_hit_framed_in_rank_order_inside_the_picture(
        tmp_path: Path, rows: int, k: int, labelled: bool, thumb: tuple[int, int]) -> None:
    # Images twice the thumbnail size, same aspect: scaled to exactly the thumbnail.
    big = (2 * thumb[0], 2 * thumb[1])
    data = [QueryRow(f"query {r} " + "a long description of a person " * r,
                     [Hit(_solid(r * k + j, big), 1.0 - j / 10, None, "pid 3" if labelled else "")
                      for j in range(k)]) for r in range(rows)]
    out = render_retrieval_grid(data, tmp_path / "sub" / "grid.png", thumb_size=thumb)
    with Image.open(out) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("RGB"))
    height, width = pixels.shape[:2]
    boxes = [_thumb_boxes(out, [r * k + j for j in range(k)]) for r in range(rows)]
    assert all((b[3] - b[1], b[2] - b[0]) == thumb for row in boxes for b in row)
    # A grid: a row's thumbnails side by side at one height and an even pitch, rows evenly spaced below.
    for row in boxes:
        assert len({b[1] for b in row}) == 1
        assert len({b2[0] - b1[0] for b1, b2 in zip(row, row[1:])}) <= 1
        assert all(b2[0] > b1[2] for b1, b2 in zip(row, row[1:]))
    tops = [row[0][1] for row in boxes]
    assert len({t2 - t1 for t1, t2 in zip(tops, tops[1:])}) <= 1 and tops == sorted(tops)
    assert len({b[0] for b in (row[0] for row in boxes)}) == 1  # every row starts at the left margin
    frames = {_frame_width(pixels, b) for row in boxes for b in row}
    assert len(frames) == 1 and next(iter(frames))[1] >= 1  # one grey frame width around every thumbnail
    # Nothing cut off and no canvas wasted: blank margins all round, no more than two text lines below.
    ink_rows = np.nonzero((pixels != 255).any(axis=(1, 2)))[0]
    ink_cols = np.nonzero((pixels != 255).any(axis=(0, 2)))[0]
    assert ink_rows[0] > 0 and ink_cols[0] > 0 and ink_rows[-1] < height - 1 and ink_cols[-1] < width - 1
    assert height - 1 - ink_rows[-1] <= 2 * GridStyle().line_height
    frame = next(iter(frames))[1]
    left_margin, right_margin = boxes[0][0][0] - frame, width - (boxes[0][-1][2] + frame)
    # symmetric, unless the canvas was widened to its minimum width for the query text
    assert right_margin == left_margin or (width == GridStyle().min_width and right_margin > left_margin)
    # written atomically: nothing but the PNG is left in the folder
    assert sorted(p.name for p in out.parent.iterdir()) == ["grid.png"]


def test_frames_are_green_red_or_grey_by_correctness(tmp_path: Path) -> None:
    size = GridStyle().thumb_size
    # plain tuples are accepted as rows and hits
    rows = [("who", [(_solid(1, size), 0.9, True), (_solid(2, size), 0.8, False),
                     (_solid(3, size), 0.7, None)])]
    out = render_retrieval_grid(rows, tmp_path / "g.png")
    img = np.asarray(Image.open(out).convert("RGB"))
    green, red, grey = (_frame_width(img, box)[0] for box in _thumb_boxes(out, [1, 2, 3]))
    assert green[1] > 120 and green[0] < 60 and green[2] < 100
    assert red[0] > 150 and red[1] < 60 and red[2] < 60
    assert grey[0] == grey[1] == grey[2] and 120 < grey[0] < 220


def test_wrap_text_fits_the_width_and_cuts_with_an_ellipsis() -> None:
    font = ImageFont.load_default(size=11)
    text = " ".join(f"word{i}" for i in range(60))
    lines = wrap_text(text, font, 150, 3)
    assert len(lines) == 3
    assert all(font.getlength(line) <= 150 for line in lines)
    assert lines[-1].endswith("…")
    assert " ".join(lines).startswith("word0 word1 word2")
    assert wrap_text("short", font, 150, 3) == ["short"]
    # a single word longer than the line is cut, not overflowing
    (only,) = wrap_text("x" * 200, font, 60, 2)
    assert font.getlength(only) <= 60 and only.endswith("…")


def test_no_rows_is_a_readable_error(tmp_path: Path) -> None:
    with pytest.raises(VisualizeError, match="at least one"):
        render_retrieval_grid([], tmp_path / "g.png")


def _brute_force_topk(text: torch.Tensor, gallery: torch.Tensor, k: int) -> list[list[int]]:
    out = []
    for t in text.double():
        sims = [float((t @ g.double()) / (t.norm() * g.double().norm())) for g in gallery]
        out.append(sorted(range(len(sims)), key=lambda i: -sims[i])[:k])
    return out


def test_top_k_matches_equals_brute_force_cosine() -> None:
    gen = torch.Generator().manual_seed(0)
    text, gallery = torch.randn(5, 16, generator=gen) * 3, torch.randn(40, 16, generator=gen) * 7
    scores, indices = top_k_matches(text, gallery, 7)
    assert indices.tolist() == _brute_force_topk(text, gallery, 7)
    cos = torch.nn.functional.cosine_similarity(text[:, None], gallery[None], dim=-1)
    torch.testing.assert_close(scores, cos.gather(1, indices))
    assert top_k_matches(text, gallery[:3], 10)[1].shape == (5, 3)


def test_retrieval_examples_hook_reads_only_the_top_k_images(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_irra(0, with_mlm=False, **TINY).train()
    gallery_feats = torch.randn(30, 32)
    gallery_pids = torch.arange(30) // 3
    texts = ["a man in a red coat", "a woman with a blue bag", "a child in green"]
    queries = FixedQueries(texts, torch.tensor([0, 4, 9]), tokenize(texts))
    asked: list[list[int]] = []

    def load(indices):
        asked.append(list(indices))
        return [_solid(int(i), GridStyle().thumb_size) for i in indices]

    out = save_retrieval_examples(model, gallery_feats, gallery_pids, load, queries, tmp_path / "ex.png",
                                  top_k=4)
    assert model.training, "the hook must restore the model's mode"
    with torch.no_grad():
        text_feats = model.eval().encode_text(tokenize(texts))
    expected = _brute_force_topk(text_feats, gallery_feats, 4)
    assert len(asked) == 1 and sorted(asked[0]) == sorted({i for row in expected for i in row})
    # The picture shows each query's top 4 in rank order: one row per query, best on the left.
    pixels = np.asarray(Image.open(out).convert("RGB"))
    shown = sorted((top, left, i) for i in asked[0] for left, top, _, _ in _rectangles(pixels, i))
    rows = [[i for _, _, i in sorted(cells, key=lambda c: c[1])]
            for _, cells in itertools.groupby(shown, key=lambda c: c[0])]
    assert rows == expected


def test_retrieval_examples_hook_with_precomputed_text_and_gallery_index(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    gallery_feats, query_feats = torch.randn(12, 8, generator=gen), torch.randn(2, 8, generator=gen)
    # the evaluation skipped gallery images 0 and 5: rows map to these gallery indices
    gallery_index = torch.tensor([1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13])
    gallery_pids = gallery_index // 2
    texts = ["q1", "q2"]
    queries = FixedQueries(texts, torch.tensor([1, 3]), tokenize(texts), torch.tensor([0, 5]))
    asked: list[int] = []

    def load(indices):
        asked.extend(indices)
        return [_image(int(i)) for i in indices]

    save_retrieval_examples(None, gallery_feats, gallery_pids, load, queries, tmp_path / "ex.png", top_k=3,
                            gallery_index=gallery_index, query_feats=query_feats)
    rows = _brute_force_topk(query_feats, gallery_feats, 3)
    assert sorted(asked) == sorted({int(gallery_index[r]) for row in rows for r in row})
    with pytest.raises(VisualizeError, match="model or query_feats"):
        save_retrieval_examples(None, gallery_feats, gallery_pids, load, queries, tmp_path / "x.png")


def test_fixed_queries_must_be_consistent() -> None:
    with pytest.raises(VisualizeError, match="as many"):
        FixedQueries(["a", "b"], torch.tensor([1]), tokenize(["a", "b"]))
