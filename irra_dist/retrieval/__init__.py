"""Retrieval with a trained model: galleries and their cached features, ranking, the trainer's per-epoch
retrieval picture, the faiss gallery index, search results, the ONNX towers at run time.

``index``, ``results`` and ``onnx_runtime`` import no torch at module level, so a query through onnxruntime
runs without the training stack; ``gallery``, ``cache``, ``ranking`` and ``examples`` run the PyTorch towers.
"""
