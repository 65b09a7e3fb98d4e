"""The application: Accelerate/DeepSpeed trainer, evaluation loop, checkpoints, tracking, command lines.

``train(cfg, resume=None)`` trains under whatever ``accelerate launch`` started and returns the run folder;
``evaluate_target(target, shards=...)`` scores a run folder, checkpoint or weights file. The training and
evaluation command lines are in :mod:`irra_dist.engine.cli`; ``irra-build-shards`` in
:mod:`irra_dist.engine.build_shards_cli`; the synthetic dataset's in :mod:`irra_dist.engine.synthetic_cli`;
``irra-search`` in :mod:`irra_dist.engine.search_cli`, ``irra-index`` in :mod:`irra_dist.engine.index_cli`,
``irra-export`` in :mod:`irra_dist.engine.export_cli`, ``irra-serve`` in :mod:`irra_dist.engine.serve`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from irra_dist.engine.evaluate import evaluate_target
    from irra_dist.engine.trainer import NonFiniteLossError, train

__all__ = ["NonFiniteLossError", "evaluate_target", "train"]

# Loaded on first use: the light command lines here (irra-build-shards, the synthetic dataset) must not pay
# the seconds that importing the trainer (accelerate, deepspeed) takes.
_LAZY = {"NonFiniteLossError": "irra_dist.engine.trainer", "evaluate_target": "irra_dist.engine.evaluate",
         "train": "irra_dist.engine.trainer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
