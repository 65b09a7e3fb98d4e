"""Gallery image features cached on disk, so that the next query against the same gallery only encodes text.

A cache file ``<cache>/gallery_<key>.safetensors`` holds the features ``[G, D]`` of one gallery under one
model; the key is the SHA-256 of the weights file, the gallery's ``content_key`` (the shard manifest plus
split, or the names, sizes and mtimes of a folder's images) and the input size. Images the gallery could not
read are recorded with the features and dropped again when the file is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from irra_dist.fileio import atomic_write
from irra_dist.retrieval.gallery import Gallery, warn_skipped
from irra_dist.retrieval.model import SearchModel, file_digest

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Part of the cache key: bump it when the cached features would change for the same inputs."""


def gallery_cache_path(cache_dir: Path, weights_sha256: str, gallery: Gallery,
                       image_size: tuple[int, int]) -> Path:
    """The cache file of one (weights, gallery content, input size) combination."""
    key = json.dumps({"version": CACHE_VERSION, "weights": weights_sha256, "gallery": gallery.content_key,
                      "image_size": list(image_size)}, sort_keys=True)
    return cache_dir / f"gallery_{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def _read_cache(path: Path, gallery: Gallery) -> torch.Tensor | None:
    """The cached features, with the gallery's unreadable images (recorded with them) dropped from it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            feats = f.get_tensor("feats")
            skipped = json.loads((f.metadata() or {}).get("skipped", "[]"))
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        logger.warning("ignoring unreadable gallery cache %s (%s); recomputing", path, err)
        return None
    num_images = len(gallery) - len(skipped)
    if feats.ndim != 2 or feats.shape[0] != num_images:
        logger.warning("ignoring gallery cache %s: %s features for %d images; recomputing", path,
                       tuple(feats.shape), num_images)
        return None
    if skipped:
        gallery.drop(skipped)
        warn_skipped(skipped, "the gallery (as when its features were cached)")
    return feats


def cached_gallery_features(search_model: SearchModel, gallery: Gallery, *, cache_dir: str | os.PathLike,
                            batch_size: int = 64, num_workers: int = 0,
                            device: torch.device | str = "cpu") -> tuple[torch.Tensor, Path, bool]:
    """Gallery image features, read from the cache or computed (and cached) with the image tower.

    Args:
        search_model: the loaded model.
        gallery: the images.
        cache_dir: folder of the cache files (created).
        batch_size: images per forward pass.
        num_workers: DataLoader workers decoding images.
        device: where the model runs.

    Returns:
        ``(feats [G, D] fp32 on the CPU, cache file, True if it was read from the cache)``.
    """
    cache_dir = Path(cache_dir)
    weights_sha = file_digest(search_model.weights_path, cache_dir)
    path = gallery_cache_path(cache_dir, weights_sha, gallery, search_model.image_size)
    if path.is_file():
        feats = _read_cache(path, gallery)
        if feats is not None:
            return feats, path, True
    from safetensors.torch import save_file

    device = torch.device(device)
    model = search_model.model.to(device).eval()
    feats = gallery.encode(model, search_model.image_size, batch_size=batch_size, num_workers=num_workers,
                           device=device).float().cpu().contiguous()
    meta = {"weights_sha256": weights_sha, "gallery": gallery.content_key,
            "image_size": ",".join(map(str, search_model.image_size)), "num_images": str(len(gallery)),
            "skipped": json.dumps(list(getattr(gallery, "skipped", [])))}
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file({"feats": feats}, tmp, metadata=meta))
    return feats, path, False

