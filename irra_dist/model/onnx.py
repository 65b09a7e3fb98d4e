"""Export IRRA's two towers to ONNX, checked against PyTorch.

``image_tower.onnx`` maps ``images [B, 3, H, W]`` float32 (CLIP-normalised, as the test transform gives)
to ``features [B, D]``; ``text_tower.onnx`` maps ``caption_ids [B, 77]`` int64 (the tokenizer's rows) to
``features [B, D]``. The batch dimension is dynamic. These are the global features that evaluation and search
rank by (``IRRA.encode_image`` / ``encode_text``), so an index built with PyTorch can be queried with
onnxruntime (:mod:`irra_dist.retrieval.onnx_runtime`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from irra_dist.model.clip import set_attn_impl
from irra_dist.model.irra import IRRA

IMAGE_TOWER_FILE = "image_tower.onnx"
TEXT_TOWER_FILE = "text_tower.onnx"
ONNX_META_FILE = "onnx.json"
OPSET = 17
FP32_TOLERANCE = 1e-4
"""Largest absolute difference from PyTorch allowed at export (fp32 features)."""


class OnnxExportError(ValueError):
    """The export failed its check against PyTorch, or cannot be written; one line naming the fix."""


class _ImageTower(nn.Module):
    def __init__(self, model: IRRA) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)


class _TextTower(nn.Module):
    def __init__(self, model: IRRA) -> None:
        super().__init__()
        self.model = model

    def forward(self, caption_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(caption_ids)


def _sample_inputs(model: IRRA, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and caption rows of `batch` items: random pixels, captions of random tokens ended by EOT."""
    gen = torch.Generator().manual_seed(seed)
    height, width = model.base_model.visual.image_size
    images = torch.randn(batch, 3, height, width, generator=gen)
    context = model.base_model.context_length
    ids = torch.zeros(batch, context, dtype=torch.int64)
    for row in range(batch):
        length = int(torch.randint(3, context + 1, (1,), generator=gen))
        ids[row, 0] = 49406  # SOT
        ids[row, 1:length - 1] = torch.randint(0, 49405, (length - 2,), generator=gen)
        ids[row, length - 1] = 49407  # EOT: the largest id, where the text feature is read
    return images, ids


def max_abs_difference(model: IRRA, out_dir: str | os.PathLike, *, batch: int = 3, seed: int = 1,
                       towers: tuple[str, ...] = ("image", "text")) -> dict[str, float]:
    """Largest |onnxruntime - PyTorch| of each tower's features, on inputs of another batch size than the
    export's (which also checks that the batch dimension is dynamic)."""
    import onnxruntime as ort

    out_dir = Path(out_dir)
    images, ids = _sample_inputs(model, batch, seed)
    encode = {"image": lambda: model.encode_image(images), "text": lambda: model.encode_text(ids)}
    with torch.no_grad():
        reference = {t: encode[t]().numpy() for t in towers}
    diffs = {}
    for tower, file, name, value in (("image", IMAGE_TOWER_FILE, "images", images),
                                     ("text", TEXT_TOWER_FILE, "caption_ids", ids)):
        if tower not in towers:
            continue
        session = ort.InferenceSession(str(out_dir / file), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {name: value.numpy()})
        diffs[tower] = float(np.abs(got - reference[tower]).max())
    return diffs


def export_towers(model: IRRA, out_dir: str | os.PathLike, *, model_meta: dict[str, Any] | None = None,
                  tolerance: float = FP32_TOLERANCE, towers: tuple[str, ...] = ("image", "text")
                  ) -> dict[str, Any]:
    """Write both towers as ONNX plus ``onnx.json``, after checking them against PyTorch.

    The folder appears complete or not at all: the files are written to a temporary folder beside it and
    moved in once the check passed.

    Args:
        model: the IRRA model (fp32, any device; exported on the CPU).
        out_dir: the output folder (created; existing tower files are replaced).
        model_meta: identifies the model (``fingerprint`` etc., see :mod:`irra_dist.retrieval.index`); stored
            in ``onnx.json`` so that a query is refused against an index of another model.
        tolerance: largest allowed absolute feature difference.
        towers: which towers to write ("image", "text"); irra-export writes both.

    Returns:
        The content of ``onnx.json`` (``max_abs_diff`` per tower included).

    Raises:
        OnnxExportError: a difference above `tolerance`.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # The explicit-softmax attention exports as plain MatMul/Softmax nodes on every opset; same weights.
    export_model = copy.deepcopy(model).float().cpu().eval()
    set_attn_impl(export_model, "math")
    images, ids = _sample_inputs(export_model, 2, seed=0)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            jobs = {"image": (_ImageTower(export_model), IMAGE_TOWER_FILE, "images", images),
                    "text": (_TextTower(export_model), TEXT_TOWER_FILE, "caption_ids", ids)}
            for tower, file, name, example in (jobs[t] for t in towers):
                torch.onnx.export(tower, (example,), str(tmp / file), dynamo=False, opset_version=OPSET,
                                  input_names=[name], output_names=["features"],
                                  dynamic_axes={name: {0: "batch"}, "features": {0: "batch"}})
        diffs = max_abs_difference(model.float().cpu().eval(), tmp, towers=towers)
        worst = max(diffs, key=diffs.get)
        if diffs[worst] > tolerance:
            raise OnnxExportError(f"the ONNX {worst} tower differs from PyTorch by {diffs[worst]:.2e} "
                                  f"(> {tolerance:.0e}): report this with the model's config")
        height, width = model.base_model.visual.image_size
        meta = {"model": model_meta or {}, "image_size": [int(height), int(width)],
                "context_length": int(model.base_model.context_length), "embed_dim": int(model.embed_dim),
                "opset": OPSET, "max_abs_diff": diffs,
                "files": {t: {"image": IMAGE_TOWER_FILE, "text": TEXT_TOWER_FILE}[t] for t in towers}}
        (tmp / ONNX_META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        out_dir.mkdir(exist_ok=True)
        (out_dir / ONNX_META_FILE).unlink(missing_ok=True)
        # onnx.json last: a folder with it holds towers that passed the check
        for file in (*meta["files"].values(), ONNX_META_FILE):
            os.replace(tmp / file, out_dir / file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta
