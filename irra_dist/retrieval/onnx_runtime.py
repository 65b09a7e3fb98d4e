"""The text tower exported by ``irra-export`` (:mod:`irra_dist.model.onnx`), run with onnxruntime.

Needs numpy, onnxruntime and the tokenizer only: a query answered this way never imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from irra_dist.tokenizer import tokenize_numpy

# The file names written by irra_dist.model.onnx (not imported from there: that module needs torch).
TEXT_TOWER_FILE = "text_tower.onnx"
ONNX_META_FILE = "onnx.json"


class OnnxRuntimeError(ValueError):
    """An export folder that cannot be used; the message is one line naming the fix."""


class OnnxTextEncoder:
    """Text queries -> global text features ``[Q, D]`` float32, with onnxruntime.

    Args:
        export_dir: a folder written by ``irra-export RUN --onnx DIR``.
        threads: intra-op threads (0: onnxruntime's default, every core).

    Raises:
        OnnxRuntimeError: no export there, or onnxruntime cannot load it.
    """

    def __init__(self, export_dir: str | os.PathLike, *, threads: int = 0) -> None:
        self.root = Path(export_dir)
        meta_path = self.root / ONNX_META_FILE
        if not meta_path.is_file():
            raise OnnxRuntimeError(f"no ONNX export at {self.root} ({ONNX_META_FILE} missing): write one "
                                   f"with irra-export RUN --onnx {self.root}, or pass --onnx DIR")
        try:
            import onnxruntime as ort
        except ImportError:
            raise OnnxRuntimeError("onnxruntime is not installed: pip install 'irra_dist[serve]'") from None
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
            self.context_length = int(self.meta["context_length"])
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(self.root / TEXT_TOWER_FILE), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise OnnxRuntimeError(f"cannot load the ONNX export at {self.root} ({first}): write it again "
                                   "with irra-export") from None
        self.input_name = self.session.get_inputs()[0].name

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("model", {}).get("fingerprint", ""))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Features of the texts, tokenised exactly as for the PyTorch model."""
        ids = tokenize_numpy(list(texts), context_length=self.context_length)
        (feats,) = self.session.run(None, {self.input_name: ids})
        return feats
