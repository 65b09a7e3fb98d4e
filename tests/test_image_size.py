"""The one image-size form (irra_dist.image_size): HxW on command lines, (height, width) everywhere else."""

from __future__ import annotations

import numpy as np
import pytest

from irra_dist.engine.build_shards_cli import _arg_parser as build_parser
from irra_dist.engine.cli import eval_parser
from irra_dist.engine.search_cli import gallery_arg_parser as search_parser
from irra_dist.engine.search_cli import index_arg_parser as query_parser
from irra_dist.image_size import parse_image_size


@pytest.mark.parametrize("value", ["384x128", " 384 X 128 ", "384,128", (384, 128), [384, 128],
                                   (np.int64(384), np.int64(128))])
def test_accepted_forms_give_the_same_tuple(value) -> None:
    size = parse_image_size(value)
    assert size == (384, 128) and type(size) is tuple and all(type(v) is int for v in size)


@pytest.mark.parametrize("value", ["384-128", "384x", "0x128", "384x128x3", "", (384,), (384, 128.0),
                                   (True, 128), "-1x5"])
def test_bad_sizes_are_one_line_naming_the_form(value) -> None:
    with pytest.raises(ValueError, match=r"^cannot read pre_resize .*: write it as HxW") as err:
        parse_image_size(value, "pre_resize")
    assert "\n" not in str(err.value)


def test_every_command_line_reads_hxw_alike(capsys: pytest.CaptureFixture) -> None:
    evaluate = eval_parser().parse_args(["run", "--image-size", "64x32"])
    search = search_parser().parse_args(["--run", "r", "--gallery", "g", "--query", "q",
                                         "--image-size", "64x32", "--thumb-size", "40x20"])
    query = query_parser().parse_args(["--index", "i", "--query", "q", "--thumb-size", "40x20"])
    build = build_parser().parse_args(["--dataset", "cuhk", "--pre-resize", "64x32"])
    assert evaluate.image_size == search.image_size == build.pre_resize == (64, 32)
    assert search.thumb_size == query.thumb_size == (40, 20)
    with pytest.raises(SystemExit):
        eval_parser().parse_args(["run", "--image-size", "64", "32"])  # the old two-number form
    assert "write it as HxW" in capsys.readouterr().err
