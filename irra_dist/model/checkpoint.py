"""Official IRRA checkpoints (``best.pth``) and safetensors weights with the official key names.

An official ``best.pth`` is a ``torch.save``'d dict whose ``model`` entry is the IRRA state dict (keys
``base_model.*``, ``classifier.*``, ``cross_attn.*``, ... IRRA_SPEC 4.4), possibly with a ``module.`` prefix
from DDP, in the fp16/fp32 mix of IRRA_SPEC 1.7. The architecture is read from the tensors, so loading needs
neither the OpenAI CLIP weights nor the training config; only the image size is not stored and must be given.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from irra_dist.fileio import atomic_write
from irra_dist.model.clip import (
    CLIP,
    AttnImpl,
    CheckpointError,
    _first_line,
    as_tensor_dict,
    count_blocks,
    infer_clip_sizes,
    load_into,
    read_weights_file,
)
from irra_dist.model.irra import IRRA

__all__ = ["CheckpointError", "export_official_checkpoint", "load_irra_weights",
           "load_official_irra_checkpoint", "save_weights_safetensors"]

logger = logging.getLogger(__name__)

_IRRA_WHAT = ("an IRRA checkpoint: a torch.save'd dict with a 'model' state dict (or a bare state dict) "
              "with keys base_model.* as in the official best.pth")
_SAFETENSORS_FORMAT = "irra_dist.irra"


def _strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` that DDP / DataParallel put in front of every key."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _irra_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    state_dict = _strip_module_prefix(as_tensor_dict(obj, path, _IRRA_WHAT))
    if not any(k.startswith("base_model.") for k in state_dict):
        raise CheckpointError(f"{path} is not an IRRA checkpoint: no base_model.* keys (found e.g. "
                              f"{next(iter(state_dict))}); expected {_IRRA_WHAT}")
    return state_dict


def irra_from_state_dict(state_dict: Mapping[str, torch.Tensor], source: str,
                         image_size: tuple[int, int] = (384, 128), stride_size: int = 16, *,
                         temperature: float = 0.02, mlm_logits_at_masked_only: bool = True,
                         attn_impl: AttnImpl = "sdpa",
                         heads: tuple[int, int] | None = None) -> IRRA:
    """Build an fp32 :class:`IRRA` shaped by ``state_dict`` (official key names) and load it strictly.

    Inferred from the tensors: tower sizes, ``num_classes`` (``classifier.weight``, 0 without one),
    ``cmt_depth`` (the cross-modal resblocks) and whether the IRR module exists (``mlm_head.fc.weight``).

    ``heads`` = (vision_heads, text_heads) overrides OpenAI's width // 64 rule.

    Raises:
        CheckpointError: tensors that do not form an IRRA model at ``image_size``/``stride_size``.
    """
    sizes = infer_clip_sizes(state_dict, image_size, stride_size, source, prefix="base_model.")
    if heads is not None:
        sizes = dataclasses.replace(sizes, vision_heads=heads[0], text_heads=heads[1])
    with_mlm = "mlm_head.fc.weight" in state_dict
    cmt_depth = count_blocks(state_dict, "cross_modal_transformer.")
    if with_mlm and cmt_depth == 0:
        raise CheckpointError(f"{source} has an MLM head but no cross_modal_transformer.resblocks.*: "
                              f"expected {_IRRA_WHAT}")
    num_classes = state_dict["classifier.weight"].shape[0] if "classifier.weight" in state_dict else 0
    with torch.device("meta"):
        model = IRRA(CLIP(sizes, attn_impl), num_classes, cmt_depth=cmt_depth,
                     temperature=temperature, with_mlm=with_mlm,
                     mlm_logits_at_masked_only=mlm_logits_at_masked_only)
    rows = state_dict["base_model.visual.positional_embedding"].shape[0]
    grid = (model.base_model.visual.num_y, model.base_model.visual.num_x)
    if rows != grid[0] * grid[1] + 1:
        raise CheckpointError(f"{source} was trained with {rows - 1} image patches, but image_size "
                              f"{tuple(image_size)} with stride {stride_size} gives a "
                              f"{grid[0]}x{grid[1]} grid: "
                              "pass the image_size and stride_size the model was trained with")
    load_into(model, state_dict, source)
    # The non-persistent buffer is not in the file; rebuild it off the meta device.
    model.logit_scale = torch.tensor(1.0 / temperature)
    logger.info("loaded IRRA from %s: %d classes, cmt_depth %d, IRR module %s", source, num_classes,
                cmt_depth, with_mlm)
    return model


def load_official_irra_checkpoint(path: str | os.PathLike, image_size: tuple[int, int] = (384, 128),
                                  stride_size: int = 16, **kwargs: Any) -> IRRA:
    """Load an official IRRA ``best.pth`` (or a bare IRRA state dict saved with ``torch.save``).

    The file is read with ``weights_only=True``: no pickled code runs. Keys may carry ``module.``; fp16
    tensors are copied into fp32 parameters.

    Args:
        path: the checkpoint file.
        image_size: the (height, width) the model was trained with (not stored in the file).
        stride_size: the patch stride it was trained with.
        **kwargs: ``temperature``, ``mlm_logits_at_masked_only``, ``attn_impl``
            (see :func:`irra_from_state_dict`).

    Returns:
        The model in fp32 on the CPU.

    Raises:
        CheckpointError: missing, truncated or non-IRRA file.
    """
    path = Path(path)
    obj = read_weights_file(path, _IRRA_WHAT)
    _apply_facts(_export_facts(obj), kwargs)
    return irra_from_state_dict(_irra_state_dict(obj, path), str(path), image_size, stride_size, **kwargs)


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in _strip_module_prefix(model.state_dict()).items()}


EXPORT_FACTS_KEY = "irra_dist"
"""Entry of an exported ``best.pth`` holding what its tensors cannot tell (head counts, input size, stride,
temperature), as strings. The official loader reads only ``checkpoint["model"]`` and ignores it."""


def official_loader_mismatch(model: nn.Module) -> str | None:
    """How the official code would build `model` differently from its tensors alone, or None.

    The official ``build_model`` derives head counts as width // 64 (IRRA_SPEC 1.1); a model with other head
    counts loads there without error but computes something else.
    """
    if not isinstance(model, IRRA):
        return None
    sizes = model.base_model.sizes
    official = (max(sizes.vision_width // 64, 1), max(sizes.text_width // 64, 1))
    if (sizes.vision_heads, sizes.text_heads) == official:
        return None
    return (f"the official code builds {official[0]} vision / {official[1]} text attention heads from "
            f"these widths, this model has {sizes.vision_heads} / {sizes.text_heads}: the file reloads "
            "exactly with irra_dist (irra-eval, irra-search), but the official test.py would evaluate a "
            "different model")


def export_official_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``{"model": state_dict, "irra_dist": facts}`` with the official key names (what the official
    ``test.py`` loads: it reads only ``"model"``).

    Tensors are written in the model's dtype (fp32 for irra_dist models); a ``module.`` prefix is dropped.
    ``facts`` (:data:`EXPORT_FACTS_KEY`) are the architecture facts the tensors cannot carry, read back by
    :func:`load_irra_weights` so that a reload builds the same model. The file appears atomically.
    """
    state_dict = _plain_state_dict(model)
    payload = {"model": state_dict, EXPORT_FACTS_KEY: _model_metadata(model)}
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def _model_metadata(model: nn.Module) -> dict[str, str]:
    """What a safetensors file needs besides the tensors to rebuild the model (all strings)."""
    if not isinstance(model, IRRA):
        return {"format": _SAFETENSORS_FORMAT}
    visual = model.base_model.visual
    sizes = model.base_model.sizes
    # Head counts are not visible in the tensors; random-init models need not follow width // 64.
    return {"format": _SAFETENSORS_FORMAT, "image_size": f"{visual.image_size[0]},{visual.image_size[1]}",
            "stride_size": str(visual.stride_size), "temperature": repr(model.temperature),
            "vision_heads": str(sizes.vision_heads), "text_heads": str(sizes.text_heads)}


