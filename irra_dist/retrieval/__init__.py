"""Retrieval with a trained model: the model loaded for search, galleries and their cached features, ranking,
the trainer's per-epoch retrieval picture, the faiss gallery index and its text queries, search results, the
ONNX towers at run time.

``errors``, ``index``, ``query``, ``results`` and ``onnx_runtime`` import no torch at module level, so a query
through onnxruntime runs without the training stack; ``model``, ``gallery``, ``cache``, ``ranking`` and
``examples`` run the PyTorch towers.
"""
