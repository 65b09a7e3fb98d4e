"""Every weights format irra_dist reads, and the files it writes: the one place where a path becomes a model.

:func:`load_model` takes a path and returns the built :class:`IRRA` with what it was built from. What the path
holds is recognised by content, never by its name:

- an irra_dist ``.safetensors`` export (a run folder's ``model.safetensors`` / ``best.safetensors``): official
  key names, and the architecture as JSON in the metadata (``model_config``, :class:`Architecture`);
- an official IRRA ``best.pth``: a ``torch.save``'d dict whose ``model`` entry is the state dict (keys
  ``base_model.*``, ``classifier.*``, ``cross_attn.*``, ... IRRA_SPEC 4.4), possibly with DDP's ``module.``,
  in the fp16/fp32 mix of IRRA_SPEC 1.7 (read with ``weights_only=True``: no pickled code runs);
- an OpenAI CLIP file (TorchScript archive or state dict): IRRA around it, with no classifier and no IRR
  module (zero-shot CLIP retrieval, or the towers for ``model.init_from``);
- a training checkpoint folder (``checkpoints/state-*``, :mod:`irra_dist.engine.checkpointing`): Accelerate's
  ``model.safetensors``, or DeepSpeed's files (ZeRO-2 or ZeRO-3 partitions), consolidated to fp32 by
  DeepSpeed's ``zero_to_fp32`` (DeepSpeed reads its files with pickle: load only checkpoints you wrote);
- a run folder: ``best.safetensors`` or ``model.safetensors`` (``weights="best"`` / ``"last"``), or its
  ``checkpoints/best`` / ``checkpoints/last`` when no epoch has been exported yet.

The architecture comes from, in order: the file's ``model_config``; the facts older exports stored (image
size, stride, head counts, temperature; the tensors give the rest); the ``config.yaml`` of the run the file
belongs to (checkpoints, older exports); the tensors alone for official and CLIP files (heads = width // 64,
as OpenAI's ``build_model``). A safetensors file with none of these is refused.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from irra_dist.fileio import atomic_write
from irra_dist.model.clip import (
    CLIP,
    AttnImpl,
    CheckpointError,
    ClipSizes,
    clip_from_state_dict,
    count_blocks,
    infer_clip_sizes,
    load_into,
)
from irra_dist.model.irra import IRRA

__all__ = ["Architecture", "CheckpointError", "LoadedModel", "WeightsSource", "export_official_checkpoint",
           "find_weights", "load_irra_weights", "load_model", "load_official_irra_checkpoint",
           "save_weights_safetensors"]

logger = logging.getLogger(__name__)

# A run folder's layout as far as weights go: the trainer writes it, every reader finds weights through here.
CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
"""The weights after the latest epoch (also the model file inside an Accelerate checkpoint)."""
BEST_WEIGHTS_FILE = "best.safetensors"
"""The weights with the best evaluation so far."""
CHECKPOINTS_DIR = "checkpoints"
FILES_FILE = "files.json"
"""Written last into a checkpoint folder, with every file's size and SHA-256: marks the save complete."""
WEIGHTS_CHOICES = ("best", "last")
_DEEPSPEED_TAG_FILE = "latest"  # written by save_state under DeepSpeed: names the folder of its files

MODEL_CONFIG_KEY = "model_config"
"""Metadata entry (safetensors) or facts entry (best.pth) holding :class:`Architecture` as JSON."""
EXPORT_FACTS_KEY = "irra_dist"
"""Entry of an exported ``best.pth`` holding what its tensors cannot tell, as strings. The official loader
reads only ``checkpoint["model"]`` and ignores it."""
_SAFETENSORS_FORMAT = "irra_dist.irra"
_ARCHITECTURE_VERSION = 1

_ANYTHING = ("a run folder, a checkpoint folder, an irra_dist .safetensors export, an official IRRA best.pth "
             "or an OpenAI CLIP file")
_IRRA_WHAT = ("an IRRA checkpoint: a torch.save'd dict with a 'model' state dict (or a bare state dict) "
              "with keys base_model.* as in the official best.pth")

Kind = Literal["irra_dist", "official", "openai_clip", "accelerate_checkpoint", "deepspeed_checkpoint"]


# --------------------------------------------------------------------------------------------------
# The architecture a file records


