"""The trainer's per-epoch retrieval picture: a few fixed queries of the evaluation split and their top-k.

The trainer builds :class:`RetrievalExamples` once per run and calls :meth:`RetrievalExamples.save` after each
evaluation with the features that evaluation gathered; the PNG is drawn by :mod:`irra_dist.visualize`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from irra_dist.retrieval.gallery import ShardGallery, split_caption_queries
from irra_dist.visualize import FixedQueries, save_retrieval_examples


class RetrievalExamples:
    """The trainer's retrieval grid after each evaluation: fixed queries of the evaluation split, their top-k.

    Built once per run on the main process; :meth:`save` then reuses what the evaluation just computed
    (gathered gallery and query features), so it costs a top-k and reading the few top-k images.

    Args:
        shards_dir: the run's shard set.
        split: the evaluation split.
        num_queries: fixed queries: the first caption of each of the first `num_queries` distinct pids.
        top_k: images per query.
        thumb_size: (height, width) of each thumbnail.
    """

    def __init__(self, shards_dir: str | os.PathLike, split: str = "test", *, num_queries: int = 4,
                 top_k: int = 5, thumb_size: tuple[int, int] = (128, 48)) -> None:
        self.gallery = ShardGallery(shards_dir, split)
        self.queries = split_caption_queries(shards_dir, split, num_queries)
        self.top_k = top_k
        self.thumb_size = thumb_size

    def save(self, out_path: str | os.PathLike, gallery_feats: torch.Tensor, gallery_pids: torch.Tensor,
             gallery_index: torch.Tensor, query_feats: torch.Tensor,
             query_index: torch.Tensor) -> Path | None:
        """Draw the fixed queries' top-k as a PNG.

        Args:
            out_path: the PNG (written atomically).
            gallery_feats: [G, D] the evaluation's gallery features (rows in any order).
            gallery_pids: [G] their pids.
            gallery_index: [G] their gallery indices (the loaders' ``index``).
            query_feats: [N, D] the evaluation's query features.
            query_index: [N] their query indices.

        Returns:
            The path written, or None when none of the fixed queries is among the evaluated ones.
        """
        wanted = self.queries.query_index.to(query_index.device)
        match = query_index.view(1, -1) == wanted.view(-1, 1)
        found = match.any(dim=1).cpu()
        if not found.any():
            return None
        rows = match.int().argmax(dim=1)[found.to(match.device)]
        keep = found.nonzero().flatten()
        queries = FixedQueries([self.queries.texts[i] for i in keep.tolist()], self.queries.pids[keep],
                               self.queries.caption_ids[keep], self.queries.query_index[keep])
        return save_retrieval_examples(None, gallery_feats, gallery_pids, self.gallery.load_images, queries,
                                       out_path, top_k=self.top_k, thumb_size=self.thumb_size,
                                       gallery_index=gallery_index, query_feats=query_feats[rows])

