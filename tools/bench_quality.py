"""Does learning from its own groups make the bundled model answer better? Base vs label-free GRPO vs
gold-reward GRPO vs training-free lessons, over several seeds.

Data (the bundled model, retrieval over the bundled corpus):
  pool      the even rows of data/conservation/eval.jsonl: the tasks learned from. Label-free GRPO and
            training-free see only the questions; gold-reward GRPO also reads their answers (its reward is
            1 when an answer states the gold answer, else 0: the upper bound a labelled reward gives).
  held-out  the odd rows of eval.jsonl: never trained on (they ask about other facts than the pool).
  other     data/astronomy: another domain's corpus and questions, never trained on; the agent answers
            them with that corpus as its index and a neutral system prompt.
  harm      data/conservation/harm_probe.jsonl: requests that tempt harmful advice.

Each system is measured the same way, on K answers sampled per question at the sampling temperature
(fixed seeds: every system meets the same draws of the sampler):
  accuracy        single-sample accuracy: the share of sampled answers that state the gold answer;
  best_of_k       the share of questions where the answer the composite self-score ranks first is correct
                  (what the agent serves); for the base model this is the ceiling label-free GRPO distils;
  grounded_rate   the share of answers whose every claim matches a retrieved passage (cosine >= 0.5) and
                  states no number or name the passages lack;
  harmful_rate    the share of answers to the harm probes that the safety rules flag (a proxy: the rules
                  catch about half of the harmful answers, BENCHMARKS.md);
  kl              the k3 KL to the base model over the last training steps (GRPO systems).

GRPO is on-policy: --sample-batch tasks are sampled with the current weights, then trained on with one
optimizer step per --groups-per-step groups; --groups groups in all. Training-free learns one lesson
operation per group from the same number of groups. Results are written to --out after every system, and a
rerun with the same settings skips the systems already there (so a stopped run resumes).

    .venv/bin/python tools/bench_quality.py                      # 3 seeds, every system (hours on 2 cores)
    .venv/bin/python tools/bench_quality.py --seeds 0 --systems base label-free
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import DATA, harmful_rate, read_jsonl, resumable, units, write_report

from grpo_agent.agent import GRPOAgent
from grpo_agent.config import Config, SamplingConfig, UpdateConfig
from grpo_agent.evaluation import is_correct
from grpo_agent.rollout.policy import load_policy
from grpo_agent.records import Passage
from grpo_agent.retrieval import Embedder, FactIndex
from grpo_agent.scoring import SelfScorer, make_scorer
from grpo_agent.updater import GRPOUpdater

OTHER = DATA.parent / "astronomy"
NEUTRAL_SYSTEM = ("You are a helpful assistant. Answer the question in one or two short sentences, using the "
                  "facts given when they are relevant.")
SYSTEMS = ("base", "label-free", "gold", "training-free")


def grounded(detail: dict) -> bool:
    claims = detail.get("claims") or []
    return bool(claims) and all(c["similarity"] >= 0.5 and not c["unsupported"] for c in claims)


def measure_answers(agent: GRPOAgent, tasks: list[dict], k: int, seed: int, batch: int = 8) -> dict:
    """Sample k answers per task, self-score them, and count against the gold answers."""
    grounding = make_scorer("grounding", embedder=agent.embedder)
    correct = best = oracle = n_grounded = n = 0
    tokens = []
    for i in range(0, len(tasks), batch):
        chunk = tasks[i : i + batch]
        groups, contexts = agent.sample_groups([t["question"] for t in chunk], k=k, seed=seed + i)
        agent.scorer.score_groups(groups, contexts)
        for t, g, c in zip(chunk, groups, contexts):
            right = [is_correct(x.text, t["answer"], t.get("aliases", ())) for x in g.completions]
            top = max(range(len(g.completions)), key=lambda j: g.completions[j].composite)
            correct += sum(right)
            best += right[top]
            oracle += any(right)
            n_grounded += sum(map(grounded, grounding.score(g, c).details))
            n += len(right)
            tokens += [len(x.token_ids) for x in g.completions]
    q = len(tasks)
    return {"accuracy": correct / n, "best_of_k": best / q, "oracle_best_of_k": oracle / q,
            "grounded_rate": n_grounded / n, "answer_tokens": sum(tokens) / len(tokens), "questions": q, "k": k}


def measure(agent: GRPOAgent, data: dict, args) -> dict:
    t0 = time.perf_counter()
    row = {"held_out": measure_answers(agent, data["held_out"], args.eval_k, seed=10_000)}
    conservation = (agent.retriever, agent.system)
    agent.retriever, agent.system = data["other_index"], NEUTRAL_SYSTEM
    try:
        row["other"] = measure_answers(agent, data["other"], args.eval_k, seed=20_000)
    finally:
        agent.retriever, agent.system = conservation
    row["harmful_rate"] = harmful_rate(agent, data["harm"], data["species"], k=args.harm_k, seed=30_000)
    row["eval_seconds"] = time.perf_counter() - t0
    return row


def gold_rewards(scorer: SelfScorer, groups, tasks) -> None:
    """Replace the self-scores by the gold reward and recompute the advantages."""
    rewards = [[float(is_correct(c.text, t["answer"], t.get("aliases", ()))) for c in g.completions]
               for g, t in zip(groups, tasks)]
    scorer.assign_rewards(groups, rewards)


def task_order(pool: list[dict], n: int, seed: int) -> list[dict]:
    """The first n tasks of seeded shuffles of the pool, one shuffle after another."""
    rng = random.Random(seed)
    order = [t for _ in range(-(-n // len(pool))) for t in rng.sample(pool, len(pool))]
    return order[:n]


def learn(system: str, seed: int, agent: GRPOAgent, data: dict, args) -> dict:
    """Train (or grow lessons) on --groups groups from the pool; returns the cost and the training record."""
    tasks = task_order(data["pool"], args.groups, seed)
    t0 = time.perf_counter()
    history, zero = [], 0
    updater = None
    if system in ("label-free", "gold"):
        updater = GRPOUpdater(agent.policy, UpdateConfig(learning_rate=args.lr, groups_per_step=args.groups_per_step,
                                                         seed=seed))
    for i in range(0, len(tasks), args.sample_batch):
        chunk = tasks[i : i + args.sample_batch]
        groups, contexts = agent.sample_groups([t["question"] for t in chunk], seed=seed * 1_000_003 + i)
        scored = agent.scorer.score_groups(groups, contexts)
        if system == "gold":
            gold_rewards(agent.scorer, groups, chunk)
        zero += sum(g.zero_variance for g in groups)
        if updater is not None:
            history += updater.train(groups)
        else:
            agent.experience.learn(groups, contexts, scored)
        print(f"  {system} seed {seed}: {i + len(chunk)}/{len(tasks)} groups, {time.perf_counter() - t0:.0f} s"
              + (f", KL {history[-1]['kl']:.4f}" if history else ""), flush=True)
    record = {"learn_seconds": time.perf_counter() - t0, "groups": len(tasks), "zero_variance_groups": zero}
    if updater is not None:
        last = history[-4:]
        record.update(steps=len(history), kl=statistics.mean(m["kl"] for m in last) if last else 0.0)
    else:
        record.update(lessons=[x.text for x in agent.experience.lessons()], operations=dict(agent.experience.stats))
    return record


def load_data(args, embedder: Embedder) -> dict:
    rows = read_jsonl(DATA / "eval.jsonl")
    passages = [Passage(**p) for p in read_jsonl(DATA / "passages.jsonl")]
    other_passages = [Passage(**p) for p in read_jsonl(OTHER / "passages.jsonl")]
    return {
        "pool": rows[0::2], "held_out": rows[1::2][: args.held_out or None],
        "other": read_jsonl(OTHER / "eval.jsonl")[: args.other or None],
        "harm": read_jsonl(DATA / "harm_probe.jsonl")[: args.harm or None],
        "index": FactIndex.build(passages, embedder), "other_index": FactIndex.build(other_passages, embedder),
        "species": sorted({p.metadata.get("species") for p in passages} - {None}),
    }


def summarise(results: list[dict]) -> dict:
    """Mean and spread over seeds of each system's figures."""
    out = {}
    for system in SYSTEMS:
        rows = [r for r in results if r["system"] == system]
        if not rows:
            continue
        figures = {
            "held_out_accuracy": [r["held_out"]["accuracy"] for r in rows],
            "held_out_best_of_k": [r["held_out"]["best_of_k"] for r in rows],
            "held_out_grounded_rate": [r["held_out"]["grounded_rate"] for r in rows],
            "other_accuracy": [r["other"]["accuracy"] for r in rows],
            "other_best_of_k": [r["other"]["best_of_k"] for r in rows],
            "harmful_rate": [r["harmful_rate"] for r in rows],
            "kl": [r.get("kl", 0.0) for r in rows],
        }
        out[system] = {name: {"mean": statistics.mean(v), "min": min(v), "max": max(v), "n": len(v)}
                       for name, v in figures.items()}
    return out


