"""``model.init_from``: start training from a previous run's model (pretrain, then fine-tune).

The source is anything :func:`irra_dist.model.weights.load_model` reads: a run folder (its best.safetensors
when it has one, else model.safetensors, as ``irra-eval`` picks), a checkpoint folder (DeepSpeed's included),
an irra_dist ``.safetensors`` export, an official IRRA ``best.pth`` or an OpenAI CLIP file. It
decides the tower shapes, so ``model.pretrained`` (the CLIP file) is not needed. The new model is built with
this run's settings (temperature, cmt_depth, losses, classes), then takes from the source:

- the CLIP towers, always (they must fit this run's image size and stride);
- the IRR module (cross-attention, cross-modal transformer, MLM head) when the source has one of the same
  shape, else it keeps its fresh initialisation, with a log line;
- the ID classifier when its number of identities matches this run's, else it is re-initialised, with a log
  line (a pretraining corpus and the fine-tuning set rarely share identities).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from irra_dist.config import Config
from irra_dist.model import IRRA, CheckpointError, build_irra_from_config, load_model
from irra_dist.model.clip import CLIP

logger = logging.getLogger(__name__)

_IRR_PREFIXES = ("cross_attn.", "cross_modal_transformer.", "ln_pre_t.", "ln_pre_i.", "ln_post.", "mlm_head.")


def _load_source(source: str, cfg: Config) -> tuple[IRRA, Path]:
    # Built at this run's input size: a source trained at another one is refused (its positional grid).
    loaded = load_model(source, weights="best", image_size=tuple(cfg.model.image_size),
                        stride_size=cfg.model.stride_size)
    return loaded.model, loaded.source.path


def build_model_for_training(cfg: Config, num_classes: int) -> IRRA:
    """The model a training run starts from: ``model.init_from`` when set, else CLIP or random init.

    Raises:
        CheckpointError, ConfigError: the source cannot be read or does not fit this run.
    """
    with_mlm = "mlm" in cfg.loss.names
    if not cfg.model.init_from:
        return build_irra_from_config(cfg.model, num_classes, with_mlm=with_mlm)
    source, file = _load_source(cfg.model.init_from, cfg)
    mc = cfg.model
    model = IRRA(CLIP(source.base_model.sizes), num_classes, cmt_depth=mc.cmt_depth,
                 temperature=mc.temperature, with_mlm=with_mlm,
                 mlm_logits_at_masked_only=mc.mlm_logits_at_masked_only)
    own = model.state_dict()
    given = source.state_dict()
    towers = {k: v for k, v in given.items() if k.startswith("base_model.")}
    taken = dict(towers)
    notes = []
    irr_own = [k for k in own if k.startswith(_IRR_PREFIXES)]
    irr_taken = bool(irr_own) and all(k in given and given[k].shape == own[k].shape for k in irr_own)
    if irr_taken:
        taken.update({k: given[k] for k in irr_own})
    elif irr_own:
        notes.append("IRR module freshly initialised (the source has none of this shape)")
    if num_classes:
        if source.num_classes == num_classes:
            taken.update({k: given[k] for k in ("classifier.weight", "classifier.bias")})
        else:
            notes.append(f"ID classifier re-initialised ({source.num_classes} ids in the source, "
                         f"{num_classes} here)")
    missing_towers = [k for k in own if k.startswith("base_model.") and k not in towers]
    if missing_towers:
        raise CheckpointError(f"{file} lacks tower weights such as {missing_towers[0]}: model.init_from must "
                              "name an IRRA model")
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in taken:
                tensor.copy_(taken[name])
    if mc.grad_checkpointing:
        model.set_grad_checkpointing(True)
    logger.info("model.init_from: towers%s from %s%s", " and IRR module" if irr_taken else "", file,
                "".join(f"; {note}" for note in notes))
    return model
