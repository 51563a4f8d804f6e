"""Retrieval quality on the bundled corpus, and search latency of flat vs HNSW vs IVF at scale.

1. Quality: the bundled corpus (data/conservation/passages.jsonl) is indexed with the default embedder; for
   each held-out question in eval.jsonl, is its gold passage the top hit (recall@1) or in the top 5
   (recall@5)? Target recall@5 >= 0.9. Measured for every index kind.
2. Scale: synthetic corpora of 10k, 100k and 1M vectors shaped like real embeddings (each a noisy mix of two
   real passage embeddings, so there are clusters as in a real corpus; embedding a million texts on 2 cores
   would take most of an hour). Queries are the real eval questions' embeddings. For each index kind, the
   same constructor FactIndex uses: build time, single-query top-5 latency (p50, p99), and recall@5 of
   HNSW and IVF against exact (flat) search.

    .venv/bin/python tools/bench_retrieval.py [--sizes 10000 100000 1000000] [--out tools/results/bench_retrieval.json]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from benchlib import DATA, read_jsonl, write_report

from grpo_agent.records import Passage
from grpo_agent.retrieval import Embedder, FactIndex, _new_faiss_index



def quality(embedder: Embedder) -> dict:
    passages = [Passage(**p) for p in read_jsonl(DATA / "passages.jsonl")]
    questions = read_jsonl(DATA / "eval.jsonl")
    out = {"passages": len(passages), "questions": len(questions)}
    for kind in ("flat", "hnsw", "ivf"):
        index = FactIndex.build(passages, embedder, kind=kind)
        hits = index.search_batch([q["question"] for q in questions], k=5)
        ranks = [[h.passage.id for h in hs] for hs in hits]
        out[kind] = {
            "recall@1": float(np.mean([r[:1] == [q["passage_id"]] for r, q in zip(ranks, questions)])),
            "recall@5": float(np.mean([q["passage_id"] in r for r, q in zip(ranks, questions)])),
        }
        print(f"[quality] {kind:4s} recall@1 {out[kind]['recall@1']:.3f}  recall@5 {out[kind]['recall@5']:.3f}"
              f"  ({len(questions)} eval questions, {len(passages)} passages)")
    return out


def synthetic_vectors(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n unit vectors, each a random mix of two real embeddings plus noise, built in blocks."""
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        i, j = rng.integers(0, len(base), m), rng.integers(0, len(base), m)
        w = rng.uniform(0.5, 1.0, (m, 1)).astype(np.float32)
        v = w * base[i] + (1 - w) * base[j] + 0.35 * rng.standard_normal((m, base.shape[1]), dtype=np.float32) / np.sqrt(base.shape[1])
        out[start : start + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def scale(embedder: Embedder, sizes: list[int], n_queries: int) -> list[dict]:
    passages = read_jsonl(DATA / "passages.jsonl")
    base = embedder.encode([p["text"] for p in passages])
    queries = embedder.encode([q["question"] for q in read_jsonl(DATA / "eval.jsonl")])[:n_queries]
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        vectors = synthetic_vectors(base, n, rng)
        truth = None
        for kind in ("flat", "hnsw", "ivf"):
            t0 = time.perf_counter()
            index = _new_faiss_index(kind, vectors.shape[1], vectors)
            build_s = time.perf_counter() - t0
            index.search(queries[:2], 5)  # warm-up
            latencies, found = [], []
            for q in queries:
                t0 = time.perf_counter()
                _, ids = index.search(q[None, :], 5)
                latencies.append((time.perf_counter() - t0) * 1000)
                found.append(ids[0])
            found = np.array(found)
            if kind == "flat":
                truth = found
            recall = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found, truth)]))
            row = {"n": n, "kind": kind, "build_s": round(build_s, 2),
                   "p50_ms": round(float(np.percentile(latencies, 50)), 3),
                   "p99_ms": round(float(np.percentile(latencies, 99)), 3),
                   "recall@5_vs_flat": recall}
            rows.append(row)
            print(f"[scale] n={n:>9,d} {kind:4s} build {row['build_s']:7.1f} s  p50 {row['p50_ms']:8.3f} ms  "
                  f"p99 {row['p99_ms']:8.3f} ms  recall@5 vs flat {recall:.3f}", flush=True)
            del index
        del vectors
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=200, help="latency queries per index (eval questions)")
    ap.add_argument("--out", default="tools/results/bench_retrieval.json")
    args = ap.parse_args()
    import faiss

    embedder = Embedder()
    write_report({
        "benchmark": "retrieval",
        "embedder": embedder.name,
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "quality": quality(embedder),
        "scale": scale(embedder, args.sizes, args.queries),
    }, args.out)

if __name__ == "__main__":
    main()
