"""Serving-side retrieval: the faiss gallery index, search results, the ONNX towers at run time.

Nothing here imports torch at module level, so a query through onnxruntime runs without the training stack.
"""
