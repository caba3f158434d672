"""Retrieval metrics: Recall@K, MRR, median and mean rank, both directions, in chunks.

Query i's correct key is key i. Its rank is 1 + the number of *other* keys scoring at least as
high (ties count against the query, so a collapsed model that scores everything equally gets
the worst rank, not a lucky first place). Keys that share the query's group id (the same
caption) are not competitors. Scores are computed `chunk_size` queries at a time, so a
100k x 100k similarity matrix never exists in memory.

Multi-positive retrieval (`positive_ranks`): when samples carry a label or group (several
images of one class, several captions of one image), a query's rank is that of its best-scoring
positive — any key of its group — among the keys outside the group, as COCO/Flickr30k
evaluation counts any of an image's captions and classification counts any image of the class.

Non-finite values never score well: a non-finite embedding is an error (a diverged model would
otherwise rank every query first, since NaN >= x is false for every x), and a non-finite score
ranks last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edge_glass.utils.errors import UserError


class NonFiniteEmbeddings(UserError):
    """Embeddings holding NaN or inf: the model diverged (or its inputs are corrupt)."""


def check_finite(x: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(x).all(dim=-1)
    if bool(bad.any()):
        raise NonFiniteEmbeddings(
            f"{int(bad.sum())} of {len(x)} {what} embeddings are not finite (NaN or inf): the model diverged or its "
            "inputs are corrupt; retrieval metrics of such a model are meaningless"
        )


def _scored_chunks(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int):
    """(start, stop, cosine scores [stop-start, N]) of the queries, `chunk_size` rows at a time.

    A non-finite score (impossible from finite unit vectors, but never trusted) becomes -inf:
    as a competitor it beats nothing, as a query's own or best positive it is beaten by all."""
    check_finite(queries, "query")
    check_finite(keys, "key")
    q = F.normalize(queries.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    for start in range(0, q.shape[0], chunk_size):
        stop = min(start + chunk_size, q.shape[0])
        yield start, stop, torch.nan_to_num(q[start:stop] @ k.T, nan=-torch.inf)


def ranks(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int = 1024, group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[N] rank (1 = best) of each query's own key among all keys, by cosine similarity."""
    out = torch.empty(queries.shape[0], dtype=torch.long)
    for start, stop, scores in _scored_chunks(queries, keys, chunk_size):
        rows = torch.arange(stop - start)
        own = scores[rows, torch.arange(start, stop)]
        beats = (scores >= own[:, None]) | ~torch.isfinite(own)[:, None]
        beats[rows, torch.arange(start, stop)] = False  # a key does not compete with itself
        if group_ids is not None:
            beats &= group_ids[start:stop, None] != group_ids[None, :]
        out[start:stop] = 1 + beats.sum(dim=1).cpu()
    return out


def positive_ranks(queries: torch.Tensor, keys: torch.Tensor, groups: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """[N] rank (1 = best) of each query's best positive (a key of its group, itself included)
    among the keys outside its group; ties count against the query, as in `ranks`."""
    out = torch.empty(queries.shape[0], dtype=torch.long)
    for start, stop, scores in _scored_chunks(queries, keys, chunk_size):
        positive = groups[start:stop, None] == groups[None, :]
        best = scores.masked_fill(~positive, -torch.inf).max(dim=1).values
        beats = ((scores >= best[:, None]) | ~torch.isfinite(best)[:, None]) & ~positive
        out[start:stop] = 1 + beats.sum(dim=1).cpu()
    return out


def summarize(r: torch.Tensor, ks: list[int]) -> dict[str, float]:
    rf = r.double()
    metrics = {f"R@{k}": float((r <= k).double().mean()) for k in ks}
    metrics["MRR"] = float((1.0 / rf).mean())
    metrics["median_rank"] = float(rf.quantile(0.5))  # torch.median gives the lower middle
    metrics["mean_rank"] = float(rf.mean())
    return metrics


def retrieval_metrics(
    a: torch.Tensor,
    b: torch.Tensor,
    ks: list[int],
    chunk_size: int = 1024,
    group_ids: torch.Tensor | None = None,
    names: tuple[str, str] = ("a", "b"),
    labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Metrics for a->b (queries a, keys b) and b->a, keyed `"<a>-><b>/R@1"` and so on; with
    `labels` (one id per sample) also the multi-positive ones, `"<a>-><b>/group_R@1"`, ..."""
    out = {}
    for (qn, kn), (q, k) in (((names[0], names[1]), (a, b)), ((names[1], names[0]), (b, a))):
        for key, value in summarize(ranks(q, k, chunk_size, group_ids), ks).items():
            out[f"{qn}->{kn}/{key}"] = value
        if labels is not None:
            for key, value in summarize(positive_ranks(q, k, labels, chunk_size), ks).items():
                out[f"{qn}->{kn}/group_{key}"] = value
    return out
