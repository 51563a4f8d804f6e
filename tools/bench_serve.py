"""Throughput and latency of `grpo-agent serve` on the bundled model, at 1, 4 and 16 concurrent clients,
against the same requests sent one at a time, in one run.

A server (uvicorn in this process, on 127.0.0.1) answers eval.jsonl questions with the default agent
(K from --k, retrieval, scoring, logging to a temporary store). Sequential: --requests requests, one after
the other. Concurrent: C clients each send --requests / C requests back to back (the same total). Requests
that arrive together share one sampling call, so throughput should grow with the number of clients.

    .venv/bin/python tools/bench_serve.py [--k 4 --max-tokens 32 --requests 16 --clients 1 4 16]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from benchlib import DATA, read_jsonl, write_report

from grpo_agent.agent import GRPOAgent
from grpo_agent.config import Config, SamplingConfig
from grpo_agent.records import Passage
from grpo_agent.retrieval import Embedder, FactIndex
from grpo_agent.server import ServerConfig, create_app


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run_clients(url: str, questions: list[str], clients: int, max_tokens: int) -> dict:
    """`clients` threads share the questions, each sending its share back to back."""
    latencies: list[float] = []

    def one(q: str) -> None:
        t0 = time.perf_counter()
        r = httpx.post(url, json={"messages": [{"role": "user", "content": q}], "max_tokens": max_tokens}, timeout=600)
        r.raise_for_status()
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, questions))
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(questions), "seconds": wall, "requests_per_s": len(questions) / wall,
            "p50_s": statistics.median(latencies), "p99_s": percentile(latencies, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=16, help="requests per measurement")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--out", default="tools/results/bench_serve.json")
    args = ap.parse_args()
    import uvicorn

    passages = [Passage(**p) for p in read_jsonl(DATA / "passages.jsonl")]
    index = FactIndex.build(passages, Embedder())
    cfg = Config(sampling=SamplingConfig(k=args.k, max_new_tokens=args.max_tokens, temperature=0.8))
    store = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "store.sqlite"
    agent = GRPOAgent.from_config(cfg, store_path=store, index=index)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(agent, ServerConfig(port=port, max_batch=16))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    questions = [q["question"] for q in read_jsonl(DATA / "eval.jsonl")][: args.requests]
    run_clients(url, questions[:2], 1, args.max_tokens)  # warm-up

    rows = []
    for clients in args.clients:
        row = run_clients(url, questions, clients, args.max_tokens)
        rows.append(row)
        print(f"{clients:3d} clients: {row['requests_per_s']:.3f} req/s, p50 {row['p50_s']:.1f} s, "
              f"p99 {row['p99_s']:.1f} s", flush=True)
    sequential = rows[0]["requests_per_s"] if rows[0]["clients"] == 1 else None
    for row in rows:
        row["speedup_vs_sequential"] = row["requests_per_s"] / sequential if sequential else None
    server.should_exit = True
    write_report({"benchmark": "serve", "settings": vars(args), "batches": app.state.batcher.batches,
                  "logged_groups": agent.store.count_groups(), "results": rows}, args.out)


if __name__ == "__main__":
    main()