@dataclass(frozen=True)
class Architecture:
    """What rebuilds an :class:`IRRA` exactly: the tower sizes and the IRRA constructor's arguments.

    Stored flat as JSON (``to_json``) under the ``model`` config's field names (``embed_dim``,
    ``vision_heads``, ``cmt_depth``, ...) plus ``num_classes`` and ``with_mlm``.
    """

    sizes: ClipSizes
    num_classes: int
    """ID classifier rows (0: none)."""
    cmt_depth: int
    """Cross-modal transformer layers (0 without the IRR module)."""
    with_mlm: bool
    """Whether the IRR module (cross-attention, cross-modal transformer, MLM head) exists."""
    temperature: float = 0.02
    mlm_logits_at_masked_only: bool = True

    @classmethod
    def of(cls, model: IRRA) -> Architecture:
        return cls(sizes=model.base_model.sizes, num_classes=model.num_classes,
                   cmt_depth=len(model.cross_modal_transformer.resblocks) if model.with_mlm else 0,
                   with_mlm=model.with_mlm, temperature=model.temperature,
                   mlm_logits_at_masked_only=model.mlm_logits_at_masked_only)

    def to_json(self) -> str:
        fields = {**dataclasses.asdict(self.sizes), **dataclasses.asdict(self)}
        del fields["sizes"]
        fields["image_size"] = list(self.sizes.image_size)
        return json.dumps({"version": _ARCHITECTURE_VERSION, **fields}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: Path) -> Architecture:
        """Parse what :meth:`to_json` wrote.

        Raises:
            CheckpointError: not JSON, or fields missing, unknown or of the wrong type.
        """
        size_names = [f.name for f in dataclasses.fields(ClipSizes)]
        own_names = [f.name for f in dataclasses.fields(cls) if f.name != "sizes"]
        try:
            fields = json.loads(text)
            version = fields.pop("version")
            # Which captions feed the global text feature is a data setting now (data.mask_global_text);
            # files exported before still record it for the model.
            fields.pop("mask_global_text", None)
            unknown = sorted(set(fields) - set(size_names) - set(own_names))
            if version != _ARCHITECTURE_VERSION or unknown:
                raise ValueError(f"version {version}, unknown fields {unknown}")
            sizes = {name: fields.pop(name) for name in size_names}
            sizes["image_size"] = (int(sizes["image_size"][0]), int(sizes["image_size"][1]))
            counts = [v for k, v in sizes.items() if k != "image_size"]
            if not all(isinstance(v, int) for v in [*counts, fields["num_classes"], fields["cmt_depth"]]):
                raise ValueError("sizes must be integers")
            return cls(sizes=ClipSizes(**sizes), **fields)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise CheckpointError(f"{source} has an unreadable {MODEL_CONFIG_KEY} ({_first_line(err)}): "
                                  "it was written by another irra_dist version or edited; export the model "
                                  "again with this version") from None

    def build(self, attn_impl: AttnImpl = "sdpa") -> IRRA:
        return IRRA(CLIP(self.sizes, attn_impl), self.num_classes, cmt_depth=self.cmt_depth,
                    temperature=self.temperature, with_mlm=self.with_mlm,
                    mlm_logits_at_masked_only=self.mlm_logits_at_masked_only)

    def at_input(self, image_size: tuple[int, int] | None, stride_size: int | None) -> Architecture:
        """The same model fed `image_size` / `stride_size` (None keeps the stored ones)."""
        sizes = self.sizes
        if image_size is not None:
            sizes = dataclasses.replace(sizes, image_size=(int(image_size[0]), int(image_size[1])))
        if stride_size is not None:
            sizes = dataclasses.replace(sizes, stride_size=int(stride_size))
        return dataclasses.replace(self, sizes=sizes)


