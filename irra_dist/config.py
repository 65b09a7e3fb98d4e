"""Typed run configuration: one dataclass per concern, loaded from a YAML recipe plus dotted overrides.

A recipe is a YAML mapping whose top-level keys are the sections below (``model``, ``data``, ``loss``,
``optim``, ``train``, ``eval``, ``logging``). Command-line overrides use dotted keys, e.g.
``train.batch_size=32``. Unknown keys, wrong types and invalid values raise :class:`ConfigError` with one
line that names the key and what is expected.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf, ValidationError  # 2.4: the first with Literal and tuple fields
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ConfigTypeError, OmegaConfBaseException

from irra_dist.fileio import atomic_write_text


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message is one line naming the key."""


LOSS_NAMES = ("sdm", "itc", "cmpm", "id", "mlm")


@dataclass
class ModelConfig:
    """The IRRA model: CLIP towers (pretrained or random init) plus the IRR module and ID classifier."""

    pretrained: str = "ViT-B/16"
    """OpenAI CLIP name (looked up as ~/.cache/clip/<file>), a checkpoint path, or "none" for random init."""
    init_from: str = ""
    """Start from a previous run's model instead of CLIP: a run folder, a checkpoint folder, an irra_dist
    .safetensors or an official best.pth (pretrain, then fine-tune; see engine/init_from.py)."""
    verify_checksum: bool = False
    """Check the CLIP file's SHA-256 against OpenAI's published value (slow for large files)."""
    image_size: tuple[int, int] = (384, 128)
    """Input (height, width); the positional grid is interpolated to it."""
    stride_size: int = 16
    # Tower sizes used only when pretrained == "none" (otherwise read from the checkpoint).
    embed_dim: int = 512
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    cmt_depth: int = 4
    """Layers of the cross-modal transformer in the IRR module."""
    temperature: float = 0.02
    """Fixed SDM/ITC temperature; logit scale = 1 / temperature (50 in the paper), not learned."""
    grad_checkpointing: bool = False
    """Activation checkpointing in both towers: less memory, about a third more compute."""
    mlm_logits_at_masked_only: bool = True
    """Compute the 49408-way MLM head only at masked positions (same loss, far less memory)."""

    def __post_init__(self) -> None:
        _require(len(self.image_size) == 2 and min(self.image_size) > 0, "model.image_size",
                 "two positive integers [height, width]")
        _require(self.temperature > 0, "model.temperature", "a positive number")
        _require(self.cmt_depth >= 1, "model.cmt_depth", "an integer >= 1")
        for name in ("stride_size", "patch_size", "embed_dim", "vision_width", "vision_layers",
                     "vision_heads", "text_width", "text_layers", "text_heads", "context_length",
                     "vocab_size"):
            _require(getattr(self, name) > 0, f"model.{name}", "a positive integer")


@dataclass
class SourceConfig:
    """One shard set of a training mixture (``data.sources``)."""

    shards: str = ""
    """Folder, URL or pipe: command of the set, as ``data.shards``."""
    weight: float = 1.0
    """Share of each epoch's samples, relative to the other sources' weights (indexed mode: drawn with
    replacement where a source holds fewer samples than its share; stream mode: its resampled shards)."""
    name: str = ""
    """Name in logs, W&B and ``eval.source`` (default: the set's folder name)."""

    def __post_init__(self) -> None:
        _require(bool(self.shards), "data.sources[].shards", "a shard folder, URL or pipe: command")
        _require(self.weight > 0, "data.sources[].weight", "a positive number")
        if not self.name:
            self.name = self.shards.rstrip("/").rsplit("/", 1)[-1] or self.shards


