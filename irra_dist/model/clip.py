"""CLIP towers as IRRA uses them, and loading of OpenAI's released CLIP checkpoints.

The module tree and parameter names follow OpenAI CLIP exactly (``visual.conv1.weight``,
``transformer.resblocks.N.attn.in_proj_weight``, ...), so OpenAI and official IRRA state dicts load with
``strict=True``. Three things differ from OpenAI's own ``CLIP`` class, all as in IRRA (IRRA_SPEC 1.1):
the image may be non-square with a patch stride, and both towers apply their final LayerNorm and
projection to every token, not only to CLS / EOT.

Attention runs through ``F.scaled_dot_product_attention`` on batch-first tensors; ``attn_impl="math"``
runs the same parameters through the explicit ``softmax(q k^T / sqrt(d)) v`` that ``nn.MultiheadAttention``
computed in the official code's PyTorch (the naive baseline for benchmarks and a reference in tests).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from irra_dist.fileio import file_sha256

logger = logging.getLogger(__name__)

AttnImpl = Literal["sdpa", "math"]
ATTN_IMPLS = ("sdpa", "math")
OPENAI_CACHE_DIR = Path("~/.cache/clip")
# Entries of OpenAI's archives that are metadata, not weights (OpenAI's build_model drops them too).
OPENAI_EXTRA_KEYS = ("logit_scale", "input_resolution", "context_length", "vocab_size")


class CheckpointError(ValueError):
    """A weights file that cannot be used: missing, unreadable, truncated, or of the wrong kind.

    The message is one line naming the file and what irra_dist expected to find there.
    """


# --------------------------------------------------------------------------------------------------
# Building blocks


class QuickGELU(nn.Module):
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention with ``nn.MultiheadAttention``'s parameter names and init.

    ``in_proj_weight`` stacks the q, k and v projections ([3D, D]) exactly as in ``nn.MultiheadAttention``,
    so checkpoints written by the official code load unchanged. Dropout is 0, as in CLIP and IRRA.

    Args:
        embed_dim: model width D.
        num_heads: attention heads; must divide ``embed_dim``.
        attn_impl: "sdpa" (fused kernels) or "math" (the explicit softmax, materialising [B,H,Lq,Lk]).
    """

    def __init__(self, embed_dim: int, num_heads: int, attn_impl: AttnImpl = "sdpa") -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"attention width {embed_dim} is not divisible by {num_heads} heads: "
                             "choose heads that divide the width")
        _check_attn_impl(attn_impl)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.MultiheadAttention``'s init: Xavier-uniform in-projection, zero biases."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor | None = None, *,
                is_causal: bool = False) -> torch.Tensor:
        """Attend from ``query`` [B, Lq, D] to ``key_value`` [B, Lk, D] (itself when None).

        Returns:
            [B, Lq, D], after ``out_proj``.
        """
        batch, q_len, width = query.shape
        heads = self.num_heads
        head_dim = width // heads  # explicit, not -1: a rank may hold an empty batch (B = 0)
        if key_value is None:
            # one fused GEMM for q, k and v
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
            q, k, v = qkv.view(batch, q_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = F.linear(query, self.in_proj_weight[:width], self.in_proj_bias[:width])
            kv = F.linear(key_value, self.in_proj_weight[width:], self.in_proj_bias[width:])
            q = q.view(batch, q_len, heads, head_dim).transpose(1, 2)
            k, v = kv.view(batch, key_value.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.attn_impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        else:
            out = _math_attention(q, k, v, is_causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, q_len, width))


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> torch.Tensor:
    """The attention of ``nn.MultiheadAttention`` in PyTorch 1.9: scale q, bmm, add mask, softmax, bmm."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if is_causal:
        q_len, k_len = scores.shape[-2:]
        mask = torch.full((q_len, k_len), float("-inf"), device=scores.device, dtype=scores.dtype).triu(1)
        scores = scores + mask
    return scores.softmax(dim=-1) @ v


class ResidualAttentionBlock(nn.Module):
    """CLIP's pre-LN transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, width: int, heads: int, attn_impl: AttnImpl = "sdpa") -> None:
        super().__init__()
        self.attn = MultiheadAttention(width, heads, attn_impl)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """Apply the block.

        Args:
            x: [B, L, D].
            is_causal: mask attention to later positions (the text tower).

        Returns:
            [B, L, D].
        """
        x = x + self.attn(self.ln_1(x), is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` (``resblocks.N``), batch-first.

    Args:
        width: model width.
        layers: number of blocks.
        heads: attention heads per block.
        causal: apply the causal (text) mask in every block.
        attn_impl: see :class:`MultiheadAttention`.
    """

    def __init__(self, width: int, layers: int, heads: int, *, causal: bool = False,
                 attn_impl: AttnImpl = "sdpa") -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.causal = causal
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, attn_impl) for _ in range(layers))

    def init_clip_weights(self) -> None:
        """CLIP's stds for the text transformer (also IRRA's cross-modal transformer, IRRA_SPEC 1.5)."""
        attn_std = self.width ** -0.5
        proj_std = self.width ** -0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run every block on x [B, L, D]; returns [B, L, D]."""
        use_checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.resblocks:
            if use_checkpoint:
                x = checkpoint(block, x, self.causal, use_reentrant=False)
            else:
                x = block(x, self.causal)
        return x


class VisionTransformer(nn.Module):
    """CLIP's ViT image tower for a (possibly non-square) image with a patch stride.

    Args:
        image_size: input (height, width).
        patch_size: patch side.
        stride_size: patch stride; equal to ``patch_size`` means no overlap.
        width: tower width.
        layers: transformer blocks.
        heads: attention heads.
        output_dim: width after ``proj`` (the joint embedding size).
        attn_impl: see :class:`MultiheadAttention`.
    """

    def __init__(self, image_size: tuple[int, int], patch_size: int, stride_size: int, width: int,
                 layers: int, heads: int, output_dim: int, attn_impl: AttnImpl = "sdpa") -> None:
        super().__init__()
        height, img_width = image_size
        if min(height, img_width) < patch_size:
            raise ValueError(f"image_size {tuple(image_size)} is smaller than the patch size {patch_size}: "
                             "use a larger image")
        self.image_size = (int(height), int(img_width))
        self.patch_size = patch_size
        self.stride_size = stride_size
        self.num_y = (height - patch_size) // stride_size + 1
        self.num_x = (img_width - patch_size) // stride_size + 1
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=stride_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.num_y * self.num_x + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, attn_impl=attn_impl)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor, all_tokens: bool = True) -> torch.Tensor:
        """Encode images.

        Args:
            x: [B, 3, H, W].
            all_tokens: return every token (IRRA's training path) or only CLS. ``ln_post`` and ``proj`` act
                per token, so the CLS row is the same either way.

        Returns:
            [B, 1 + num_y*num_x, output_dim] (CLS first), or [B, output_dim] when ``all_tokens`` is False.
        """
        # DeepSpeed fp16/bf16 engines hold half weights but hand over fp32 images
        x = self.conv1(x.to(self.conv1.weight.dtype))
        # The residual stream stays in the weights' dtype (fp32 under autocast), as in the text tower.
        x = x.flatten(2).transpose(1, 2).to(self.positional_embedding.dtype)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        if not all_tokens:
            x = x[:, 0]
        return self.ln_post(x) @ self.proj


# --------------------------------------------------------------------------------------------------
# CLIP


@dataclass(frozen=True)
class ClipSizes:
    """Everything needed to build a :class:`CLIP` of a given shape (heads explicit so tiny models work)."""

    embed_dim: int = 512
    image_size: tuple[int, int] = (384, 128)
    patch_size: int = 16
    stride_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12


class CLIP(nn.Module):
    """OpenAI CLIP's ViT image tower and causal text transformer, returning all tokens (IRRA_SPEC 1.1).

    There is no ``logit_scale`` here: IRRA fixes it outside CLIP.
    """

    def __init__(self, sizes: ClipSizes, attn_impl: AttnImpl = "sdpa") -> None:
        super().__init__()
        self.sizes = sizes
        self.embed_dim = sizes.embed_dim
        self.context_length = sizes.context_length
        self.vocab_size = sizes.vocab_size
        self.visual = VisionTransformer(tuple(sizes.image_size), sizes.patch_size, sizes.stride_size,
                                        sizes.vision_width, sizes.vision_layers, sizes.vision_heads,
                                        sizes.embed_dim, attn_impl)
        self.transformer = Transformer(sizes.text_width, sizes.text_layers, sizes.text_heads, causal=True,
                                       attn_impl=attn_impl)
        self.token_embedding = nn.Embedding(sizes.vocab_size, sizes.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(sizes.context_length, sizes.text_width))
        self.ln_final = nn.LayerNorm(sizes.text_width)
        self.text_projection = nn.Parameter(torch.empty(sizes.text_width, sizes.embed_dim))
        self.init_parameters()

    def init_parameters(self) -> None:
        """OpenAI's ``initialize_parameters``: text-side stds; the image tower keeps its constructor init."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_clip_weights()
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)

    def set_grad_checkpointing(self, enable: bool = True, towers: Iterable[str] = ("visual", "text")) -> None:
        """Recompute block activations in the backward pass (less memory, about a third more compute).

        Args:
            enable: turn checkpointing on or off.
            towers: which towers it applies to, any of "visual" and "text".
        """
        towers = set(towers)
        unknown = towers - {"visual", "text"}
        if unknown:
            raise ValueError(f"unknown tower(s) {sorted(unknown)} for grad checkpointing: "
                             "use 'visual' and/or 'text'")
        if "visual" in towers:
            self.visual.transformer.grad_checkpointing = enable
        if "text" in towers:
            self.transformer.grad_checkpointing = enable

    def encode_image(self, image: torch.Tensor, all_tokens: bool = True) -> torch.Tensor:
        """Images [B,3,H,W] -> [B, 1+N, D] (all tokens) or [B, D] (CLS only)."""
        return self.visual(image, all_tokens)

    def encode_text(self, text: torch.Tensor, all_tokens: bool = True) -> torch.Tensor:
        """Token ids [B, L] (L <= context_length) -> [B, L, D], or the EOT rows [B, D] if not ``all_tokens``.

        The EOT token is the largest id of each row (49407), as in CLIP and IRRA.
        """
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        x = self.transformer(x)
        if not all_tokens:
            x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        return self.ln_final(x) @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (image tokens [B, 1+N, D], text tokens [B, L, D]), like IRRA's modified CLIP."""
        return self.encode_image(image), self.encode_text(text)


def _check_attn_impl(attn_impl: str) -> None:
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl {attn_impl!r}: use one of {ATTN_IMPLS}")


def set_attn_impl(module: nn.Module, attn_impl: AttnImpl) -> None:
    """Switch every attention layer under ``module`` to "sdpa" or "math" (same parameters)."""
    _check_attn_impl(attn_impl)
    for sub in module.modules():
        if isinstance(sub, MultiheadAttention):
            sub.attn_impl = attn_impl


def build_clip(embed_dim: int = 512, image_size: tuple[int, int] = (384, 128), patch_size: int = 16,
               stride_size: int = 16, vision_width: int = 768, vision_layers: int = 12,
               vision_heads: int = 12, context_length: int = 77, vocab_size: int = 49408,
               text_width: int = 512, text_heads: int = 8, text_layers: int = 12, *,
               attn_impl: AttnImpl = "sdpa") -> CLIP:
    """A randomly initialised CLIP (CLIP's own init stds); the defaults give ViT-B/16 at 384x128.

    Build it under ``torch.device("meta")`` to count parameters without allocating them.
    """
    sizes = ClipSizes(embed_dim=embed_dim, image_size=(int(image_size[0]), int(image_size[1])),
                      patch_size=patch_size, stride_size=stride_size, vision_width=vision_width,
                      vision_layers=vision_layers, vision_heads=vision_heads, context_length=context_length,
                      vocab_size=vocab_size, text_width=text_width, text_heads=text_heads,
                      text_layers=text_layers)
    return CLIP(sizes, attn_impl)


# --------------------------------------------------------------------------------------------------
# Building CLIP from a state dict (the files are read in irra_dist.model.weights)


def count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of ``{prefix}resblocks.N.`` blocks (the largest N + 1)."""
    pattern = re.compile(re.escape(prefix) + r"resblocks\.(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


_CLIP_REQUIRED = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                  "visual.proj", "token_embedding.weight", "positional_embedding", "ln_final.weight",
                  "text_projection")


def infer_clip_sizes(state_dict: Mapping[str, torch.Tensor], image_size: tuple[int, int], stride_size: int,
                     source: str, prefix: str = "") -> ClipSizes:
    """Read a ViT CLIP's shape from its tensors (as OpenAI's ``build_model``; heads = width // 64).

    Args:
        state_dict: CLIP tensors under OpenAI's key names, each prefixed by ``prefix``.
        image_size: target (height, width); not stored in the tensors.
        stride_size: target patch stride.
        source: the file, for error messages.
        prefix: "" for OpenAI files, "base_model." inside IRRA checkpoints.

    Raises:
        CheckpointError: a ResNet CLIP or tensors that are not a ViT CLIP.
    """
    if any(k.startswith(prefix + "visual.layer1.") or k.startswith(prefix + "visual.attnpool.")
           for k in state_dict):
        raise CheckpointError(f"{source} is a ResNet CLIP checkpoint; IRRA needs a ViT CLIP: use ViT-B/16 "
                              "(the paper's), ViT-B/32 or ViT-L/14")
    missing = [prefix + k for k in _CLIP_REQUIRED if prefix + k not in state_dict]
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        raise CheckpointError(f"{source} is not a ViT CLIP checkpoint: missing {shown} "
                              "(expected OpenAI CLIP key names such as visual.conv1.weight)")
    conv = state_dict[prefix + "visual.conv1.weight"]
    vision_width = conv.shape[0]
    text_width = state_dict[prefix + "ln_final.weight"].shape[0]
    return ClipSizes(
        embed_dim=state_dict[prefix + "text_projection"].shape[1],
        image_size=(int(image_size[0]), int(image_size[1])),
        patch_size=conv.shape[-1],
        stride_size=stride_size,
        vision_width=vision_width,
        vision_layers=count_blocks(state_dict, prefix + "visual.transformer."),
        vision_heads=max(vision_width // 64, 1),
        context_length=state_dict[prefix + "positional_embedding"].shape[0],
        vocab_size=state_dict[prefix + "token_embedding.weight"].shape[0],
        text_width=text_width,
        text_heads=max(text_width // 64, 1),
        text_layers=count_blocks(state_dict, prefix + "transformer."),
    )


def resize_pos_embed(posemb: torch.Tensor, num_y: int, num_x: int) -> torch.Tensor:
    """Bilinearly resize a square g x g positional grid to num_y x num_x, keeping the CLS row (IRRA_SPEC 1.1).

    Args:
        posemb: [1 + g*g, C].
        num_y: target grid rows.
        num_x: target grid columns.

    Returns:
        [1 + num_y*num_x, C] in the dtype of ``posemb``.
    """
    cls, grid = posemb[:1], posemb[1:]
    side = math.isqrt(grid.shape[0])
    if side * side != grid.shape[0]:
        raise ValueError(f"positional grid of {grid.shape[0]} tokens is not square: cannot resize it to "
                         f"{num_y}x{num_x}; load the checkpoint at the image size it was trained with")
    grid = grid.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(num_y, num_x), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(num_y * num_x, -1)
    return torch.cat([cls.float(), grid]).to(posemb.dtype)


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load fp32 copies of ``state_dict`` into ``model`` strictly, replacing its (possibly meta) tensors.

    Raises:
        CheckpointError: missing/unexpected keys or shape mismatches, naming a few of them.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state_dict and state_dict[k].shape != v.shape]
    problems = [(name, items) for name, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if items]
    if problems:
        detail = "; ".join(f"{name}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
                           for name, items in problems)
        raise CheckpointError(f"{source} does not match the model built from its own shapes ({detail})")
    # Copies in fp32: the official files mix fp16 (Linear/Conv/MHA/proj) with fp32 (LN, embeddings).
    # One copy each, so the model never aliases the caller's tensors.
    fp32 = {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype, copy=True).contiguous()
            for k, v in state_dict.items()}
    model.load_state_dict(fp32, strict=True, assign=True)


# --------------------------------------------------------------------------------------------------
# OpenAI checkpoints


def openai_checksums() -> dict[str, dict[str, str]]:
    """OpenAI model name -> {"file": file name, "sha256": digest}, shipped in irra_dist/assets."""
    text = resources.files("irra_dist").joinpath("assets", "openai_clip_checksums.json").read_text()
    return json.loads(text)["models"]


def resolve_openai_path(name_or_path: str | Path) -> tuple[Path, str | None]:
    """Map an OpenAI model name ("ViT-B/16") to ~/.cache/clip/<OpenAI file name>; other values are paths.

    Returns:
        (path, expected SHA-256 or None when the file is not one of OpenAI's releases).
    """
    table = openai_checksums()
    key = str(name_or_path)
    if key in table:
        return (OPENAI_CACHE_DIR / table[key]["file"]).expanduser(), table[key]["sha256"]
    path = Path(key).expanduser()
    by_file = {entry["file"]: entry["sha256"] for entry in table.values()}
    return path, by_file.get(path.name)


def load_openai_clip(path: str | Path, image_size: tuple[int, int] = (384, 128), stride_size: int = 16,
                     verify_checksum: bool = False, *, attn_impl: AttnImpl = "sdpa") -> CLIP:
    """Build CLIP from an OpenAI checkpoint, rebuilt for IRRA's input size (IRRA_SPEC 1.1).

    Args:
        path: a file, or an OpenAI name such as "ViT-B/16", looked up as ~/.cache/clip/ViT-B-16.pt.
            The file is OpenAI's TorchScript archive or a plain state dict saved with ``torch.save``.
        image_size: input (height, width); the 14x14 (for B/16) positional grid is interpolated to it.
        stride_size: patch stride (16 = no overlap for B/16).
        verify_checksum: compare the file's SHA-256 with OpenAI's published value first.
        attn_impl: "sdpa" or "math" attention.

    Returns:
        An fp32 :class:`CLIP` on the CPU.

    Raises:
        CheckpointError: missing, truncated or non-CLIP file, a ResNet CLIP, or a checksum mismatch.
    """
    resolved, expected_sha = resolve_openai_path(path)
    what = "an OpenAI ViT CLIP checkpoint (TorchScript archive or torch.save'd state dict)"
    if not resolved.is_file():
        named = f" for {path!r}" if str(path) != str(resolved) else ""
        raise CheckpointError(f"CLIP weights not found: looked for {resolved}{named}; expected {what}: "
                              f"download OpenAI's file there or pass its path")
    if verify_checksum:
        if expected_sha is None:
            raise CheckpointError(f"no published SHA-256 for {resolved.name} (OpenAI file names: "
                                  f"{sorted(e['file'] for e in openai_checksums().values())}); "
                                  "set verify_checksum=False to skip the check")
        actual = file_sha256(resolved)
        if actual != expected_sha:
            raise CheckpointError(f"SHA-256 of {resolved} is {actual}, expected {expected_sha}: the file is "
                                  "corrupt or not OpenAI's release; download it again")
    from irra_dist.model.weights import read_clip_state_dict  # weights.py builds on this module

    return clip_from_state_dict(read_clip_state_dict(resolved, what), str(resolved), image_size, stride_size,
                                attn_impl)


def clip_from_state_dict(state_dict: Mapping[str, torch.Tensor], source: str,
                         image_size: tuple[int, int] = (384, 128), stride_size: int = 16,
                         attn_impl: AttnImpl = "sdpa") -> CLIP:
    """Build an fp32 :class:`CLIP` from OpenAI's tensors, its positional grid interpolated to `image_size`.

    Raises:
        CheckpointError: tensors that are not a ViT CLIP, or a grid that cannot be resized.
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in OPENAI_EXTRA_KEYS}
    sizes = infer_clip_sizes(state_dict, image_size, stride_size, source)
    with torch.device("meta"):
        model = CLIP(sizes, attn_impl)
    pos_key = "visual.positional_embedding"
    num_y, num_x = model.visual.num_y, model.visual.num_x
    if state_dict[pos_key].shape[0] != num_y * num_x + 1:
        try:
            state_dict[pos_key] = resize_pos_embed(state_dict[pos_key], num_y, num_x)
        except ValueError as err:
            raise CheckpointError(f"{source}: {err}") from None
    load_into(model, state_dict, source)
    logger.info("loaded CLIP from %s: %s", source, asdict(sizes))
    return model
