"""Querying a faiss gallery index with text: the text tower that built it (PyTorch, or onnxruntime without
torch), and the top-k of each query (:class:`irra_dist.retrieval.results.QueryResult`).

A model whose fingerprint differs from the index's is refused. Nothing here imports torch at module level:
:class:`TorchTextEncoder` imports it when made, so ``--runtime onnx`` runs without the training stack.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from irra_dist.retrieval.index import GalleryIndex, GalleryIndexError
from irra_dist.retrieval.onnx_runtime import OnnxTextEncoder
from irra_dist.retrieval.results import QueryResult

DEFAULT_ONNX_DIR = "onnx"
"""``--runtime onnx`` without ``--onnx``: this folder inside the run folder (or the weights file's folder)."""


class TextEncoder(Protocol):
    """Texts -> global text features; ``fingerprint`` identifies the model (see the index)."""

    fingerprint: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class TorchTextEncoder:
    """The PyTorch text tower of a run folder or weights file (imports torch and the model)."""

    def __init__(self, source: str | os.PathLike, weights: str = "best", device: str = "auto") -> None:
        import torch

        from irra_dist.retrieval.model import load_search_model, model_section

        source = Path(source)
        self.loaded = load_search_model(run=source if source.is_dir() else None,
                                        checkpoint=None if source.is_dir() else source, weights=weights)
        self.fingerprint = model_section(self.loaded, source, weights)["fingerprint"]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" \
            else torch.device(device)
        self.model = self.loaded.model.to(self.device).eval()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        from irra_dist.tokenizer import tokenize

        ids = tokenize(list(texts), context_length=self.model.base_model.context_length)
        with torch.no_grad():
            return torch.cat([self.model.encode_text(chunk.to(self.device)) for chunk in ids.split(256)]
                             ).float().cpu().numpy()


def open_text_encoder(index: GalleryIndex, *, runtime: str = "torch", onnx_dir: str | None = None,
                      model: str | None = None, weights: str | None = None,
                      device: str = "auto") -> TextEncoder:
    """The text tower to query `index` with, refused when it is not the model that built the index.

    Args:
        index: the loaded index.
        runtime: "torch" or "onnx".
        onnx_dir: ``irra-export`` folder (onnx; default ``<the index's run folder>/onnx``).
        model: run folder or weights file (torch; default the one that built the index).
        weights: "best" or "last" with a run folder (default: as the index was built).
        device: torch device ("auto": cuda when available).

    Raises:
        GalleryIndexError: another model's index, or a missing model.
        OnnxRuntimeError: an unusable export folder.
    """
    recorded = index.meta.model
    if runtime == "onnx":
        if onnx_dir is None:
            home = Path(recorded["source"])
            onnx_dir = str((home if recorded.get("source_kind") == "run" else home.parent) / DEFAULT_ONNX_DIR)
        encoder: TextEncoder = OnnxTextEncoder(onnx_dir)
        what = f"the ONNX export {onnx_dir}"
    elif runtime == "torch":
        source = model or recorded.get("source")
        if not source or not Path(source).exists():
            raise GalleryIndexError(f"the model that built {index.root} is not at {source} any more: pass "
                                    "--run RUN_DIR or --checkpoint FILE")
        encoder = TorchTextEncoder(source, weights or recorded.get("weights", "best"), device)
        what = str(source)
    else:
        raise GalleryIndexError(f"unknown --runtime {runtime!r}: use torch or onnx")
    if encoder.fingerprint != index.fingerprint:
        raise GalleryIndexError(f"index {index.root} was built by another model (fingerprint "
                                f"{index.fingerprint}, {what} has {encoder.fingerprint}): query it with the "
                                "model that built it "
                                f"({recorded.get('source')}) or rebuild the index with irra-index build")
    return encoder


def query_index(index: GalleryIndex, encoder: TextEncoder, texts: Sequence[str],
                query_pids: Sequence[int | None] | None = None, *, top_k: int = 10, nprobe: int | None = None,
                ef_search: int | None = None) -> list[QueryResult]:
    """Encode the texts and return each one's top-k from the index (see :class:`QueryResult`)."""
    if not texts or any(not t.strip() for t in texts):
        raise GalleryIndexError("a query is empty: pass a description such as --query 'a man in a red "
                                "jacket'")
    query_pids = list(query_pids) if query_pids is not None else [None] * len(texts)
    scores, indices = index.search(encoder.encode(texts), top_k, nprobe=nprobe, ef_search=ef_search)
    results = []
    for q, text in enumerate(texts):
        found = indices[q] >= 0  # an approximate index may find fewer than k
        idx = indices[q][found].tolist()
        hit_pids = index.pids[idx].tolist() if index.pids is not None else None
        qpid = query_pids[q]
        correct = [p == qpid for p in hit_pids] if hit_pids is not None and qpid is not None else None
        results.append(QueryResult(text, qpid, scores[q][found].tolist(), idx, index.names(idx), hit_pids,
                                   correct))
    return results
