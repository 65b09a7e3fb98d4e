"""irra_dist: IRRA text-to-image person retrieval as a distributed training system.

The public API is imported lazily so that light modules (``irra_dist.config``) load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "tokenize": "irra_dist.tokenizer",
    "SimpleTokenizer": "irra_dist.tokenizer",
    "mask_tokens": "irra_dist.masking",
    "load_openai_clip": "irra_dist.model",
    "build_clip": "irra_dist.model",
    "build_irra": "irra_dist.model",
    "build_irra_from_config": "irra_dist.model",
    "load_official_irra_checkpoint": "irra_dist.model",
    "export_official_checkpoint": "irra_dist.model",
    "IRRA": "irra_dist.model",
    "irra_losses": "irra_dist.losses",
    "build_optimizer": "irra_dist.optim",
    "build_lr_scheduler": "irra_dist.optim",
    "retrieval_metrics": "irra_dist.evaluation.metrics",
    "Config": "irra_dist.config",
    "load_config": "irra_dist.config",
    "ConfigError": "irra_dist.config",
}
_SUBMODULES = {"losses", "config", "tokenizer", "masking", "model", "optim", "data", "engine",
               "evaluation", "distributed"}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"irra_dist.{name}")
    raise AttributeError(f"module 'irra_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__ + sorted(_SUBMODULES)
