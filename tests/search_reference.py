"""What the search and index tests share: the tiny model and its run folder, and the independent reference
they compare against (torchvision's test transform, the towers called directly, a plain argsort)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from irra_dist.config import config_from_dict, save_config
from irra_dist.model import IRRA, save_weights_safetensors
from irra_dist.tokenizer import tokenize

IMAGE_SIZE = (32, 16)
TINY = dict(embed_dim=32, image_size=IMAGE_SIZE, patch_size=8, stride_size=8, vision_width=32,
            vision_layers=1, vision_heads=2, text_width=32, text_heads=2, text_layers=1)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ROW = re.compile(r"^\s+(\d+)\s+(-?\d+\.\d{4})\s+(?:(\d+)\s+)?(?:(correct|wrong)\s+)?(\S+)$")
"""One printed hit: rank, score, pid (when known), correct/wrong (when the query's pid is known), name."""


def tiny_run_config(shards: Path) -> dict:
    """The run config of a random-init :data:`TINY` model over `shards`."""
    sizes = {k: v for k, v in TINY.items() if k != "image_size"}
    return {"model": {"pretrained": "none", "image_size": list(IMAGE_SIZE), "cmt_depth": 1, **sizes},
            "data": {"shards": str(shards)}}


def write_tiny_run(run: Path, model: IRRA, shards: Path) -> Path:
    """A run folder as the trainer leaves it (config.yaml + model.safetensors) holding `model`."""
    run.mkdir(parents=True)
    save_config(config_from_dict(tiny_run_config(shards)), run / "config.yaml")
    save_weights_safetensors(model, run / "model.safetensors")
    return run


def reference_transform() -> transforms.Compose:
    """The test transform written with torchvision directly: resize, to tensor, CLIP normalisation."""
    return transforms.Compose([transforms.Resize(IMAGE_SIZE), transforms.ToTensor(),
                               transforms.Normalize(CLIP_MEAN, CLIP_STD)])


def reference_feats(model: IRRA, paths: list[Path]) -> torch.Tensor:
    """Image features the plain way: :func:`reference_transform` and the image tower."""
    tf = reference_transform()
    images = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return model.encode_image(images)


def reference_ranking(model: IRRA, paths: list[Path], texts: list[str], k: int) -> tuple[list, torch.Tensor]:
    """Each text's top-k gallery positions and cosines, in fp64 with a full argsort."""
    gallery = reference_feats(model, paths).double()
    with torch.no_grad():
        text = model.encode_text(tokenize(texts)).double()
    cos = (text / text.norm(dim=1, keepdim=True)) @ (gallery / gallery.norm(dim=1, keepdim=True)).t()
    order = torch.argsort(cos, dim=1, descending=True)[:, :k]
    return order.tolist(), cos.gather(1, order)


def parse_search_output(stdout: str) -> list[list[tuple]]:
    """Per query, the printed rows as (rank, score, pid or None, match or None, name)."""
    queries: list[list[tuple]] = []
    for line in stdout.splitlines():
        if line.startswith("query "):
            queries.append([])
        elif (m := ROW.match(line)) and queries:
            rank, score, pid, match, name = m.groups()
            queries[-1].append((int(rank), float(score), None if pid is None else int(pid), match, name))
    return queries
