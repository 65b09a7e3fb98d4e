"""The error every search caller catches (no torch here, so the ONNX query path can catch it too)."""


class SearchError(ValueError):
    """Input that search cannot use; the message is one line naming the problem and the fix."""