def architecture_from_tensors(state_dict: Mapping[str, torch.Tensor], source: str,
                              image_size: tuple[int, int], stride_size: int, *,
                              heads: tuple[int, int] | None = None, temperature: float = 0.02,
                              mlm_logits_at_masked_only: bool = True) -> Architecture:
    """The architecture of an IRRA state dict (official key names) as far as its tensors tell.

    Inferred: tower sizes (heads = width // 64 unless `heads` = (vision, text) is given), ``num_classes``
    (``classifier.weight``, 0 without one), ``cmt_depth`` and whether the IRR module exists.

    Raises:
        CheckpointError: tensors that do not form an IRRA model.
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
    return Architecture(sizes=sizes, num_classes=num_classes, cmt_depth=cmt_depth, with_mlm=with_mlm,
                        temperature=temperature, mlm_logits_at_masked_only=mlm_logits_at_masked_only)


def _irra_from(arch: Architecture, state_dict: Mapping[str, torch.Tensor], source: str,
               attn_impl: AttnImpl) -> IRRA:
    """Build `arch` and load `state_dict` into it strictly (fp32 copies)."""
    with torch.device("meta"):
        model = arch.build(attn_impl)
    rows = state_dict["base_model.visual.positional_embedding"].shape[0]
    grid = (model.base_model.visual.num_y, model.base_model.visual.num_x)
    if rows != grid[0] * grid[1] + 1:
        raise CheckpointError(f"{source} was trained with {rows - 1} image patches, but image_size "
                              f"{tuple(arch.sizes.image_size)} with stride {arch.sizes.stride_size} gives a "
                              f"{grid[0]}x{grid[1]} grid: "
                              "pass the image_size and stride_size the model was trained with")
    load_into(model, state_dict, source)
    # The non-persistent buffer is not in the file; rebuild it off the meta device.
    model.logit_scale = torch.tensor(1.0 / arch.temperature)
    return model


# --------------------------------------------------------------------------------------------------
# Finding the weights of a path


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights are, found from a path before any weights are read."""

    path: Path
    """The weights file, or a DeepSpeed checkpoint folder."""
    run_dir: Path | None
    """The run folder the weights belong to (its config.yaml describes the run), if any."""

    @property
    def digest_file(self) -> Path:
        """The file whose SHA-256 identifies these weights (cache keys): the weights file itself, or a
        DeepSpeed checkpoint's files.json, which lists the SHA-256 of every file of the checkpoint."""
        return self.path / FILES_FILE if self.path.is_dir() else self.path


def find_weights(path: str | os.PathLike, weights: str = "best") -> WeightsSource:
    """The weights a path designates (see the module docstring); reads directory listings only.

    Args:
        path: a weights file, a run folder, a checkpoint folder, a ``checkpoints/`` folder or link.
        weights: in a run folder, "best" (best.safetensors, else model.safetensors) or "last".

    Raises:
        CheckpointError: nothing at `path`, or a folder without weights.
    """
    if weights not in WEIGHTS_CHOICES:
        raise CheckpointError(f"weights must be 'best' or 'last', got {weights!r}")
    path = Path(path).expanduser()
    if path.is_file():
        return WeightsSource(path, _run_of(path.parent))
    if not path.is_dir():
        raise CheckpointError(f"weights not found: nothing at {path}; pass {_ANYTHING}")
    return _weights_in(path, weights)


def _weights_in(folder: Path, weights: str) -> WeightsSource:
    if (folder / _DEEPSPEED_TAG_FILE).is_file():
        _require_complete(folder)
        return WeightsSource(folder, _run_of(folder))
    exports = ([BEST_WEIGHTS_FILE] if weights == "best" else []) + [WEIGHTS_FILE]
    for name in exports:
        if (folder / name).is_file():
            if _in_checkpoints(folder):
                _require_complete(folder)
            return WeightsSource(folder / name, _run_of(folder))
    for holder in (folder / CHECKPOINTS_DIR, folder):
        links = ([holder / "best"] if weights == "best" else []) + [holder / "last"]
        found = next((link for link in links if link.is_dir()), None)
        if found is not None:
            # A run killed before its first epoch ended has checkpoints but no export.
            logger.info("no exported weights in %s: loading checkpoint %s", folder, found)
            return _weights_in(found.resolve(), weights)
    raise CheckpointError(f"{folder} holds no weights (no {WEIGHTS_FILE}, {BEST_WEIGHTS_FILE} or "
                          f"{CHECKPOINTS_DIR}/last): pass a run folder in which an epoch finished or a "
                          "checkpoint was saved, or a weights file")


def _in_checkpoints(folder: Path) -> bool:
    return folder.resolve().parent.name == CHECKPOINTS_DIR


def _run_of(folder: Path) -> Path | None:
    """The run folder `folder` is or belongs to (``<run>/checkpoints/state-*``), if it has a config.yaml."""
    folder = folder.resolve()
    for candidate in (folder, folder.parent.parent if _in_checkpoints(folder) else None):
        if candidate is not None and (candidate / CONFIG_FILE).is_file():
            return candidate
    return None


def _require_complete(checkpoint: Path) -> None:
    if not (checkpoint / FILES_FILE).is_file():
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete (no {FILES_FILE}: the save was "
                              "interrupted, or irra_dist did not write it): pass another checkpoint, e.g. "
                              f"{CHECKPOINTS_DIR}/last, or an exported .safetensors")


