"""The training engine: Accelerate/DeepSpeed trainer, evaluation loop, checkpoints, tracking.

``train(cfg, resume=None)`` trains under whatever ``accelerate launch`` started and returns the run folder;
``evaluate_target(target, shards=...)`` scores a run folder, checkpoint or weights file. The command lines
are in :mod:`irra_dist.engine.cli`.
"""

from irra_dist.engine.evaluate import evaluate_target
from irra_dist.engine.trainer import NonFiniteLossError, train

__all__ = ["NonFiniteLossError", "evaluate_target", "train"]
