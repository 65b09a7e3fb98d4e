"""Serving applications: ``irra-index`` (build a gallery index), ``irra-export`` (ONNX towers),
``irra-search --index`` (query an index) and ``irra-serve`` (a search page and JSON endpoint)."""
