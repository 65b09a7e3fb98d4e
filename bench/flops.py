"""Explicit FLOP count of the IRRA training step, per component, for MFU.

Counting rules (the usual ones for transformer MFU, e.g. the PaLM and Chinchilla appendices):

- Only matrix multiplies and convolutions are counted, as multiply-accumulates (MACs); one MAC is 2 FLOPs.
  LayerNorm, softmax, GELU, residual adds, embedding look-ups, the losses (SDM is a B x B matrix, far
  below 0.1 % of the step) and the optimizer update are left out.
- Attention is counted dense: the causal text mask is not credited with halving QK^T and AV, because the
  official model (and the naive variant here) computes the full 77 x 77 score matrix.
- A training step costs 3x its forward: the backward pass computes the gradient of both the activations
  and the weights, each costing about one forward. The patch-embedding convolution also gets an input
  gradient it does not need; that over-count is < 0.3 % of the step.
- The MLM head's cost depends on how many positions it runs at: the masked ones only (irra_dist) or all
  B x 77 positions (the official code). Callers pass that count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

# A MAC is a multiply and an add.
FLOPS_PER_MAC = 2
# Forward + backward (activation gradients + weight gradients) = 3 forwards.
TRAINING_MULTIPLIER = 3
# Official MLM masking selects each candidate token with this probability (IRRA_SPEC 3.3).
MLM_MASK_RATE = 0.15

# Peak dense bf16 tensor-core throughput, TFLOP/s, from the vendors' data sheets (no sparsity).
# Matched against torch.cuda.get_device_name(); the first matching key wins, so specific names come first.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "A100": 312.0,
    "RTX 3090": 71.0,
    "L4": 121.0,
}

COMPONENTS = ("image_tower", "text_tower", "cross_modal", "mlm_head", "classifier")


@dataclass(frozen=True)
class IrraShape:
    """The sizes that set the IRRA step's compute; defaults are the paper's ViT-B/16 model on CUHK-PEDES."""

    image_size: tuple[int, int] = (384, 128)
    """Input (height, width)."""
    patch_size: int = 16
    stride_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    embed_dim: int = 512
    """Joint feature width; also the width of the cross-modal module and the MLM head."""
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    vocab_size: int = 49408
    cmt_depth: int = 4
    num_classes: int = 11003
    mlp_ratio: int = 4
    """Hidden width of every transformer MLP over its model width (CLIP: 4)."""

    @classmethod
    def from_sizes(cls, sizes: Mapping[str, Any], cmt_depth: int, num_classes: int) -> IrraShape:
        """The shape of a model built with ``build_irra(num_classes, cmt_depth=..., **sizes)``.

        Keys that set no matrix size (the head counts) are ignored.
        """
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in sizes.items() if k in names}
        return cls(**{**kept, "image_size": tuple(sizes["image_size"]), "cmt_depth": cmt_depth,
                      "num_classes": num_classes})

    @property
    def num_patches(self) -> int:
        """Patches of the (possibly overlapping) stride grid, counted as the official ViT does."""
        height, width = self.image_size
        num_y = (height - self.patch_size) // self.stride_size + 1
        num_x = (width - self.patch_size) // self.stride_size + 1
        return num_y * num_x

    @property
    def image_tokens(self) -> int:
        """Patches plus the CLS token."""
        return self.num_patches + 1


def linear_macs(tokens: float, in_features: int, out_features: int) -> float:
    """MACs of a dense layer applied to `tokens` vectors (the bias add is not counted)."""
    return tokens * in_features * out_features


def attention_macs(query_tokens: int, key_tokens: int, width: int) -> float:
    """MACs of one multi-head attention over a single sequence.

    Q, K, V and output projections plus the score (QK^T) and weighted-sum (AV) products; the head count
    does not change the total.

    Args:
        query_tokens: Length of the query sequence.
        key_tokens: Length of the key/value sequence (equal to `query_tokens` for self-attention).
        width: Model width (sum over heads of the head width).
    """
    projections = linear_macs(query_tokens, width, width) * 2 + linear_macs(key_tokens, width, width) * 2
    scores_and_mix = 2 * query_tokens * key_tokens * width
    return projections + scores_and_mix


def mlp_macs(tokens: int, width: int, mlp_ratio: int = 4) -> float:
    """MACs of a transformer MLP: width -> mlp_ratio * width -> width."""
    hidden = mlp_ratio * width
    return linear_macs(tokens, width, hidden) + linear_macs(tokens, hidden, width)


def block_macs(tokens: int, width: int, mlp_ratio: int = 4) -> float:
    """MACs of one pre-LN residual attention block (self-attention + MLP) over one sequence."""
    return attention_macs(tokens, tokens, width) + mlp_macs(tokens, width, mlp_ratio)


def image_tower_macs(shape: IrraShape) -> float:
    """Forward MACs of one image: patch convolution, the ViT blocks, and the projection of every token."""
    patch_embed = linear_macs(shape.num_patches, 3 * shape.patch_size**2, shape.vision_width)
    blocks = shape.vision_layers * block_macs(shape.image_tokens, shape.vision_width, shape.mlp_ratio)
    # IRRA projects all 193 tokens (not only CLS) because the cross-modal module attends to them.
    projection = linear_macs(shape.image_tokens, shape.vision_width, shape.embed_dim)
    return patch_embed + blocks + projection


def text_tower_macs(shape: IrraShape) -> float:
    """Forward MACs of one caption: the text blocks and the projection of every token."""
    blocks = shape.text_layers * block_macs(shape.context_length, shape.text_width, shape.mlp_ratio)
    projection = linear_macs(shape.context_length, shape.text_width, shape.embed_dim)
    return blocks + projection


def cross_modal_macs(shape: IrraShape) -> float:
    """Forward MACs of the IRR module per caption: text-to-image cross-attention, then cmt_depth blocks."""
    cross = attention_macs(shape.context_length, shape.image_tokens, shape.embed_dim)
    blocks = shape.cmt_depth * block_macs(shape.context_length, shape.embed_dim, shape.mlp_ratio)
    return cross + blocks


def mlm_head_macs(shape: IrraShape, positions: float) -> float:
    """Forward MACs of the MLM head (dense 512->512, then the vocabulary projection) at `positions` tokens."""
    return linear_macs(positions, shape.embed_dim, shape.embed_dim) + linear_macs(
        positions, shape.embed_dim, shape.vocab_size
    )


def classifier_macs(shape: IrraShape, batch_size: int) -> float:
    """Forward MACs of the shared ID classifier, applied to the image and the text feature of each sample."""
    return linear_macs(2 * batch_size, shape.embed_dim, shape.num_classes)


def expected_masked_tokens(content_tokens: float, rate: float = MLM_MASK_RATE) -> float:
    """Expected masked positions in a caption of `content_tokens` maskable tokens (one is forced)."""
    return max(1.0, rate * content_tokens)


def forward_macs(
    shape: IrraShape, batch_size: int, *, mlm_positions: float, text_passes: int = 1
) -> dict[str, float]:
    """Forward MACs of one IRRA training batch, per component.

    Args:
        shape: Model sizes.
        batch_size: Image-caption pairs in the batch.
        mlm_positions: Positions the MLM head runs at, summed over the batch: the masked tokens
            (masked-only head) or batch_size * context_length (head at every position).
        text_passes: Text-tower passes per caption: 1 when the global text feature is read from the masked
            caption's pass (official aliasing, irra_dist default), 2 when the caption is encoded again.

    Returns:
        MACs keyed by the names in `COMPONENTS`.
    """
    return {
        "image_tower": batch_size * image_tower_macs(shape),
        "text_tower": text_passes * batch_size * text_tower_macs(shape),
        "cross_modal": batch_size * cross_modal_macs(shape),
        "mlm_head": mlm_head_macs(shape, mlm_positions),
        "classifier": classifier_macs(shape, batch_size),
    }


def training_flops(macs: dict[str, float]) -> dict[str, float]:
    """Training FLOPs (forward + backward) from forward MACs, per component, plus a "total" entry."""
    flops = {name: value * FLOPS_PER_MAC * TRAINING_MULTIPLIER for name, value in macs.items()}
    flops["total"] = sum(flops.values())
    return flops


def peak_bf16_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a GPU from its name, or None when it is not in `PEAK_BF16_TFLOPS`.

    Keys match as whole words ("NVIDIA L4" matches "L4", "NVIDIA L40S" does not).
    """
    words = device_name.replace("-", " ").split()
    for key, tflops in PEAK_BF16_TFLOPS.items():
        key_words = key.split()
        n = len(key_words)
        if any(words[i : i + n] == key_words for i in range(len(words) - n + 1)):
            return tflops
    return None
