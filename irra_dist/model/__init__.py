"""The IRRA model: CLIP towers, the IRR module and ID classifier, and checkpoint formats."""

from irra_dist.model.checkpoint import (
    export_official_checkpoint,
    load_irra_weights,
    load_official_irra_checkpoint,
    save_weights_safetensors,
)
from irra_dist.model.clip import CLIP, CheckpointError, build_clip, load_openai_clip, set_attn_impl
from irra_dist.model.irra import IRRA, NEW_MODULES, build_irra, build_irra_from_config, is_new_parameter

__all__ = [
    "CLIP",
    "IRRA",
    "NEW_MODULES",
    "CheckpointError",
    "build_clip",
    "build_irra",
    "build_irra_from_config",
    "export_official_checkpoint",
    "is_new_parameter",
    "load_irra_weights",
    "load_official_irra_checkpoint",
    "load_openai_clip",
    "save_weights_safetensors",
    "set_attn_impl",
]
