"""Ranking a gallery for free-text queries: cosine similarity of the global features, as in evaluation
(IRRA_SPEC 5)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from irra_dist.retrieval.errors import SearchError
from irra_dist.retrieval.gallery import Gallery
from irra_dist.retrieval.model import SearchModel
from irra_dist.retrieval.results import QueryResult
from irra_dist.tokenizer import tokenize
from irra_dist.visualize import top_k_matches

logger = logging.getLogger(__name__)


@torch.no_grad()
def search(search_model: SearchModel, gallery: Gallery, gallery_feats: torch.Tensor, texts: Sequence[str],
           query_pids: Sequence[int | None] | None = None, *, top_k: int = 10,
           device: torch.device | str = "cpu") -> list[QueryResult]:
    """Rank the gallery for each text by cosine similarity of the global features.

    Args:
        search_model: the loaded model.
        gallery: the gallery `gallery_feats` were computed from.
        gallery_feats: [G, D] image features.
        texts: the queries.
        query_pids: per query, its person id or None (correctness is then unknown).
        top_k: hits per query (capped at the gallery size).
        device: where the text tower runs.

    Returns:
        One :class:`QueryResult` per text, in order.
    """
    if not texts:
        raise SearchError("no query text: pass --query TEXT, --queries-file FILE or --from-split-captions N")
    if top_k < 1:
        raise SearchError(f"--top-k must be >= 1, got {top_k}")
    query_pids = list(query_pids) if query_pids is not None else [None] * len(texts)
    device = torch.device(device)
    model = search_model.model.to(device).eval()
    warn_long_queries(texts, model.base_model.context_length)
    ids = tokenize(list(texts), context_length=model.base_model.context_length)
    text_feats = torch.cat([model.encode_text(chunk.to(device)) for chunk in ids.split(256)])
    scores, indices = top_k_matches(text_feats.cpu(), gallery_feats, top_k)
    results = []
    for q, text in enumerate(texts):
        idx = indices[q].tolist()
        hit_pids = gallery.pids[indices[q]].tolist() if gallery.pids is not None else None
        qpid = query_pids[q]
        correct = [p == qpid for p in hit_pids] if hit_pids is not None and qpid is not None else None
        results.append(QueryResult(text, qpid, scores[q].tolist(), idx, gallery.names(idx), hit_pids,
                                   correct))
    return results


def warn_long_queries(texts: Sequence[str], context_length: int) -> list[int]:
    """Say once when queries are longer than the text tower reads (the rest is cut off, as in training).

    Returns:
        The 0-based positions of the queries that are cut.
    """
    from irra_dist.tokenizer import default_tokenizer

    tok = default_tokenizer()
    room = context_length - 2  # start and end tokens
    cut = [q for q, text in enumerate(texts) if len(tok.encode(text)) > room]
    if cut:
        words, used = 0, 0
        for word in texts[cut[0]].split():
            used += len(tok.encode(word))
            if used > room:
                break
            words += 1
        logger.warning("%d query/queries longer than the model reads (%d tokens): only the start is used, "
                       "e.g. the first %d words of query %d", len(cut), context_length, words, cut[0] + 1)
    return cut