# --------------------------------------------------------------------------------------------------
# Reading files


def _first_line(err: BaseException, limit: int = 120) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit] + "..."


Container = Literal["safetensors", "torch"]


def _container_of(path: Path, expected: str) -> Container:
    """What kind of file `path` is, from its first bytes."""
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}; expected {expected}")
    with path.open("rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes; an interrupted copy or download?): copy or export "
                              "it again")
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "safetensors"
    # torch.save / torch.jit.save: a zip archive; torch.save's legacy format: a pickle (protocol 2+).
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return "torch"
    raise CheckpointError(f"{path} is not a PyTorch file nor a safetensors file (it starts with "
                          f"{head[:8]!r}); expected {expected}: pass the weights file itself")


def read_torch_file(path: Path, expected: str) -> Any:
    """Read a TorchScript archive (its ``state_dict()``) or a ``torch.save`` file, running no pickled code.

    Args:
        path: the file.
        expected: what the caller wants from it, used in error messages.

    Returns:
        The state dict of a TorchScript archive, or the object stored by ``torch.save``
        (loaded with ``weights_only=True``).

    Raises:
        CheckpointError: truncated or unreadable file, or one holding pickled Python objects.
    """
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        # torch.jit.save archives carry TorchScript code; torch.save archives only data.pkl + data/
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            try:
                with warnings.catch_warnings():
                    # TorchScript is deprecated, but it is the format OpenAI distributes CLIP in
                    warnings.simplefilter("ignore", FutureWarning)
                    return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
            except Exception as err:  # a damaged archive can fail with any exception type
                raise CheckpointError(f"cannot read the TorchScript archive {path} ({_first_line(err)}); "
                                      f"expected {expected}: copy or download it again") from None
    try:
        # A file object, not the path: torch.load picks its reader by the name (.safetensors), not content.
        with path.open("rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt files fail anywhere in the unpickler, with any exception type
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if isinstance(err, pickle.UnpicklingError) and found:
            raise CheckpointError(f"{path} holds a pickled Python object ({found.group(1)}) that safe "
                                  f"loading refuses; expected {expected}: re-save just the tensors, "
                                  "e.g. torch.save({'model': model.state_dict()}, path)") from None
        raise CheckpointError(f"cannot read {path}: truncated or not a PyTorch file "
                              f"({type(err).__name__}: {_first_line(err)}); expected {expected}: copy or "
                              "export it again") from None


def _read_safetensors(path: Path, expected: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: truncated or damaged safetensors file "
                              f"({_first_line(err)}); expected {expected}: copy or export it again") from None


def _tensor_dict(obj: Any, path: Path, expected: str) -> dict[str, torch.Tensor]:
    """`obj` as a state dict (str -> Tensor), without DDP's ``module.`` prefixes."""
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__}); "
                              f"expected {expected}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _read_file(path: Path, expected: str) -> tuple[dict[str, torch.Tensor], dict[str, str], Container]:
    """The tensors of a weights file, what it records besides them (strings), and its container."""
    container = _container_of(path, expected)
    if container == "safetensors":
        tensors, meta = _read_safetensors(path, expected)
        return _tensor_dict(tensors, path, expected), meta, container
    obj = read_torch_file(path, expected)
    facts = obj.get(EXPORT_FACTS_KEY) if isinstance(obj, Mapping) else None
    meta = {str(k): str(v) for k, v in facts.items()} if isinstance(facts, Mapping) else {}
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    return _tensor_dict(obj, path, expected), meta, container


def read_clip_state_dict(path: Path, expected: str) -> dict[str, torch.Tensor]:
    """The tensors of a CLIP file (OpenAI's TorchScript archive, a state dict saved by torch or safetensors).

    Raises:
        CheckpointError: missing, empty, truncated or unknown file.
    """
    return _read_file(path, expected)[0]