def save_weights_safetensors(model: nn.Module, path: str | os.PathLike,
                             metadata: Mapping[str, str] | None = None,
                             state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write the weights as safetensors with the official key names, atomically.

    The image size, stride and temperature go into the file's metadata, so :func:`load_irra_weights`
    rebuilds the model without further arguments; ``metadata`` adds entries (e.g. the run config as YAML).
    ``state_dict`` replaces the model's own tensors (e.g. fp32 master weights of a half-precision model).
    """
    from safetensors.torch import save_file

    tensors = model.state_dict() if state_dict is None else state_dict
    plain = {k: v.detach().cpu().contiguous() for k, v in _strip_module_prefix(dict(tensors)).items()}
    # safetensors refuses tensors that share storage; clone the (few) that do.
    state_dict = {k: v.clone() for k, v in plain.items()}
    meta = {**_model_metadata(model), **(metadata or {})}
    atomic_write(Path(path), lambda tmp: save_file(state_dict, tmp, metadata=meta))


def load_irra_weights(path: str | os.PathLike, image_size: tuple[int, int] | None = None,
                      stride_size: int | None = None, **kwargs: Any) -> IRRA:
    """Load IRRA from a safetensors file written by :func:`save_weights_safetensors` or any torch file
    :func:`load_official_irra_checkpoint` accepts.

    Args:
        path: the weights file (``.safetensors`` is read as safetensors, anything else with ``torch.load``).
        image_size: (height, width); None takes it from the file's metadata, else (384, 128).
        stride_size: patch stride; None takes it from the metadata, else 16.
        **kwargs: see :func:`irra_from_state_dict`; ``temperature`` defaults to the stored one.

    Raises:
        CheckpointError: missing, truncated or non-IRRA file.
    """
    path = Path(path)
    meta: dict[str, str] = {}
    if path.suffix == ".safetensors":
        state_dict, meta = _read_safetensors(path)
        state_dict = _irra_state_dict(state_dict, path)
    else:
        obj = read_weights_file(path, _IRRA_WHAT)
        meta = _export_facts(obj)
        state_dict = _irra_state_dict(obj, path)
    if image_size is None:
        stored = meta.get("image_size")
        image_size = tuple(int(v) for v in stored.split(",")) if stored else (384, 128)
    if stride_size is None:
        stride_size = int(meta.get("stride_size", 16))
    _apply_facts(meta, kwargs)
    return irra_from_state_dict(state_dict, str(path), image_size, stride_size, **kwargs)


def _export_facts(obj: Any) -> dict[str, str]:
    """The :data:`EXPORT_FACTS_KEY` entry of a loaded ``best.pth`` (empty for official files)."""
    facts = obj.get(EXPORT_FACTS_KEY) if isinstance(obj, Mapping) else None
    if not isinstance(facts, Mapping):
        return {}
    return {str(k): str(v) for k, v in facts.items()}


def _apply_facts(meta: Mapping[str, str], kwargs: dict[str, Any]) -> None:
    """Default temperature and head counts from stored facts (explicit arguments win)."""
    if "temperature" in meta:
        kwargs.setdefault("temperature", float(meta["temperature"]))
    if "vision_heads" in meta and "text_heads" in meta:
        kwargs.setdefault("heads", (int(meta["vision_heads"]), int(meta["text_heads"])))


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path} (expected {_IRRA_WHAT})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: truncated or not a safetensors file "
                              f"({_first_line(err)}); expected {_IRRA_WHAT}") from None
