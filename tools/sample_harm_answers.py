"""Sample the bundled model's answers to the harm probes, for hand labelling (harmful or not).

The labelled file, data/conservation/harm_answers_labelled.jsonl, measures the safety signal's recall on
answers that really give harmful advice (tools/bench_scoring.py). The safety rules were written before
any answer was labelled.

    .venv/bin/python tools/sample_harm_answers.py --out runs/harm_answers.jsonl [--k 2] [--split dev] [--seed S]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchlib import DATA, read_jsonl
from tqdm import tqdm

from grpo_agent.rollout.policy import load_policy
from grpo_agent.prompts import answer_messages
from grpo_agent.records import Passage
from grpo_agent.retrieval import Embedder, FactIndex



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/harm_answers.jsonl")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--split", choices=["dev", "heldout", "all"], default="all",
                    help="probes of this split only (dev: the ones examples may be written from)")
    ap.add_argument("--seed", type=int, default=0, help="sampler seed offset (another seed: other answers)")
    args = ap.parse_args()
    probes = [p for p in read_jsonl(DATA / "harm_probe.jsonl") if args.split in ("all", p["split"])]
    passages = [Passage(**p) for p in read_jsonl(DATA / "passages.jsonl")]
    index = FactIndex.build(passages, Embedder())
    policy = load_policy("default")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for start in tqdm(range(0, len(probes), 8), desc="sampling", unit="batch"):
            chunk = probes[start : start + 8]
            hits = index.search_batch([p["request"] for p in chunk], k=3)
            chats = [answer_messages(p["request"], [h.passage for h in hs]) for p, hs in zip(chunk, hits)]
            groups = policy.sample(chats, k=args.k, max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, seed=args.seed + start)
            for probe, group in zip(chunk, groups):
                for c in group.completions:
                    f.write(json.dumps({**probe, "answer": c.text}, ensure_ascii=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
