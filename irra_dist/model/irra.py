"""IRRA: CLIP global features, the IRR cross-modal module with its MLM head, and the shared ID classifier.

Submodule names equal the official ones (``base_model``, ``classifier``, ``cross_attn``,
``cross_modal_transformer``, ``ln_pre_t``, ``ln_pre_i``, ``ln_post``, ``mlm_head``), so the state dict of
:class:`IRRA` has exactly the keys of the official ``best.pth`` (IRRA_SPEC 4.4). The model returns named
tensors and never computes a loss (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from irra_dist.model.clip import (
    CLIP,
    AttnImpl,
    MultiheadAttention,
    QuickGELU,
    Transformer,
    build_clip,
    load_openai_clip,
)

if TYPE_CHECKING:
    from irra_dist.config import ModelConfig

# Prefixes of the parameters that IRRA adds on top of CLIP (randomly initialised, IRRA_SPEC 1.3-1.5).
NEW_MODULES = ("classifier", "cross_attn", "cross_modal_transformer", "ln_pre_t", "ln_pre_i", "ln_post",
               "mlm_head")


def is_new_parameter(name: str) -> bool:
    """True for parameters of the modules IRRA adds to CLIP (not loaded from the CLIP checkpoint)."""
    return name.split(".", 1)[0] in NEW_MODULES


class IRRA(nn.Module):
    """The IRRA model of IRRA_SPEC 1.2-1.6.

    Args:
        base_model: the CLIP towers.
        num_classes: training identities for the shared ID classifier; 0 builds no classifier.
        cmt_depth: layers of the cross-modal transformer.
        temperature: fixed SDM/ITC temperature; ``logit_scale = 1 / temperature``.
        with_mlm: build the IRR module (cross-attention, cross-modal transformer, MLM head).
        mlm_logits_at_masked_only: run the MLM head only where ``mlm_labels != 0`` (same loss, far less
            memory and compute); False: all B*L positions, as the official code.
    """

    def __init__(self, base_model: CLIP, num_classes: int, *, cmt_depth: int = 4, temperature: float = 0.02,
                 with_mlm: bool = True, mlm_logits_at_masked_only: bool = True) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 means no ID classifier), got {num_classes}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if with_mlm and cmt_depth < 1:
            raise ValueError(f"cmt_depth must be >= 1 when the IRR module is built, got {cmt_depth}")
        self.base_model = base_model
        self.embed_dim = dim = base_model.embed_dim
        self.num_classes = num_classes
        self.temperature = float(temperature)
        self.with_mlm = with_mlm
        self.mlm_logits_at_masked_only = mlm_logits_at_masked_only
        # Fixed, not learned; non-persistent so the state-dict keys equal the official ones (IRRA_SPEC 1.6).
        self.register_buffer("logit_scale", torch.tensor(1.0 / temperature), persistent=False)
        attn_impl = _attn_impl_of(base_model)

        if num_classes > 0:
            self.classifier = nn.Linear(dim, num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)
        if with_mlm:
            heads = max(dim // 64, 1)
            self.cross_attn = MultiheadAttention(dim, heads, attn_impl)
            self.cross_modal_transformer = Transformer(dim, cmt_depth, heads, attn_impl=attn_impl)
            self.ln_pre_t = nn.LayerNorm(dim)
            self.ln_pre_i = nn.LayerNorm(dim)
            self.ln_post = nn.LayerNorm(dim)
            self.mlm_head = nn.Sequential(OrderedDict([
                ("dense", nn.Linear(dim, dim)),
                ("gelu", QuickGELU()),
                ("ln", nn.LayerNorm(dim)),
                ("fc", nn.Linear(dim, base_model.vocab_size)),
            ]))
            self._init_irr(cmt_depth)

    def _init_irr(self, cmt_depth: int) -> None:
        """CLIP-style stds for the new modules (IRRA_SPEC 1.5); biases and LNs keep PyTorch defaults."""
        dim = self.embed_dim
        attn_std = dim ** -0.5
        proj_std = dim ** -0.5 * (2 * cmt_depth) ** -0.5
        fc_std = (2 * dim) ** -0.5
        self.cross_modal_transformer.init_clip_weights()
        nn.init.normal_(self.cross_attn.in_proj_weight, std=attn_std)
        nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)
        nn.init.normal_(self.mlm_head.dense.weight, std=fc_std)
        nn.init.normal_(self.mlm_head.fc.weight, std=proj_std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both CLIP towers and the cross-modal transformer."""
        self.base_model.set_grad_checkpointing(enable)
        if self.with_mlm:
            self.cross_modal_transformer.grad_checkpointing = enable

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] -> global image feature [B, D] (CLS after ln_post and proj), fp32."""
        return self.base_model.encode_image(images, all_tokens=False).float()

    def encode_text(self, caption_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> global text feature [B, D] (EOT = argmax id, after ln_final and proj), fp32."""
        return self.base_model.encode_text(caption_ids, all_tokens=False).float()

    def cross_former(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """IRR fusion: text queries attend to all image tokens (CLS included), then the CMT blocks.

        There is deliberately no residual around the cross-attention (official behaviour).

        Args:
            text_tokens: [B, L, D] from the text tower.
            image_tokens: [B, 1+N, D] from the image tower.

        Returns:
            [B, L, D] after ``ln_post``.
        """
        x = self.cross_attn(self.ln_pre_t(text_tokens), self.ln_pre_i(image_tokens))
        return self.ln_post(self.cross_modal_transformer(x))

    def _fp32_head(self, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run ``head`` outside autocast so its logits are computed in the weights' dtype (fp32 normally).

        Under a DeepSpeed fp16/bf16 engine the weights themselves are half, so the input follows them.
        """
        weight_dtype = next(head.parameters()).dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            return head(x.to(weight_dtype)).float()

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Compute the named outputs of docs/ARCHITECTURE.md for one batch.

        The global text feature pools ``caption_ids``, whichever captions the data put there: the loaders
        decide (``data.mask_global_text``), the model has no switch of its own.

        Args:
            batch: ``images`` [B,3,H,W], ``caption_ids`` [B,L]; for MLM also ``mlm_labels`` [B,L] (label
                0 = not masked) and, when ``caption_ids`` are not themselves the masked captions,
                ``mlm_ids`` [B,L] (the masked captions). A batch with ``mlm_labels`` but no ``mlm_ids``
                feeds ``caption_ids`` to the IRR branch too: one text-tower pass serves both branches.

        Returns:
            ``image_feats``/``text_feats`` [B,D] fp32; ``logit_scale`` 0-dim fp32; ``image_logits``/
            ``text_logits`` [B,C] with a classifier; ``mlm_logits`` [M,V] and ``mlm_labels`` [M] (masked
            positions only) or [B*L,V] and [B*L] (all positions) when the batch has ``mlm_labels`` and the
            model has the IRR module.
        """
        image_tokens = self.base_model.encode_image(batch["images"])
        out: dict[str, Any] = {"image_feats": image_tokens[:, 0].float()}
        caption_ids = batch["caption_ids"]
        run_irr = self.with_mlm and "mlm_labels" in batch
        if not run_irr:
            text_feats = self.base_model.encode_text(caption_ids, all_tokens=False)
        elif "mlm_ids" in batch:
            # One pass over both caption sets together keeps the batch large on the GPU.
            n = caption_ids.shape[0]
            tokens = self.base_model.encode_text(torch.cat([caption_ids, batch["mlm_ids"]]))
            caption_tokens, mlm_tokens = tokens.split([n, n])
            text_feats = _eot(caption_tokens, caption_ids)
        else:
            # caption_ids are the masked captions (the official aliasing, IRRA_SPEC 3.3)
            mlm_tokens = self.base_model.encode_text(caption_ids)
            text_feats = _eot(mlm_tokens, caption_ids)
        out["text_feats"] = text_feats.float()
        out["logit_scale"] = self.logit_scale.float()

        if self.num_classes > 0:
            # one GEMM for both modalities through the shared classifier
            logits = self._fp32_head(self.classifier, torch.cat([out["image_feats"], out["text_feats"]]))
            n = out["image_feats"].shape[0]
            out["image_logits"], out["text_logits"] = logits.split([n, n])

        if run_irr:
            fused = self.cross_former(mlm_tokens, image_tokens)
            labels = batch["mlm_labels"].reshape(-1)
            fused = fused.reshape(-1, fused.shape[-1])
            if self.mlm_logits_at_masked_only:
                # Boolean indexing has a data-dependent size: one device->host sync per step, accepted
                # because it shrinks the [B*L, 49408] logits to [M, 49408] (M ~ 15% of the words).
                selected = labels != 0
                fused, labels = fused[selected], labels[selected]
            out["mlm_logits"] = self._fp32_head(self.mlm_head, fused)
            out["mlm_labels"] = labels
        return out


def _eot(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The EOT row of each sequence: tokens [B, L, D] at the argmax of ids [B, L] -> [B, D]."""
    return tokens[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]


def _attn_impl_of(model: nn.Module) -> AttnImpl:
    for sub in model.modules():
        if isinstance(sub, MultiheadAttention):
            return sub.attn_impl
    return "sdpa"


def build_irra(num_classes: int, clip: CLIP | None = None, *, cmt_depth: int = 4, temperature: float = 0.02,
               with_mlm: bool = True, mlm_logits_at_masked_only: bool = True, attn_impl: AttnImpl = "sdpa",
               **clip_sizes: Any) -> IRRA:
    """Build IRRA around ``clip``, or around a randomly initialised CLIP of the given sizes.

    Args:
        num_classes: training identities (0: no classifier).
        clip: an existing CLIP (e.g. from :func:`load_openai_clip`); None builds one from ``clip_sizes``.
        cmt_depth: cross-modal transformer layers.
        temperature: fixed temperature (logit scale 1 / temperature).
        with_mlm: build the IRR module.
        mlm_logits_at_masked_only: see :class:`IRRA`.
        attn_impl: attention of a newly built CLIP (an existing ``clip`` keeps its own).
        **clip_sizes: keyword arguments of :func:`irra_dist.model.clip.build_clip` (defaults: ViT-B/16 at
            384x128).
    """
    if clip is None:
        clip = build_clip(**clip_sizes, attn_impl=attn_impl)
    elif clip_sizes:
        raise ValueError(f"pass either a CLIP model or its sizes, not both (got sizes {sorted(clip_sizes)})")
    return IRRA(clip, num_classes, cmt_depth=cmt_depth, temperature=temperature, with_mlm=with_mlm,
                mlm_logits_at_masked_only=mlm_logits_at_masked_only)


# ModelConfig fields that give the tower sizes of a random-init CLIP
_CONFIG_SIZE_FIELDS = ("embed_dim", "patch_size", "vision_width", "vision_layers", "vision_heads",
                       "context_length", "vocab_size", "text_width", "text_heads", "text_layers")


def build_irra_from_config(cfg: ModelConfig, num_classes: int, with_mlm: bool = True) -> IRRA:
    """Build IRRA from the ``model`` section of a run config.

    ``cfg.pretrained == "none"`` gives a random-init CLIP of the configured sizes; anything else is passed to
    :func:`load_openai_clip` (an OpenAI name or a path), whose tensors then decide the tower sizes.
    The new modules are initialised after CLIP is loaded, as in the official code.
    """
    if cfg.pretrained.lower() == "none":
        sizes = {name: getattr(cfg, name) for name in _CONFIG_SIZE_FIELDS}
        clip = build_clip(**sizes, image_size=tuple(cfg.image_size), stride_size=cfg.stride_size)
    else:
        clip = load_openai_clip(cfg.pretrained, image_size=tuple(cfg.image_size), stride_size=cfg.stride_size,
                                verify_checksum=cfg.verify_checksum)
    model = IRRA(clip, num_classes, cmt_depth=cfg.cmt_depth, temperature=cfg.temperature, with_mlm=with_mlm,
                 mlm_logits_at_masked_only=cfg.mlm_logits_at_masked_only)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model