def _read_deepspeed(folder: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights of a DeepSpeed checkpoint (ZeRO-2 or ZeRO-3 partitions), consolidated by DeepSpeed."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise CheckpointError(f"{folder} is a DeepSpeed checkpoint and DeepSpeed is not installed: "
                              "pip install 'irra_dist[deepspeed]', or load the run's exported "
                              f"{WEIGHTS_FILE}") from None
    chatter = io.StringIO()  # zero_to_fp32 prints progress; keep it off the command's output
    try:
        with redirect_stdout(chatter), redirect_stderr(chatter):
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(folder))
    except Exception as err:  # noqa: BLE001 - DeepSpeed fails in many ways on a damaged checkpoint
        raise CheckpointError(f"cannot consolidate the DeepSpeed checkpoint {folder} ({_first_line(err)}): "
                              "it is damaged or partial; pass another checkpoint or the run's exported "
                              f"{WEIGHTS_FILE}") from None
    logger.debug("zero_to_fp32 on %s: %s", folder, chatter.getvalue().strip())
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    """A model built from a weights source, and what it was built from."""

    model: IRRA
    """fp32, on the CPU, in training mode (``.eval()`` it for inference)."""
    source: WeightsSource
    kind: Kind
    built_from: str
    """Where the architecture came from, for logs (e.g. "the model_config in its metadata")."""


def load_model(path: str | os.PathLike | WeightsSource, *, weights: str = "best",
               image_size: tuple[int, int] | None = None, stride_size: int | None = None,
               attn_impl: AttnImpl = "sdpa") -> LoadedModel:
    """The model at `path`, whatever the format (see the module docstring).

    Args:
        path: a run folder, a checkpoint folder, a weights file, or a :func:`find_weights` result.
        weights: in a run folder, "best" (best.safetensors when present) or "last".
        image_size: (height, width) to build the model for; None: the recorded one (official and CLIP files
            record none: 384x128). The positional grid must match it (CLIP files are interpolated).
        stride_size: patch stride, found the same way (default 16).
        attn_impl: "sdpa" or "math" attention.

    Returns:
        The :class:`LoadedModel`.

    Raises:
        CheckpointError: nothing readable at `path`, a damaged file, or tensors that do not fit (one line).
        ConfigError: the run's config.yaml, when needed, is unreadable.
    """
    source = path if isinstance(path, WeightsSource) else find_weights(path, weights)
    if source.path.is_dir():
        state_dict, meta, container = _read_deepspeed(source.path), {}, None
    else:
        state_dict, meta, container = _read_file(source.path, _ANYTHING)
    where = str(source.path)
    if not any(k.startswith("base_model.") for k in state_dict):
        if not any(k.startswith("visual.") for k in state_dict):
            raise CheckpointError(f"{source.path} holds neither an IRRA nor a CLIP state dict (keys such as "
                                  f"{next(iter(state_dict))}): pass {_ANYTHING}")
        clip = clip_from_state_dict(state_dict, where, image_size or (384, 128), stride_size or 16, attn_impl)
        model = IRRA(clip, 0, with_mlm=False)
        return _loaded(model, source, "openai_clip", "the CLIP tensors (heads = width // 64)")
    arch, built_from = _architecture(state_dict, meta, container, source, image_size, stride_size)
    model = _irra_from(arch, state_dict, where, attn_impl)
    if source.path.is_dir():
        kind = "deepspeed_checkpoint"
    elif _in_checkpoints(source.path.parent):
        kind = "accelerate_checkpoint"
    else:
        kind = "irra_dist" if container == "safetensors" or meta else "official"
    return _loaded(model, source, kind, built_from)


def _loaded(model: IRRA, source: WeightsSource, kind: Kind, built_from: str) -> LoadedModel:
    sizes = model.base_model.sizes
    logger.info("loaded %s from %s (architecture from %s): %dx%d input, %d classes, IRR module %s", kind,
                source.path, built_from, *sizes.image_size, model.num_classes, model.with_mlm)
    return LoadedModel(model, source, kind, built_from)


