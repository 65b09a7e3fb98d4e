"""Retrieval grid rendering and the trainer's retrieval-examples hook (irra_dist.visualize)."""

from __future__ import annotations

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


def _expected_size(style: GridStyle, rows: int, k: int, labelled: bool) -> tuple[int, int]:
    """The layout written out from the constants, independently of GridStyle.canvas_size."""
    th, tw = style.thumb_size
    cell_w, cell_h = tw + 2 * style.frame, th + 2 * style.frame
    width = max(style.min_width, style.margin * 2 + k * cell_w + (k - 1) * style.gap)
    row_h = style.line_height * style.query_lines + style.text_gap + cell_h + style.line_height * (
        3 if labelled else 2)
    return width, style.margin * 2 + rows * row_h + (rows - 1) * style.row_gap


@pytest.mark.parametrize("rows,k,labelled,thumb", [(1, 1, False, (128, 48)), (3, 10, True, (128, 48)),
                                                   (2, 5, False, (64, 24))])
def test_grid_is_a_png_of_the_layout_size(tmp_path: Path, rows: int, k: int, labelled: bool,
                                          thumb: tuple[int, int]) -> None:
    data = [QueryRow(f"query {r} " + "a long description of a person " * r,
                     [Hit(_image(r * 100 + j), 1.0 - j / 10, None, "pid 3" if labelled else "")
                      for j in range(k)]) for r in range(rows)]
    out = render_retrieval_grid(data, tmp_path / "sub" / "grid.png", thumb_size=thumb)
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size == _expected_size(GridStyle(thumb_size=thumb), rows, k, labelled)
    # written atomically: nothing but the PNG is left in the folder
    assert sorted(p.name for p in out.parent.iterdir()) == ["grid.png"]


def test_frames_are_green_red_or_grey_by_correctness(tmp_path: Path) -> None:
    style = GridStyle()
    # plain tuples are accepted as rows and hits
    rows = [("who", [(_image(1), 0.9, True), (_image(2), 0.8, False), (_image(3), 0.7, None)])]
    out = render_retrieval_grid(rows, tmp_path / "g.png")
    img = np.asarray(Image.open(out).convert("RGB"))
    cell_w = style.thumb_size[1] + 2 * style.frame
    top = style.margin + style.query_lines * style.line_height + style.text_gap
    colours = [tuple(img[top + 1, style.margin + j * (cell_w + style.gap) + 1]) for j in range(3)]
    green, red, grey = colours
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
        return [_image(int(i)) for i in indices]

    out = save_retrieval_examples(model, gallery_feats, gallery_pids, load, queries, tmp_path / "ex.png",
                                  top_k=4)
    assert model.training, "the hook must restore the model's mode"
    with torch.no_grad():
        text_feats = model.eval().encode_text(tokenize(texts))
    expected = _brute_force_topk(text_feats, gallery_feats, 4)
    assert len(asked) == 1 and sorted(asked[0]) == sorted({i for row in expected for i in row})
    with Image.open(out) as img:
        assert img.size == _expected_size(GridStyle(), 3, 4, True)


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