@dataclass
class DataConfig:
    """Where the shards are and how training samples are drawn from them."""

    shards: str = "shards/demo"
    """Folder holding manifest.json and the tar shards (built by irra-build-shards), or the http(s):// URL of
    such a folder, or a pipe: command writing file {name} to stdout (pipe:aws s3 cp s3://b/set/{name} -)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """A mixture of shard sets, [{shards: PATH_OR_URL, weight: W}, ...]; when given it replaces `shards`.
    Identities stay apart (the classifier spans every source's train ids); in both modes."""
    mode: Literal["indexed", "stream"] = "indexed"
    """"indexed": random access through wids, exact epochs independent of the process count; "stream":
    sequential reads of resampled shards through a shuffle buffer (corpora too big to cache; TRAINING.md)."""
    cache_dir: str = ""
    """Local cache of remote shards (default ~/.cache/irra_dist/shards)."""
    cache_max_gb: float = 0.0
    """Size cap of the cache; the least recently used shards are deleted to stay under it (0: no cap)."""
    shuffle_buffer: int = 2000
    """Stream mode: samples held in each worker's shuffle buffer."""
    num_workers: int = 4
    """Data-loader worker processes per rank (decode, augmentation, tokenisation, masking)."""
    image_aug: bool = True
    """Official train augmentation: flip, pad+crop, random erasing (IRRA_SPEC 3.4)."""
    sampler: Literal["random", "identity"] = "random"
    """"random": a seeded permutation of all captions; "identity": P identities x K captions per batch."""
    num_instances: int = 4
    """K, captions per identity in a global batch when sampler == "identity"."""
    drop_last: bool = False
    """Drop the last partial global batch (the official loader keeps it)."""
    mlm: bool = True
    """Produce masked captions and MLM labels (needed by the mlm loss)."""
    mask_global_text: bool = True
    """Feed the masked caption to SDM/ID too, as the official code does through an aliasing bug."""
    build_demo_if_missing: bool = False
    """Generate the synthetic demo dataset and its shards at `shards` when it has no manifest."""
    demo_shards: str = ""
    """The demo's own data location: when `shards` is this folder and has no manifest, the synthetic demo
    dataset is generated there (a mistyped `shards` elsewhere is an error, not a new dataset)."""

    def __post_init__(self) -> None:
        _require(self.num_workers >= 0, "data.num_workers", "an integer >= 0")
        _require(self.num_instances >= 1, "data.num_instances", "an integer >= 1")
        _require(self.cache_max_gb >= 0, "data.cache_max_gb", "a number >= 0 (0: no cap)")
        _require(self.shuffle_buffer >= 1, "data.shuffle_buffer", "an integer >= 1")
        names = [source.name for source in self.sources]
        _require(len(set(names)) == len(names), "data.sources", "sources with distinct names")
        _require(self.mode == "indexed" or self.sampler == "random", "data.sampler",
                 '"random" when data.mode is "stream" (identity sampling needs data.mode=indexed)')


@dataclass
class LossConfig:
    """Which losses are summed, and their weights."""

    names: list[str] = field(default_factory=lambda: ["sdm", "id", "mlm"])
    """Any of sdm, itc, cmpm, id, mlm."""
    sdm_weight: float = 1.0
    itc_weight: float = 1.0
    cmpm_weight: float = 1.0
    id_weight: float = 1.0
    mlm_weight: float = 1.0
    global_batch: bool = True
    """Gather features across ranks so SDM/ITC/CMPM span the global batch (False: per-rank, like the
    official DDP path)."""

    def __post_init__(self) -> None:
        unknown = [n for n in self.names if n not in LOSS_NAMES]
        _require(not unknown and len(self.names) > 0, "loss.names",
                 f"a non-empty list drawn from {list(LOSS_NAMES)}, got {self.names}")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (IRRA_SPEC 4.1-4.2)."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-5
    bias_lr_factor: float = 2.0
    lr_factor: float = 5.0
    """Multiplier for the new modules (cross-modal, classifier, MLM head)."""
    weight_decay: float = 4e-5
    weight_decay_bias: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-3
    """Adam epsilon; the official 1e-3 matters for stability."""
    momentum: float = 0.9
    scheduler: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: int = 5
    warmup_factor: float = 0.1
    warmup_method: Literal["linear", "constant"] = "linear"
    target_lr: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [20, 50])
    gamma: float = 0.1
    step_per: Literal["epoch", "step"] = "epoch"
    """"epoch": the official per-epoch steps; "step": the same curve sampled at every optimizer step."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 turns clipping off (official)."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", "a positive number")
        _require(self.eps > 0, "optim.eps", "a positive number")
        _require(self.weight_decay >= 0, "optim.weight_decay", "a number >= 0")
        _require(self.warmup_epochs >= 0, "optim.warmup_epochs", "an integer >= 0")
        _require(0 < self.warmup_factor <= 1, "optim.warmup_factor", "a number in (0, 1]")
        _require(self.grad_clip >= 0, "optim.grad_clip", "a number >= 0 (0 disables clipping)")


@dataclass
class TrainConfig:
    """The training loop."""

    num_epochs: int = 60
    batch_size: int = 64
    """Per-device batch; the global batch is batch_size x processes x grad_accum_steps."""
    grad_accum_steps: int = 1
    chunk_size: int = 0
    """Run each device's batch in chunks of this many rows with gradient caching (engine/gradcache.py): the
    exact gradient of the whole batch at the activation memory of one chunk, for one extra forward. 0: off."""
    seed: int = 1
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """"auto": bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU."""
    compile: bool = False
    """torch.compile the model."""
    output_dir: str = "runs"
    run_name: str = ""
    """Run folder name under output_dir; empty means <timestamp>_<recipe name>."""
    log_period: int = 100
    """Optimizer steps between console log lines."""
    checkpoint_every_steps: int = 0
    """Also save `last` every N optimizer steps (0: only at the end of each epoch)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: no limit); for smoke tests."""
    max_nonfinite_steps: int = 10
    """Stop when this many consecutive steps have a non-finite loss."""
    cpu_threads: int = 0
    """Torch threads per process when running on the CPU; 0: the cores free when the run starts (this
    process's CPU affinity minus the 1-minute load average) divided among the local processes. Overrides the
    OMP_NUM_THREADS=1 that `accelerate launch` sets by default (docs/TRAINING.md)."""
    peer_failure_timeout_s: float = 5.0
    """With several processes: when one fails, every other one stops within about this many seconds (how
    often each looks for a failure in the launcher's store; docs/TRAINING.md, "When a rank fails")."""

    def __post_init__(self) -> None:
        _require(self.peer_failure_timeout_s > 0, "train.peer_failure_timeout_s", "a number of seconds > 0")
        for name in ("num_epochs", "batch_size", "grad_accum_steps", "log_period"):
            _require(getattr(self, name) >= 1, f"train.{name}", "an integer >= 1")
        for name in ("checkpoint_every_steps", "max_steps", "chunk_size"):
            _require(getattr(self, name) >= 0, f"train.{name}", "an integer >= 0")
        _require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "an integer >= 1")
        _require(self.cpu_threads >= 0, "train.cpu_threads", "an integer >= 0 (0: all cores)")


@dataclass
class EvalConfig:
    """Retrieval evaluation during and after training."""

    eval_period: int = 1
    """Evaluate every N epochs (0: never during training)."""
    split: Literal["test", "val"] = "val"
    """Split evaluated every `eval_period` epochs that selects the `best` checkpoint (by t2i R1). "val" keeps
    the test split untouched until the end (see `final_test`); the official code selects on "test"."""
    track_splits: list[str] = field(default_factory=list)
    """Other splits evaluated at the same epochs and recorded, never used for selection (irra_official:
    [val], so that its test-selected runs also record best-on-val). Skipped when the shards have none."""
    final_test: bool = True
    """When selecting on val: after the last epoch, evaluate the test split once on `best` and once on the
    last weights (the only time such a run touches test)."""
    source: str = ""
    """With a ``data.sources`` mixture: the name of the source whose val/test splits are evaluated (default:
    the first source)."""
    batch_size: int = 512
    chunk_size: int = 1024
    """Queries scored at a time: bounds metric memory to chunk_size x gallery size."""
    i2t: bool = False
    """Also report image-to-text metrics."""
    precision: Literal["train", "fp16", "fp32"] = "train"
    """Precision of the towers while embedding: "train" (the run's autocast: bf16 on recent GPUs), "fp16"
    (fp16 autocast on a GPU, as the official fp16 model evaluates; fp32 on a CPU) or "fp32" (with a DeepSpeed
    engine holding half-precision weights: the weights' precision)."""

    def __post_init__(self) -> None:
        _require(self.eval_period >= 0, "eval.eval_period", "an integer >= 0")
        _require(self.batch_size >= 1, "eval.batch_size", "an integer >= 1")
        _require(self.chunk_size >= 1, "eval.chunk_size", "an integer >= 1")
        _require(all(s in ("val", "test") and s != self.split for s in self.track_splits)
                 and len(set(self.track_splits)) == len(self.track_splits), "eval.track_splits",
                 f"a list of splits from ['val', 'test'] other than eval.split ({self.split!r})")


@dataclass
class LoggingConfig:
    """Experiment tracking."""

    wandb: bool = True
    project: str = "irra_dist"
    entity: str = ""
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    """"auto": online when credentials exist and the service answers, otherwise offline."""
    group: str = ""
    """W&B run group (irra-sweep puts the runs of one sweep in one group)."""


@dataclass
class Config:
    """A whole run: every section plus the recipe's name."""

    name: str = "irra"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if "mlm" in self.loss.names and not self.data.mlm:
            raise ConfigError("loss.names contains 'mlm' but data.mlm is false: set data.mlm=true "
                              "or drop mlm from loss.names")
        if self.optim.scheduler == "cosine" and self.optim.warmup_epochs >= self.train.num_epochs:
            # Checked here, when the config is read, so that it fails before any process or folder exists.
            raise ConfigError(f"optim.warmup_epochs={self.optim.warmup_epochs} leaves no epoch for the "
                              f"cosine schedule with train.num_epochs={self.train.num_epochs}: set "
                              f"optim.warmup_epochs={max(self.train.num_epochs - 1, 0)} or lower, or raise "
                              "train.num_epochs")

        names = [source.name for source in self.data.sources]
        if self.eval.source and self.eval.source not in names:
            raise ConfigError(f"eval.source={self.eval.source!r} names no source of data.sources "
                              f"({names or 'none: data.shards is a single set'}): use one of those names")

    def eval_shards(self) -> str:
        """The shard set evaluated: ``data.shards``, or with a mixture the source that ``eval.source`` names
        (default: the first)."""
        if not self.data.sources:
            return self.data.shards
        name = self.eval.source or self.data.sources[0].name
        return next(source.shards for source in self.data.sources if source.name == name)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


# --------------------------------------------------------------------------------------------------
# Loading: OmegaConf checks and converts each value against the annotations above; this part reads the
# recipe files (with their `base:` chain) and turns OmegaConf's multi-line errors into one line.


def _require(ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value for '{key}': expected {expected}")


def _to_plain(value: Any) -> Any:
    """Tuples become lists so the YAML dump stays plain (no !!python/tuple tags)."""
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        inner = _describe(args[0]) if args else "value"
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values, each {inner}"
        return f"a list, each item {inner}"
    if dataclasses.is_dataclass(tp):
        return "a mapping of keys to values"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _annotation(dotted: str) -> Any:
    """The annotation of a key such as ``optim.lr``, ``optim.milestones[1]`` or ``data.sources.weight``."""
    tp: Any = Config
    for part in dotted.replace("[", ".[").split("."):
        if typing.get_origin(tp) in (list, tuple):  # an item of a list, by index or by one of its fields
            tp = typing.get_args(tp)[0]
            if part.startswith("["):
                continue
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _one_line(err: Exception, dotted: str, value: Any = None) -> ConfigError:
    """OmegaConf's multi-line error about setting `dotted` to `value` as one line naming the key and what it
    expects."""
    key = getattr(err, "full_key", None) or dotted or "config"
    if dotted and not (key.startswith(dotted) or dotted.startswith(key + ".")):
        key = f"{dotted}.{key}"  # an error inside a list item names the item's own field alone
    object_type = getattr(err, "object_type", None)
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and dataclasses.is_dataclass(object_type):
        known = ", ".join(sorted(f.name for f in dataclasses.fields(object_type)))
        return ConfigError(f"unknown config key '{key}' (known keys here: {known})")
    if "[" in dotted and (isinstance(err, (IndexError, ConfigTypeError)) or dotted.startswith(key + ".")):
        # a missing item, or an item of a tuple (immutable in OmegaConf)
        whole = dotted.split("[")[0]
        return ConfigError(f"cannot set '{dotted}': set the whole list instead, e.g. {whole}=[...]")
    if dotted.startswith(key + "."):
        return ConfigError(f"cannot set '{dotted}': '{key}' is not a section")
    tp = _annotation(key)
    if isinstance(err, (ValidationError, ConfigTypeError)) and tp is not None:
        value = value if key == dotted else getattr(err, "value", None)
        got = f", got {value!r}" if value is not None else ""
        return ConfigError(f"wrong type for '{key}': expected {_describe(tp)}{got}")
    reason = (str(err).splitlines() or [type(err).__name__])[0]
    return ConfigError(f"cannot use '{key}': {reason}")


@functools.cache
def _schema() -> DictConfig:
    """The typed tree of defaults, built once (OmegaConf.structured takes about 10 ms, a copy 2 ms)."""
    return OmegaConf.structured(Config)


def _literal(value: Any) -> Any:
    """Escape ``${`` (with the backslashes before it) so that OmegaConf keeps strings as written: a pipe:
    command may hold a shell ${VAR}, and a saved config must read back unchanged."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_literal(v) for v in value]
    return value


def _set(cfg: DictConfig, dotted: str, value: Any) -> None:
    """Set one key (dots and [index] as OmegaConf reads them); OmegaConf checks and converts the value."""
    try:
        OmegaConf.update(cfg, dotted, _literal(value), merge=True)
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        raise _one_line(err, dotted, value) from None


def _leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of each value in a recipe; a list is one value, replaced whole."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, dotted + ".")
        elif value is not None or not dataclasses.is_dataclass(_annotation(dotted)):
            yield dotted, value  # (an empty section, e.g. every line commented out, keeps its defaults)


def _apply_override(cfg: DictConfig, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"cannot read override '{item}': write it as section.key=value, "
                          "e.g. train.batch_size=32")
    # PyYAML reads the value as in a recipe file (OmegaConf's from_dotlist makes ${...} an interpolation).
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw  # not YAML ("@x", "[a"): the text itself
    _set(cfg, key, value)


def _build(layers: list[dict[str, Any]], overrides: list[str]) -> Config:
    """Apply recipe mappings (one update per value: OmegaConf.merge of a whole tree names no key for some
    errors, a tuple of the wrong length, and is slower), then overrides, and return the dataclasses."""
    cfg = copy.deepcopy(_schema())
    for layer in layers:
        for dotted, value in _leaves(layer):
            _set(cfg, dotted, value)
    for item in overrides:
        _apply_override(cfg, item)
    try:
        return OmegaConf.to_object(cfg)  # real dataclasses: their __post_init__ checks run here
    except OmegaConfBaseException as err:  # a value "???", OmegaConf's mark of one still to be given
        raise _one_line(err, "") from None


RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs"
"""The repository's recipe folder: `--config demo` means configs/demo.yaml."""


def resolve_recipe(name_or_path: str | os.PathLike) -> Path:
    """A recipe file path, or a recipe name looked up in the repository's configs/ folder."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / path.name, RECIPES_DIR / f"{path.name}.yaml"):
        if path.parent == Path(".") and candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))) or "none"
    raise ConfigError(f"config file not found: {name_or_path} (pass a YAML path or a recipe name: {known})")


def read_recipe(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """A recipe's mappings, those of its `base: other.yaml` chain (relative to the file naming it) first.

    Read here because OmegaConf itself has no include of another file (Hydra's defaults lists do that)."""
    path = resolve_recipe(path).resolve()
    if path in _seen:
        raise ConfigError(f"config file {path} includes itself through 'base': remove the cycle")
    try:
        # PyYAML, not OmegaConf.load: OmegaConf's loader reads a string such as run_name: 1e5 as a float, so
        # a saved config would not read back as written.
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: fix its syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return [data]
    if not isinstance(base, str):
        raise ConfigError(f"wrong type for 'base' in {path}: expected a recipe file name, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"base recipe not found: {base_path} (named by 'base' in {path})")
    return read_recipe(base_path, _seen + (path,)) + [data]


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """Build a validated :class:`Config` from a nested mapping plus dotted overrides."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections to values, got {data!r}")
    return _build([data], overrides or [])


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a recipe (or the defaults when `path` is None) and apply dotted overrides."""
    return _build(read_recipe(path) if path is not None else [], overrides or [])


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temporary name, then rename)."""
    atomic_write_text(path, dump_config(cfg))