def _architecture(state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, str], container: str | None,
                  source: WeightsSource, image_size: tuple[int, int] | None,
                  stride_size: int | None) -> tuple[Architecture, str]:
    """The architecture of an IRRA state dict, from the best record there is (module docstring)."""
    where = str(source.path)
    if MODEL_CONFIG_KEY in meta:
        stored = Architecture.from_json(meta[MODEL_CONFIG_KEY], source.path)
        return stored.at_input(image_size, stride_size), f"the {MODEL_CONFIG_KEY} in its metadata"
    if "vision_heads" in meta and "text_heads" in meta:  # exports written before model_config existed
        stored_size = tuple(int(v) for v in meta["image_size"].split(",")) if "image_size" in meta else None
        arch = architecture_from_tensors(
            state_dict, where, image_size or stored_size or (384, 128),
            stride_size or int(meta.get("stride_size", 16)),
            heads=(int(meta["vision_heads"]), int(meta["text_heads"])),
            temperature=float(meta.get("temperature", 0.02)))
        return arch, "the tensors and the sizes in its metadata"
    if source.run_dir is not None:
        from irra_dist.config import load_config

        cfg = load_config(source.run_dir / CONFIG_FILE)
        mc = cfg.model
        # The config's head counts describe random-init towers only; CLIP's follow width // 64.
        heads = (mc.vision_heads, mc.text_heads) if mc.pretrained.lower() == "none" else None
        arch = architecture_from_tensors(state_dict, where, image_size or tuple(mc.image_size),
                                         stride_size or mc.stride_size, heads=heads,
                                         temperature=mc.temperature,
                                         mlm_logits_at_masked_only=mc.mlm_logits_at_masked_only)
        return arch, f"the tensors and {source.run_dir / CONFIG_FILE}"
    if container == "torch":  # an official best.pth: the official code builds heads as width // 64 too
        arch = architecture_from_tensors(state_dict, where, image_size or (384, 128), stride_size or 16)
        return arch, "the tensors (heads = width // 64, as the official code)"
    raise CheckpointError(f"{source.path} does not record its model's architecture (no {MODEL_CONFIG_KEY} in "
                          f"its metadata) and no {CONFIG_FILE} of its run is beside it: put the run's "
                          f"{CONFIG_FILE} next to it, or export the model again with this irra_dist")


def load_irra_weights(path: str | os.PathLike, image_size: tuple[int, int] | None = None,
                      stride_size: int | None = None, *, attn_impl: AttnImpl = "sdpa") -> IRRA:
    """:func:`load_model`'s model: IRRA from any weights file or folder irra_dist reads.

    Raises:
        CheckpointError: missing, truncated or unknown file (one line naming it).
    """
    return load_model(path, image_size=image_size, stride_size=stride_size, attn_impl=attn_impl).model


def load_official_irra_checkpoint(path: str | os.PathLike, image_size: tuple[int, int] | None = None,
                                  stride_size: int | None = None, *, attn_impl: AttnImpl = "sdpa") -> IRRA:
    """Load an official IRRA ``best.pth`` (or a bare IRRA state dict saved with ``torch.save``), strictly.

    The file is read with ``weights_only=True``: no pickled code runs. Keys may carry ``module.``; fp16
    tensors are copied into fp32 parameters. The official file records no input size: `image_size` and
    `stride_size` default to the official 384x128 and 16. Any other format :func:`load_model` reads works too.

    Raises:
        CheckpointError: missing, truncated or non-IRRA file.
    """
    return load_irra_weights(path, image_size, stride_size, attn_impl=attn_impl)


# --------------------------------------------------------------------------------------------------
# Writing


def _plain_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors without DDP's ``module.`` prefix."""
    return {k.removeprefix("module."): v.detach().cpu().contiguous() for k, v in tensors.items()}


def _model_facts(model: nn.Module) -> dict[str, str]:
    """What a file needs besides the tensors to rebuild `model` (all strings)."""
    if not isinstance(model, IRRA):
        return {"format": _SAFETENSORS_FORMAT}
    return {"format": _SAFETENSORS_FORMAT, MODEL_CONFIG_KEY: Architecture.of(model).to_json()}


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
    ``facts`` (:data:`EXPORT_FACTS_KEY`) hold the :class:`Architecture` as JSON, so :func:`load_model`
    rebuilds the same model. The file appears atomically.
    """
    payload = {"model": _plain_tensors(model.state_dict()), EXPORT_FACTS_KEY: _model_facts(model)}
    atomic_write(Path(path), lambda tmp: torch.save(payload, tmp))


def save_weights_safetensors(model: nn.Module, path: str | os.PathLike,
                             metadata: Mapping[str, str] | None = None,
                             state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write the weights as safetensors with the official key names, atomically.

    The model's :class:`Architecture` goes into the metadata as JSON (``model_config``), so :func:`load_model`
    rebuilds it with no other file; ``metadata`` adds entries (e.g. the run config as YAML, for provenance).
    ``state_dict`` replaces the model's own tensors (e.g. fp32 master weights of a half-precision model).
    """
    from safetensors.torch import save_file

    tensors = _plain_tensors(model.state_dict() if state_dict is None else state_dict)
    # safetensors refuses tensors that share storage; clone the (few) that do.
    tensors = {k: v.clone() for k, v in tensors.items()}
    meta = {**(metadata or {}), **_model_facts(model)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))
