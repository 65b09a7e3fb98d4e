"""IRRA objectives (IRRA_SPEC 2): SDM, ITC, CMPM, ID and MLM, plus :func:`irra_losses` that applies weights.

Shapes: B local rows (this rank's samples), G columns, D feature size, C identities, V vocabulary, M MLM
positions. The matching losses score each local row against a set of columns: by default the local batch
itself (the official single-GPU behaviour); in distributed training the engine passes the all-gathered
global batch as columns (`*_cols`, with their pids or the offset of this rank's block), so that each rank
computes its rows of the global similarity matrix. ``reduction="sum"`` lets the engine divide by a global
count, which makes N ranks x B rows equal to one process with N*B rows.

Half-precision inputs are cast to float32 (float64 stays float64, for gradcheck); the losses should run
outside autocast, as the official code does (its features are cast to fp32 before the losses).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

# Defined beside the recipe schema, which validates loss.names, because irra_dist.config loads without torch.
from irra_dist.config import LOSS_NAMES

Reduction = Literal["mean", "sum"]
_IGNORE = -100  # cross_entropy's ignore_index for rows without an identity class


class LossInputError(ValueError):
    """Inputs that the losses cannot use; the message names what is missing and how to fix it."""


def _full(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _reduce(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    raise LossInputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _pid_match(pids: torch.Tensor, col_pids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Y[i, j] = 1 where row i and column j share a person id, [B, G]."""
    return (pids.reshape(-1, 1) == col_pids.reshape(1, -1)).to(dtype)


