"""Base model vs training-free lessons vs a GRPO weight update, after the same groups.

On the bundled model and corpus: sample and self-score --groups groups (K answers each) on the first tasks of
train_questions.jsonl, once, with the base model. Then
  - training-free: the experience library learns from those groups (one greedy operation per group);
  - grpo:          the GRPO updater (LoRA; --lr, --groups-per-step) trains on the same groups;
and each system (base, training-free, grpo) is evaluated the same way: accuracy of greedy answers on the
first --eval questions of eval.jsonl, and the share of greedy answers to harm_probe.jsonl that the safety
rules flag as harmful advice (a proxy: the rules catch about half of the harmful answers, BENCHMARKS.md).
Cost of learning: wall time and tokens processed (prompt + generated for the lessons; prompt + completion
tokens through forward and backward for the update). Labels are used only to measure.

    .venv/bin/python tools/bench_experience.py [--groups 32 --k 4 --eval 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchlib import DATA, harmful_rate, read_jsonl, write_report

from grpo_agent.agent import GRPOAgent
from grpo_agent.config import Config, SamplingConfig, UpdateConfig
from grpo_agent.evaluation import evaluate
from grpo_agent.rollout.policy import load_policy
from grpo_agent.records import Passage
from grpo_agent.retrieval import Embedder, FactIndex
from grpo_agent.updater import GRPOUpdater


def measure(name: str, agent: GRPOAgent, eval_tasks, probes, species) -> dict:
    t0 = time.perf_counter()
    accuracy = evaluate(agent, eval_tasks, label_free=False, progress=False)
    harm = {"flagged_rate": harmful_rate(agent, probes, species), "n": len(probes)}
    row = {"system": name, "accuracy": accuracy.value, "eval_n": accuracy.n,
           "harm_flagged_rate": harm["flagged_rate"], "harm_n": harm["n"], "eval_seconds": time.perf_counter() - t0}
    print(f"{name:14s} accuracy {row['accuracy']:.3f} (n={row['eval_n']})  harmful advice flagged "
          f"{row['harm_flagged_rate']:.3f} (n={row['harm_n']})", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=32, help="groups learned from (tasks from train_questions)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--eval", type=int, default=60, help="eval.jsonl questions evaluated")
    ap.add_argument("--harm", type=int, default=92, help="harm_probe.jsonl requests evaluated")
    ap.add_argument("--lr", type=float, default=5e-5, help="the GRPO update's learning rate (as measured)")
    ap.add_argument("--groups-per-step", type=int, default=4)
    ap.add_argument("--out", default="tools/results/bench_experience.json")
    args = ap.parse_args()

    passages = [Passage(**p) for p in read_jsonl(DATA / "passages.jsonl")]
    species = sorted({p.metadata.get("species") for p in passages} - {None})
    tasks = read_jsonl(DATA / "train_questions.jsonl")[: args.groups]
    eval_tasks = read_jsonl(DATA / "eval.jsonl")[: args.eval]
    probes = read_jsonl(DATA / "harm_probe.jsonl")[: args.harm]
    embedder = Embedder()
    index = FactIndex.build(passages, embedder)
    cfg = Config(sampling=SamplingConfig(k=args.k, max_new_tokens=args.max_new_tokens,
                                         temperature=args.temperature, seed=0))
    work = Path(tempfile.mkdtemp(prefix="bench-experience-"))
    agent = GRPOAgent.from_config(cfg, store_path=work / "store.sqlite", policy=load_policy("default"), index=index)
    rows = [measure("base", agent, eval_tasks, probes, species)]

    # The same groups for both ways of learning, sampled and scored once by the base model.
    t0 = time.perf_counter()
    groups, contexts, scored = [], [], []
    for i in range(0, len(tasks), 8):
        g, c = agent.sample_groups([t["question"] for t in tasks[i : i + 8]])
        groups += g
        contexts += c
        scored += agent.scorer.score_groups(g, c)
    collect_s = time.perf_counter() - t0
    print(f"sampled and scored {len(groups)} groups of K={args.k} in {collect_s:.0f} s", flush=True)

    # Training-free: lessons from the groups, then the same evals with the lessons in every prompt.
    agent.use_experience(cfg)
    library = agent.experience
    prompt_tokens = sum(len(agent.policy.encode_chat(library.messages(g, c, s, [])))
                        for g, c, s in zip(groups, contexts, scored) if not g.zero_variance)
    t0 = time.perf_counter()
    for i in range(0, len(groups), 8):
        library.learn(groups[i : i + 8], contexts[i : i + 8], scored[i : i + 8])
    learn_s = time.perf_counter() - t0
    lessons = [x.text for x in library.lessons()]
    print(f"training-free: {len(lessons)} lessons in {learn_s:.0f} s; operations {dict(library.stats)}", flush=True)
    row = measure("training-free", agent, eval_tasks, probes, species)
    row.update(learn_seconds=learn_s, learn_tokens=prompt_tokens + len(groups) * library.max_new_tokens,
               lessons=lessons, operations=dict(library.stats))
    rows.append(row)
    agent.experience = None

    # GRPO: the same groups train a LoRA adapter.
    updater = GRPOUpdater(agent.policy, UpdateConfig(learning_rate=args.lr, groups_per_step=args.groups_per_step))
    t0 = time.perf_counter()
    history = updater.train(groups)
    update_s = time.perf_counter() - t0
    tokens = sum(m["tokens"] for m in history) + sum(
        len(g.prompt_token_ids) * len(g.completions) for g in groups if not g.zero_variance)
    print(f"grpo: {len(history)} steps in {update_s:.0f} s, final KL {history[-1]['kl'] if history else 0:.4f}",
          flush=True)
    row = measure("grpo", agent, eval_tasks, probes, species)
    row.update(learn_seconds=update_s, learn_tokens=tokens, steps=len(history),
               kl_last=history[-1]["kl"] if history else None)
    rows.append(row)

    write_report({"benchmark": "experience", "settings": vars(args), "collect_seconds": collect_s,
                  "zero_variance_groups": sum(g.zero_variance for g in groups), "results": rows}, args.out)


if __name__ == "__main__":
    main()
