#!/usr/bin/env python
"""Exact search (what `scripts/search.py` does) against faiss's ANN indexes, to decide when an
ANN index pays.

Run with:
    python benchmarks/search.py                          # 10k, 100k and 1M rows at 256 dims, ~5 min on 2 cores
    python benchmarks/search.py --sizes 10000 --dim 64   # a quick look

The rows are unit vectors drawn around 1,000 cluster centres (embeddings of a real set are
clustered; uniform random vectors are the worst case for every ANN index and flatter the exact
one); the queries are perturbed rows. Per size it prints, for one query at a time and for a batch
of 100: exact search as `SplitIndex` runs it (a float32 matrix product and top-k in torch), and,
when `faiss-cpu` is installed, faiss's flat index (exact, its own BLAS), HNSW (M 32) and IVF-Flat
(4·sqrt(N) lists, 16 probed): the time to build, milliseconds per query, recall@10 against exact,
and the number of queries after which building the ANN index has paid for itself.

faiss is not a dependency of the package: `pip install faiss-cpu` to include it here.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from loader import machine

K = 10


def clustered(n: int, dim: int, seed: int = 0, centres: int = 1000) -> np.ndarray:
    """Unit rows around random centres (noise a third of a centre's length)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):  # in blocks: 1M x dim normals at once doubles the peak
        stop = min(n, start + 100_000)
        block = c[rng.integers(0, centres, stop - start)] + rng.standard_normal((stop - start, dim)).astype(np.float32) / (3 * math.sqrt(dim))
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def exact_topk(index: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """What SplitIndex.search computes: scores of every row, then the top k."""
    return (queries @ index.T).topk(K, dim=1).indices


def per_query_ms(search, queries: np.ndarray, batch: int, budget_s: float = 3.0) -> float:
    """Milliseconds per query, searching `batch` queries a call, repeated for about `budget_s`."""
    search(queries[:batch])  # warm caches and thread pools
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s or done == 0:
        search(queries[done % len(queries) : done % len(queries) + batch])
        done += batch
    return (time.perf_counter() - start) / done * 1e3


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))


def measure(n: int, dim: int, num_queries: int = 200, with_faiss: bool = True, budget_s: float = 3.0) -> list[dict]:
    rows = clustered(n, dim)
    rng = np.random.default_rng(1)
    queries = rows[rng.integers(0, n, num_queries)] + rng.standard_normal((num_queries, dim)).astype(np.float32) * 0.05
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index, q = torch.from_numpy(rows), torch.from_numpy(queries)
    truth = exact_topk(index, q).numpy()
    exact = {"index": "exact (torch)", "build_s": 0.0, "recall@10": 1.0,
             "ms_1": per_query_ms(lambda x: exact_topk(index, torch.from_numpy(x)), queries, 1, budget_s),
             "ms_100": per_query_ms(lambda x: exact_topk(index, torch.from_numpy(x)), queries, 100, budget_s)}
    results = [exact]
    try:
        import faiss
    except ImportError:
        return results
    if not with_faiss:
        return results
    lists = int(4 * math.sqrt(n))
    builders = {
        "faiss flat": lambda: faiss.IndexFlatIP(dim),
        "faiss HNSW32": lambda: faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT),
        f"faiss IVF{lists}": lambda: faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT),
    }
    for name, build in builders.items():
        start = time.perf_counter()
        ann = build()
        if not ann.is_trained:
            ann.train(rows[np.random.default_rng(2).choice(n, min(n, 64 * lists), replace=False)])
        ann.add(rows)
        built = time.perf_counter() - start
        if hasattr(ann, "nprobe"):
            ann.nprobe = 16
        if hasattr(ann, "hnsw"):
            ann.hnsw.efSearch = 64
        results.append({
            "index": name, "build_s": built, "recall@10": recall(ann.search(queries, K)[1], truth),
            "ms_1": per_query_ms(lambda x: ann.search(x, K), queries, 1, budget_s),
            "ms_100": per_query_ms(lambda x: ann.search(x, K), queries, 100, budget_s),
        })
    for r in results:
        # Queries (one at a time) after which building the index cost less than exact search would have.
        saved = exact["ms_1"] - r["ms_1"]
        r["pays_after"] = math.inf if saved <= 0 else r["build_s"] * 1e3 / saved
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256, help="embedding width (an MRL size)")
    parser.add_argument("--no_faiss", action="store_true", help="exact search only")
    parser.add_argument("--seconds", type=float, default=3.0, help="time spent measuring each query rate")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"machine: {machine()}")
    out = {}
    for n in args.sizes:
        results = measure(n, args.dim, with_faiss=not args.no_faiss, budget_s=args.seconds)
        table = Table(title=f"{n:,} rows x {args.dim} dims (float32, {n * args.dim * 4 / 2**20:,.0f} MiB)")
        for column in ("index", "build s", "recall@10", "ms/query (1)", "ms/query (100)", "vs exact (1)", "pays after"):
            table.add_column(column, justify="left" if column == "index" else "right")
        for r in results:
            table.add_row(r["index"], f"{r['build_s']:.1f}", f"{r['recall@10']:.3f}", f"{r['ms_1']:.3f}",
                          f"{r['ms_100']:.3f}", f"{results[0]['ms_1'] / r['ms_1']:.1f}x",
                          "-" if r["index"].startswith("exact") else
                          ("never" if math.isinf(r["pays_after"]) else f"{r['pays_after']:,.0f} queries"))
        console.print(table)
        out[n] = results
    return out


if __name__ == "__main__":
    main()