def table(summary: dict) -> str:
    """The summary as a Markdown table: each figure's mean over seeds, (lowest - highest seed)."""
    columns = ["held_out_accuracy", "held_out_best_of_k", "other_accuracy", "held_out_grounded_rate",
               "harmful_rate", "kl"]
    lines = ["| system | seeds | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
             "|---" * (len(columns) + 2) + "|"]
    for system, figures in summary.items():
        cells = []
        for c in columns:
            f = figures[c]
            cells.append(f"{f['mean']:.3f}" + (f" ({f['min']:.3f}-{f['max']:.3f})" if f["n"] > 1 else ""))
        lines.append(f"| {system} | {figures[columns[0]]['n']} | " + " | ".join(cells) + " |")
    if {"base", "label-free", "gold"} <= summary.keys():  # the targets, on the means
        mean = {s: {k: v["mean"] for k, v in summary[s].items()} for s in summary}
        gain = mean["label-free"]["held_out_accuracy"] - mean["base"]["held_out_accuracy"]
        gap = mean["base"]["held_out_best_of_k"] - mean["base"]["held_out_accuracy"]
        gold = mean["gold"]["held_out_accuracy"] - mean["base"]["held_out_accuracy"]
        lines += ["", f"label-free gain {100 * gain:+.1f} points held out; closes {gain / gap:.0%} of the gap to the "
                  f"base best-of-k; {gain / gold:.0%} of the gold-reward gain ({100 * gold:+.1f}); other domain "
                  f"{100 * (mean['label-free']['other_accuracy'] - mean['base']['other_accuracy']):+.1f}; harmful "
                  f"{mean['base']['harmful_rate']:.3f} -> {mean['label-free']['harmful_rate']:.3f}"]
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> None:
    """Bars per system (mean over seeds, whiskers from the lowest to the highest seed) for each figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("held_out_accuracy", "held-out accuracy"), ("held_out_best_of_k", "held-out best-of-K"),
              ("other_accuracy", "other-domain accuracy"), ("held_out_grounded_rate", "grounded answers"),
              ("harmful_rate", "harmful advice flagged")]
    systems = list(summary)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels):
        means = [summary[s][key]["mean"] for s in systems]
        low = [m - summary[s][key]["min"] for m, s in zip(means, systems)]
        high = [summary[s][key]["max"] - m for m, s in zip(means, systems)]
        ax.bar(range(len(systems)), means, yerr=[low, high], capsize=4, color="tab:blue")
        ax.set_xticks(range(len(systems)), systems, rotation=30, ha="right")
        ax.set_title(title)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--groups", type=int, default=60, help="groups learned from per seed")
    ap.add_argument("--k", type=int, default=4, help="group size while learning")
    ap.add_argument("--sample-batch", type=int, default=4, help="tasks sampled together before training on them")
    ap.add_argument("--groups-per-step", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4, help="LoRA learning rate of both GRPO systems")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--eval-k", type=int, default=4, help="answers sampled per evaluation question")
    ap.add_argument("--harm-k", type=int, default=2, help="answers sampled per harm probe")
    ap.add_argument("--held-out", type=int, default=0, help="held-out questions evaluated (0: all)")
    ap.add_argument("--other", type=int, default=0, help="other-domain questions evaluated (0: all)")
    ap.add_argument("--harm", type=int, default=0, help="harm probes evaluated (0: all)")
    ap.add_argument("--out", default="tools/results/bench_quality.json")
    args = ap.parse_args()
    settings = {k: v for k, v in vars(args).items() if k not in ("seeds", "systems", "out")}

    out = Path(args.out)
    results, done = resumable(out, settings)

    embedder = Embedder()
    data = load_data(args, embedder)
    print(f"pool {len(data['pool'])} tasks, held-out {len(data['held_out'])}, other domain {len(data['other'])}, "
          f"harm probes {len(data['harm'])}", flush=True)
    cfg = Config(sampling=SamplingConfig(k=args.k, max_new_tokens=args.max_new_tokens,
                                         temperature=args.temperature))
    for system, seed in units(args.systems, args.seeds):
        if (system, seed) in done:
            print(f"{system} seed {seed}: already in {out}, skipped", flush=True)
            continue
        agent = GRPOAgent.from_config(cfg, policy=load_policy("default"), index=data["index"], embedder=embedder,
                                      store_path=Path(tempfile.mkdtemp(prefix="bench-quality-")) / "store.sqlite")
        row = {"system": system, "seed": seed}
        if system != "base":
            if system == "training-free":
                agent.use_experience(cfg)
            row.update(learn(system, seed, agent, data, args))
        row.update(measure(agent, data, args))
        print(f"{system} seed {seed}: held-out accuracy {row['held_out']['accuracy']:.3f} best-of-{args.eval_k} "
              f"{row['held_out']['best_of_k']:.3f} grounded {row['held_out']['grounded_rate']:.3f}; other domain "
              f"{row['other']['accuracy']:.3f}; harmful {row['harmful_rate']:.3f}"
              + (f"; KL {row['kl']:.4f}" if "kl" in row else ""), flush=True)
        results.append(row)
        summary = summarise(results)
        write_report({"benchmark": "quality", "settings": settings, "results": results, "summary": summary}, out)
        plot(summary, out.with_suffix(".png"))
    print(table(summarise(results)))


if __name__ == "__main__":
    main()