def _kl_rows(logits: torch.Tensor, target: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Per row, KL(softmax(logits) || target) with `epsilon` inside the log of the target, [B]."""
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - torch.log(target + epsilon))).sum(dim=1)


def _columns(image_rows: torch.Tensor, text_rows: torch.Tensor, pids: torch.Tensor | None,
             image_cols: torch.Tensor | None, text_cols: torch.Tensor | None,
             col_pids: torch.Tensor | None, needs_pids: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                     torch.Tensor | None]:
    """Normalised image/text columns (default: the normalised rows) and their pids."""
    if (image_cols is None) != (text_cols is None):
        raise LossInputError("pass both image_cols and text_cols (the gathered global batch) or neither")
    if image_cols is None:
        return image_rows, text_rows, pids
    if image_cols.shape != text_cols.shape or image_cols.shape[-1] != image_rows.shape[-1]:
        raise LossInputError(f"image_cols {tuple(image_cols.shape)} and text_cols {tuple(text_cols.shape)} "
                             f"must both be [G, {image_rows.shape[-1]}]")
    if needs_pids and (col_pids is None or col_pids.numel() != image_cols.shape[0]):
        raise LossInputError("col_pids must give one pid per column when image_cols/text_cols are passed")
    return F.normalize(_full(image_cols), dim=-1), F.normalize(_full(text_cols), dim=-1), col_pids


def sdm_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor,
             logit_scale: float | torch.Tensor = 50.0, *, image_cols: torch.Tensor | None = None,
             text_cols: torch.Tensor | None = None, col_pids: torch.Tensor | None = None,
             reduction: Reduction = "mean", epsilon: float = 1e-8) -> torch.Tensor:
    """Similarity distribution matching (IRRA_SPEC 2.1): KL(p || q) image->text plus text->image.

    p is the softmax of ``logit_scale`` x cosine similarities of a row against all columns; q spreads the
    mass evenly over the columns sharing the row's person id.

    Args:
        image_feats: local image features [B, D] (normalised inside).
        text_feats: local text features [B, D], paired with `image_feats`.
        pids: person ids of the local pairs [B].
        logit_scale: 1 / temperature (50 in the paper).
        image_cols: image feature columns [G, D] for text->image rows; default the local images.
        text_cols: text feature columns [G, D] for image->text rows; default the local texts.
        col_pids: person ids of the columns [G]; required with `image_cols`/`text_cols`.
        reduction: "mean" over the local rows (official) or "sum".
        epsilon: added to q inside the log so that zero targets stay finite.

    Returns:
        0-dim loss, the SUM of both directions (not their average), as the official code.
    """
    img = F.normalize(_full(image_feats), dim=-1)
    txt = F.normalize(_full(text_feats), dim=-1)
    img_cols, txt_cols, col_pids = _columns(img, txt, pids, image_cols, text_cols, col_pids, True)
    match = _pid_match(pids, col_pids, img.dtype)
    # Row-normalised labels; the official divides column j by row-sum j, which is the same because the
    # square pid matrix is symmetric. clamp: a row whose positives are absent from the columns.
    target = match / match.sum(dim=1, keepdim=True).clamp_min(1.0)
    i2t = logit_scale * img @ txt_cols.t()
    t2i = logit_scale * txt @ img_cols.t()
    return _reduce(_kl_rows(i2t, target, epsilon) + _kl_rows(t2i, target, epsilon), reduction)


def itc_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: float | torch.Tensor = 50.0,
             *, image_cols: torch.Tensor | None = None, text_cols: torch.Tensor | None = None,
             col_offset: int = 0, reduction: Reduction = "mean") -> torch.Tensor:
    """CLIP's symmetric InfoNCE (IRRA_SPEC 2.2): (CE(image->text) + CE(text->image)) / 2.

    Args:
        image_feats: local image features [B, D] (normalised inside).
        text_feats: local text features [B, D], paired with `image_feats`.
        logit_scale: 1 / temperature (fixed 50 in IRRA, not CLIP's learned 100).
        image_cols: image columns [G, D]; default the local images.
        text_cols: text columns [G, D]; default the local texts.
        col_offset: the positive of local row i is column ``col_offset + i`` (this rank's block start).
        reduction: "mean" over the local rows (official) or "sum".

    Returns:
        0-dim loss.
    """
    img = F.normalize(_full(image_feats), dim=-1)
    txt = F.normalize(_full(text_feats), dim=-1)
    img_cols, txt_cols, _ = _columns(img, txt, None, image_cols, text_cols, None, False)
    if col_offset < 0 or col_offset + img.shape[0] > img_cols.shape[0]:
        raise LossInputError(f"col_offset {col_offset} + {img.shape[0]} rows exceeds the {img_cols.shape[0]} "
                             "columns: pass this rank's start index in the gathered batch")
    target = torch.arange(col_offset, col_offset + img.shape[0], device=img.device)
    i2t = F.cross_entropy(logit_scale * img @ txt_cols.t(), target, reduction="none")
    t2i = F.cross_entropy(logit_scale * txt @ img_cols.t(), target, reduction="none")
    return _reduce((i2t + t2i) / 2, reduction)


def cmpm_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor, *,
              image_cols: torch.Tensor | None = None, text_cols: torch.Tensor | None = None,
              col_pids: torch.Tensor | None = None, reduction: Reduction = "mean",
              epsilon: float = 1e-8) -> torch.Tensor:
    """Cross-modal projection matching (IRRA_SPEC 2.3), summed over both directions.

    The row features are NOT normalised (only the columns are) and there is no scale; the target puts
    1/sqrt(n) on each of the n columns sharing the row's pid (an L2-normalised label row), as the original
    CMPM code.

    Args:
        image_feats: local image features [B, D].
        text_feats: local text features [B, D].
        pids: person ids [B].
        image_cols: image columns [G, D]; default the local images.
        text_cols: text columns [G, D]; default the local texts.
        col_pids: person ids of the columns [G]; required with `image_cols`/`text_cols`.
        reduction: "mean" over the local rows (official) or "sum".
        epsilon: added to the target inside the log.

    Returns:
        0-dim loss.
    """
    img = _full(image_feats)
    txt = _full(text_feats)
    img_cols, txt_cols, col_pids = _columns(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), pids,
                                            image_cols, text_cols, col_pids, True)
    match = _pid_match(pids, col_pids, img.dtype)
    target = match / match.norm(dim=1, keepdim=True).clamp_min(1.0)
    i2t = img @ txt_cols.t()
    t2i = txt @ img_cols.t()
    return _reduce(_kl_rows(i2t, target, epsilon) + _kl_rows(t2i, target, epsilon), reduction)


def id_loss(image_logits: torch.Tensor, text_logits: torch.Tensor, pids: torch.Tensor,
            reduction: Reduction = "mean") -> torch.Tensor:
    """Identity classification (IRRA_SPEC 2.4): (CE(image logits) + CE(text logits)) / 2.

    Rows whose pid is not one of the C classes (pid >= C) are left out: in a mixture, the identities of
    sources without identity labels (JSONL without pids) come after every labelled class, and only the
    labelled sources train the classifier. With every pid a class this is the official loss.

    Args:
        image_logits: shared-classifier logits of the image features [B, C].
        text_logits: shared-classifier logits of the text features [B, C].
        pids: 0-based training ids [B].
        reduction: "mean" over the classified rows (official: all rows) or "sum".

    Returns:
        0-dim loss (0 when no row is classified).
    """
    if reduction not in ("mean", "sum"):
        raise LossInputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    pids = pids.long()
    classified = pids < image_logits.shape[1]
    target = torch.where(classified, pids, torch.full_like(pids, _IGNORE))
    total = (F.cross_entropy(_full(image_logits), target, ignore_index=_IGNORE, reduction="sum")
             + F.cross_entropy(_full(text_logits), target, ignore_index=_IGNORE, reduction="sum")) / 2
    return total if reduction == "sum" else total / classified.sum().clamp_min(1)


def mlm_loss(scores: torch.Tensor, labels: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Masked-token prediction (IRRA_SPEC 2.5): cross-entropy over positions whose label is not 0.

    Args:
        scores: logits [M, V] (or [B, L, V]).
        labels: target ids [M] (or [B, L]); 0 marks a position to ignore.
        reduction: "mean" over the labelled positions (official) or "sum" over them.

    Returns:
        0-dim loss (NaN for "mean" when no position is labelled, as PyTorch's CE).
    """
    if reduction not in ("mean", "sum"):
        raise LossInputError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return F.cross_entropy(_full(scores.reshape(-1, scores.shape[-1])), labels.reshape(-1).long(),
                           ignore_index=0, reduction=reduction)


def _require(mapping: Mapping[str, object], key: str, what: str, loss: str) -> torch.Tensor:
    if key not in mapping:
        raise LossInputError(f"loss '{loss}' needs {what}['{key}'], which is missing: build the model "
                             f"and batch with it or drop '{loss}' from loss.names")
    return mapping[key]  # type: ignore[return-value]


def irra_losses(outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                loss_names: Sequence[str] = ("sdm", "id", "mlm"), temperature: float = 0.02,
                weights: Mapping[str, float] | None = None, *,
                columns: Mapping[str, torch.Tensor | int] | None = None,
                normalizers: Mapping[str, float | torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The enabled IRRA losses, each multiplied by its weight; the total is the sum of the values.

    Args:
        outputs: the model's dict: ``image_feats``, ``text_feats`` [B, D], optional ``logit_scale`` (0-dim),
            ``image_logits``, ``text_logits`` [B, C], ``mlm_logits`` [M, V], ``mlm_labels`` [M].
        batch: holds ``pids`` [B].
        loss_names: any of sdm, itc, cmpm, id, mlm.
        temperature: gives the logit scale 1 / temperature when `outputs` has no ``logit_scale``.
        weights: per-name weight, e.g. ``{"mlm": 0.5}``; missing names weigh 1.
        columns: the gathered global batch for sdm/itc/cmpm: ``image_feats`` [G, D], ``text_feats`` [G, D],
            ``pids`` [G] and ``offset`` (this rank's first row in it). None: the local batch.
        normalizers: None for per-rank means (official); or ``{"batch": x, "mlm": y, "id": z}``: every
            loss is its sum over the local rows divided by x (the global batch size), MLM its sum over the
            local labelled positions divided by y (the global count of labelled positions), ID its sum over
            the local classified rows divided by z (their global count; default x, as when every row is).

    Returns:
        ``{"<name>_loss": 0-dim tensor}`` in the order of `loss_names`.
    """
    unknown = [n for n in loss_names if n not in LOSS_NAMES]
    if unknown or not loss_names:
        raise LossInputError(f"loss_names must be a non-empty list drawn from {list(LOSS_NAMES)}, "
                             f"got {list(loss_names)}")
    weights = dict(weights or {})
    bad_weights = [k for k in weights if k not in LOSS_NAMES]
    if bad_weights:
        raise LossInputError(f"weights has unknown loss names {bad_weights}: use keys from "
                             f"{list(LOSS_NAMES)}")
    if normalizers is not None and ("batch" not in normalizers
                                    or ("mlm" in loss_names and "mlm" not in normalizers)):
        raise LossInputError("normalizers must hold 'batch' (and 'mlm' when the mlm loss is on), "
                             f"got keys {sorted(normalizers)}")
    reduction: Reduction = "mean" if normalizers is None else "sum"
    scale = outputs.get("logit_scale")
    if scale is None:
        scale = 1.0 / temperature
    cols: dict[str, torch.Tensor] = {}
    offset = 0
    if columns is not None:
        cols = {"image_cols": columns["image_feats"], "text_cols": columns["text_feats"]}
        offset = int(columns.get("offset", 0))

    def finish(name: str, value: torch.Tensor, normalizer_key: str) -> torch.Tensor:
        if normalizers is not None:
            value = value / normalizers[normalizer_key]
        return value * weights.get(name, 1.0)

    result: dict[str, torch.Tensor] = {}
    for name in loss_names:
        if name == "mlm":
            scores = _require(outputs, "mlm_logits", "outputs", name)
            labels = _require(outputs, "mlm_labels", "outputs", name)
            result["mlm_loss"] = finish(name, mlm_loss(scores, labels, reduction), "mlm")
            continue
        pids = _require(batch, "pids", "batch", name)
        if name == "id":
            value = id_loss(_require(outputs, "image_logits", "outputs", name),
                            _require(outputs, "text_logits", "outputs", name), pids, reduction)
            result["id_loss"] = finish(name, value, "id" if normalizers and "id" in normalizers else "batch")
            continue
        else:
            img = _require(outputs, "image_feats", "outputs", name)
            txt = _require(outputs, "text_feats", "outputs", name)
            if name == "itc":
                value = itc_loss(img, txt, scale, col_offset=offset, reduction=reduction, **cols)
            else:
                col_pids = columns["pids"] if columns is not None else None
                fn = sdm_loss if name == "sdm" else cmpm_loss
                extra = {"logit_scale": scale} if name == "sdm" else {}
                value = fn(img, txt, pids, col_pids=col_pids, reduction=reduction, **extra, **cols)
        result[f"{name}_loss"] = finish(name, value, "batch")
    return result


@torch.no_grad()
def irra_accuracies(outputs: Mapping[str, torch.Tensor],
                    batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logging-only accuracies, detached 0-dim tensors (no host sync).

    ``img_acc`` / ``txt_acc``: argmax of the ID logits equals the pid, over the rows whose pid is a class
    (when the model has a classifier);
    ``mlm_acc``: argmax of the MLM logits equals the label, over labelled positions (when MLM is on).
    """
    acc: dict[str, torch.Tensor] = {}
    if "image_logits" in outputs and "text_logits" in outputs and "pids" in batch:
        pids = batch["pids"].long()
        classified = pids < outputs["image_logits"].shape[1]
        count = classified.sum().clamp_min(1).float()
        acc["img_acc"] = ((outputs["image_logits"].argmax(dim=1) == pids) & classified).sum().float() / count
        acc["txt_acc"] = ((outputs["text_logits"].argmax(dim=1) == pids) & classified).sum().float() / count
    if "mlm_logits" in outputs and "mlm_labels" in outputs:
        scores = outputs["mlm_logits"]
        labels = outputs["mlm_labels"].reshape(-1)
        labelled = labels != 0
        hits = (scores.reshape(-1, scores.shape[-1]).argmax(dim=1) == labels) & labelled
        acc["mlm_acc"] = hits.sum().float() / labelled.sum().clamp_min(1).float()
    return acc
