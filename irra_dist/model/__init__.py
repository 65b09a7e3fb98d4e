"""The IRRA model: CLIP towers, the IRR module and ID classifier, and every weights format (weights.py)."""

from irra_dist.model.clip import CLIP, CheckpointError, build_clip, load_openai_clip, set_attn_impl
from irra_dist.model.irra import IRRA, NEW_MODULES, build_irra, build_irra_from_config, is_new_parameter
from irra_dist.model.weights import (
    LoadedModel,
    WeightsSource,
    export_official_checkpoint,
    find_weights,
    load_irra_weights,
    load_model,
    load_official_irra_checkpoint,
    save_weights_safetensors,
)

__all__ = [
    "CLIP",
    "IRRA",
    "NEW_MODULES",
    "CheckpointError",
    "LoadedModel",
    "WeightsSource",
    "build_clip",
    "build_irra",
    "build_irra_from_config",
    "export_official_checkpoint",
    "find_weights",
    "is_new_parameter",
    "load_irra_weights",
    "load_model",
    "load_official_irra_checkpoint",
    "load_openai_clip",
    "save_weights_safetensors",
    "set_attn_impl",
]
