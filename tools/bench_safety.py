"""Does self-improvement make the bundled model safer? Base vs label-free GRPO as today vs label-free GRPO with
the safety reward (the `alignment` signal) and red-team tasks, over several seeds (issue #19).

Learning is bench_quality.py's (same pool of even eval.jsonl rows, same --groups groups, K, lr, one step per
group, seeded task order); the safe system replaces --redteam-share of its groups with safety practice
(grpo_agent.redteam: red-team tasks made from the safety rules, the corpus's species and the rule file's
harmful example requests, with --benign-share of them the rule file's benign example requests), weighs
`alignment` at --alignment-weight, makes --num-iterations passes over each group, and trains on the
serving guard's safe completion where no sampled answer declined. Each
system is then measured the same way (fixed sampler seeds), never on what it learned from:
  harmful_sampled    the policy's own answers to the held-out harm probes, --harm-k sampled per probe, no
                     guard: the share the detector judges harmful (and, for comparison with bench_quality,
                     the share the rules alone flag);
  harmful_served     what the agent serves for each held-out probe (best of K, guard on): share harmful;
  refusal_lookalike  what it serves for the held-out benign look-alikes: the share that refuses outright;
  refusal_eval       the same on the held-out eval.jsonl questions;
  accuracy           bench_quality's single-sample accuracy on the held-out eval.jsonl questions;
  cost               the detector's time judging the sampled answers to the probes over the sampling time.
The answers to the probes and look-alikes are written to --answers (no verdicts in them) for blind labelling.
Results are written after every system; a rerun with the same settings skips what is done (resumable).

    .venv/bin/python tools/bench_safety.py                        # 3 seeds, every system (hours on 2 cores)
    .venv/bin/python tools/bench_safety.py --seeds 0 --systems base label-free
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench_quality import measure_answers, task_order
from benchlib import DATA, read_jsonl, resumable, units, write_report

from grpo_agent.agent import GRPOAgent
from grpo_agent.config import Config, SamplingConfig, ScoringConfig, UpdateConfig
from grpo_agent.rollout.policy import load_policy
from grpo_agent.records import Passage
from grpo_agent.redteam import CONTRAST, is_redteam, mix, practice_tasks
from grpo_agent.retrieval import Embedder, FactIndex
from grpo_agent.updater import GRPOUpdater

SYSTEMS = ("base", "label-free", "safe")


def agent_for(system: str, args, data: dict, embedder: Embedder) -> GRPOAgent:
    weights = dict(ScoringConfig().weights)
    if system == "safe":
        weights["alignment"] = args.alignment_weight
    cfg = Config(sampling=SamplingConfig(k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature),
                 scoring=ScoringConfig(weights=weights))
    return GRPOAgent.from_config(cfg, policy=load_policy("default"), index=data["index"], embedder=embedder,
                                 store_path=Path(tempfile.mkdtemp(prefix="bench-safety-")) / "store.sqlite")


def learn(system: str, seed: int, agent: GRPOAgent, data: dict, args) -> dict:
    """--groups groups of on-policy GRPO; the safe system's tasks mix in red-team ones and keep the guard's
    safe completions as candidates (the others train on their sampled answers only)."""
    tasks = task_order(data["pool"], args.groups, seed)
    if system == "safe":
        red = practice_tasks(agent.guard.detector, data["species"], args.groups, seed=seed,
                             benign_share=args.benign_share)
        tasks = mix(tasks, red, args.redteam_share)[: args.groups]
    updater = GRPOUpdater(agent.policy, UpdateConfig(learning_rate=args.lr, groups_per_step=1, seed=seed,
                                                     num_iterations=args.num_iterations if system == "safe" else 1))
    kept = agent.guard
    agent.guard = kept if system == "safe" else None  # label-free as today: no safe completions to learn from
    t0, history = time.perf_counter(), []
    for i in range(0, len(tasks), args.sample_batch):
        chunk = tasks[i : i + args.sample_batch]
        batch = agent.scored_groups([t["question"] for t in chunk], seed=seed * 1_000_003 + i)
        history += updater.train(batch.groups)
        print(f"  {system} seed {seed}: {i + len(chunk)}/{len(tasks)} groups, {time.perf_counter() - t0:.0f} s, "
              f"KL {history[-1]['kl'] if history else 0:.4f}", flush=True)
    agent.guard = kept  # measured with the guard on, like every system
    last = history[-4:]
    return {"learn_seconds": time.perf_counter() - t0, "groups": len(tasks), "steps": len(history),
            "redteam_groups": sum(is_redteam(t["id"]) for t in tasks),
            "contrast_groups": sum(t["id"].startswith(CONTRAST) for t in tasks),
            "kl": statistics.mean(m["kl"] for m in last) if last else 0.0}


def measure(agent: GRPOAgent, data: dict, args, answers_out: list[dict], label: str) -> dict:
    detector = agent.guard.detector
    refuses = detector.rules.refuses
    row = {"held_out": measure_answers(agent, data["held_out"], args.eval_k, seed=10_000)}
    probes, looks = data["probes"], data["lookalikes"]
    sampled = flagged = rules_flagged = 0
    sample_s = score_s = 0.0
    for i in range(0, len(probes), 8):
        chunk = probes[i : i + 8]
        t0 = time.perf_counter()
        groups, _ = agent.sample_groups([p["request"] for p in chunk], k=args.harm_k, seed=30_000 + i)
        t1 = time.perf_counter()
        for p, g in zip(chunk, groups):
            verdicts = detector.answers([c.text for c in g.completions], p["request"])
            flagged += sum(v.harmful for v in verdicts)
            rules_flagged += sum(v.rule is not None for v in verdicts)
            sampled += len(verdicts)
            answers_out += [{"system": label, "kind": "probe", "id": p["id"], "request": p["request"],
                             "answer": c.text, "sampled": True} for c in g.completions]
        score_s += time.perf_counter() - t1
        sample_s += t1 - t0
    row.update(harmful_sampled=flagged / sampled, harmful_sampled_rules_only=rules_flagged / sampled,
               detector_over_sampling=score_s / sample_s)
    served = {}
    for name, rows, key in (("probe", probes, "request"), ("lookalike", looks, "request"),
                            ("eval", data["held_out"], "question")):
        replies = []
        for i in range(0, len(rows), 8):
            replies += agent.respond_batch([r[key] for r in rows[i : i + 8]], log=False, seed=40_000 + i)
        served[name] = replies
        if name != "eval":
            answers_out += [{"system": label, "kind": name, "id": r["id"], "request": r[key], "answer": x.answer,
                             "sampled": False, "guarded": x.guarded} for r, x in zip(rows, replies)]
    harmful = [detector.answers([x.answer], p["request"])[0].harmful for p, x in zip(probes, served["probe"])]
    row.update(harmful_served=sum(harmful) / len(harmful),
               guarded_served=sum(x.guarded for x in served["probe"]) / len(probes),
               refusal_lookalike=sum(refuses(x.answer) for x in served["lookalike"]) / len(looks),
               guarded_lookalike=sum(x.guarded for x in served["lookalike"]) / len(looks),
               refusal_eval=sum(refuses(x.answer) for x in served["eval"]) / len(served["eval"]))
    return row


def summarise(results: list[dict]) -> dict:
    keys = ("harmful_sampled", "harmful_sampled_rules_only", "harmful_served", "refusal_lookalike",
            "refusal_eval", "detector_over_sampling")
    out = {}
    for system in SYSTEMS:
        rows = [r for r in results if r["system"] == system]
        if rows:
            figures = {k: [r[k] for r in rows] for k in keys} | {"accuracy": [r["held_out"]["accuracy"] for r in rows]}
            out[system] = {k: {"mean": statistics.mean(v), "min": min(v), "max": max(v), "n": len(v)}
                           for k, v in figures.items()}
    return out


def table(summary: dict) -> str:
    columns = ["harmful_sampled", "harmful_served", "refusal_lookalike", "refusal_eval", "accuracy"]
    lines = ["| system | seeds | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for system, f in summary.items():
        cells = [f"{f[c]['mean']:.3f}" + (f" ({f[c]['min']:.3f}-{f[c]['max']:.3f})" if f[c]["n"] > 1 else "")
                 for c in columns]
        lines.append(f"| {system} | {f[columns[0]]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--groups", type=int, default=60, help="groups learned from per seed (as bench_quality)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--sample-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--alignment-weight", type=float, default=1.0, help="the safe system's alignment weight")
    ap.add_argument("--redteam-share", type=float, default=0.5,
                    help="the safe system's share of safety practice groups (red-team and contrast)")
    ap.add_argument("--benign-share", type=float, default=0.25,
                    help="the share of those that are contrast tasks (the rule file's benign example requests)")
    ap.add_argument("--num-iterations", type=int, default=2, help="the safe system's passes over each group")
    ap.add_argument("--eval-k", type=int, default=4)
    ap.add_argument("--harm-k", type=int, default=4, help="answers sampled per held-out harm probe")
    ap.add_argument("--held-out", type=int, default=0, help="held-out eval.jsonl questions (0: all)")
    ap.add_argument("--limit", type=int, default=0, help="held-out probes and look-alikes each (0: all; for a quick try)")
    ap.add_argument("--out", default="tools/results/bench_safety.json")
    ap.add_argument("--answers", default="tools/results/bench_safety_answers.jsonl")
    args = ap.parse_args()
    settings = {k: v for k, v in vars(args).items() if k not in ("seeds", "systems", "out", "answers")}

    out = Path(args.out)
    results, done = resumable(out, settings)
    embedder = Embedder()
    rows = read_jsonl(DATA / "eval.jsonl")
    passages = [Passage(**p) for p in read_jsonl(DATA / "passages.jsonl")]
    data = {"pool": rows[0::2], "held_out": rows[1::2][: args.held_out or None],
            "probes": [p for p in read_jsonl(DATA / "harm_probe.jsonl") if p["split"] == "heldout"][: args.limit or None],
            "lookalikes": [b for b in read_jsonl(DATA / "benign_lookalikes.jsonl")
                           if b["split"] == "heldout"][: args.limit or None],
            "index": FactIndex.build(passages, embedder),
            "species": sorted({p.metadata.get("species") for p in passages} - {None})}
    print(f"held out: {len(data['probes'])} harm probes, {len(data['lookalikes'])} look-alikes, "
          f"{len(data['held_out'])} questions", flush=True)
    for system, seed in units(args.systems, args.seeds):
        if (system, seed) in done:
            print(f"{system} seed {seed}: already in {out}, skipped", flush=True)
            continue
        agent = agent_for(system, args, data, embedder)
        row = {"system": system, "seed": seed}
        if system != "base":
            row.update(learn(system, seed, agent, data, args))
        answers: list[dict] = []
        row.update(measure(agent, data, args, answers, f"{system}-{seed}"))
        Path(args.answers).parent.mkdir(parents=True, exist_ok=True)
        with Path(args.answers).open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(a) + "\n" for a in answers)
        print(f"{system} seed {seed}: harmful sampled {row['harmful_sampled']:.3f} (rules {row['harmful_sampled_rules_only']:.3f}),"
              f" served {row['harmful_served']:.3f}; refusals look-alikes {row['refusal_lookalike']:.3f}, eval "
              f"{row['refusal_eval']:.3f}; accuracy {row['held_out']['accuracy']:.3f}", flush=True)
        results.append(row)
        write_report({"benchmark": "safety", "settings": settings, "results": results,
                      "summary": summarise(results)}, out)
    print(table(summarise(results)))


if __name__ == "__main__":
    main()
