"""Does a long label-free run hold, or rise and then collapse? With and without the guards, over seeds.

On the bundled model and corpus, the self-improvement loop (grpo-agent's own SelfImprovementLoop) runs
--rounds rounds on data/conservation/train_questions.jsonl (questions only), gated label-free on the even
rows of eval.jsonl (questions only, never trained on). Two settings:
  unguarded  every update is promoted (margin 1: the gate never refuses), no guards, no penalties;
  guarded    the eval gate (margin 0; a gain must clear one standard error of the paired per-task
             differences, min_gain_z 1), the collapse guards (KL cap, entropy, distinct-answer and length
             floors against the best promoted round) and the length and repetition penalties in the reward.
After every round, the policy the round leaves promoted is measured with labels the loop never sees: greedy
accuracy on the odd rows of eval.jsonl (held out), and the share of greedy answers to harm_probe.jsonl
that the safety rules flag. The loop's own monitors (entropy, answer length, distinct answers, KL) come
from its rounds.jsonl.

Each run lives in --runs/<setting>-s<seed>/ and resumes where it stopped (the loop is resumable; a
round's measurement is redone from its promoted adapter when missing; a rolled-back round reuses the
measurement of the policy it kept), so the hours this takes can be spread over several sittings. Writes
the per-round table to --out (JSON) and a plot beside it (PNG).

    .venv/bin/python tools/bench_stability.py                    # 20 rounds x 2 seeds x 2 settings (hours)
    .venv/bin/python tools/bench_stability.py --rounds 3 --seeds 0 --settings guarded   # a short look
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchlib import DATA, harmful_rate, read_jsonl, write_report

from grpo_agent.agent import GRPOAgent
from grpo_agent.config import Config, LoopConfig, SamplingConfig, ScoringConfig, UpdateConfig
from grpo_agent.evaluation import evaluate
from grpo_agent.loop import SelfImprovementLoop
from grpo_agent.rollout.policy import load_policy
from grpo_agent.records import Passage
from grpo_agent.retrieval import Embedder, FactIndex

SETTINGS = ("unguarded", "guarded")
GATE = {"margin": 0.0, "min_gain_z": 1.0}
GUARDS = {"max_kl": 0.05, "min_entropy_ratio": 0.6, "min_distinct_ratio": 0.6, "min_length_ratio": 0.6}
PENALTIES = {"length_penalty": 0.5, "min_answer_words": 6, "repetition_penalty": 0.5}


def measure(agent: GRPOAgent, data: dict) -> dict:
    t0 = time.perf_counter()
    accuracy = evaluate(agent, data["held_out"], label_free=False, progress=False).value
    return {"accuracy": accuracy, "harmful_rate": harmful_rate(agent, data["harm"], data["species"]),
            "measure_seconds": time.perf_counter() - t0}


def run_one(setting: str, seed: int, data: dict, args) -> list[dict]:
    """Run (or resume) one loop to --rounds rounds, measuring each round's promoted policy; its table."""
    run = Path(args.runs) / f"{setting}-s{seed}"
    guarded = setting == "guarded"
    cfg = Config(
        sampling=SamplingConfig(k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=seed),
        scoring=ScoringConfig(**(PENALTIES if guarded else {})),
        update=UpdateConfig(learning_rate=args.lr, groups_per_step=args.groups_per_step, seed=seed),
        loop=LoopConfig(tasks_per_round=args.tasks_per_round, eval_size=args.gate_size, eval_k=args.gate_k,
                        **({**GATE, **GUARDS} if guarded else {"margin": 1.0})),
    )
    agent = GRPOAgent.from_config(cfg, store_path=run / "store.sqlite", policy=load_policy("default"),
                                  index=data["index"], embedder=data["embedder"])
    settings = {k: v for k, v in vars(args).items() if k not in ("rounds", "seeds", "settings", "runs", "out")}
    if guarded:  # a run directory started with other guards is refused below, not silently mixed
        settings.update(gate=GATE, guards=GUARDS, penalties=PENALTIES)
    saved = run / "bench_settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        raise SystemExit(f"{run} was run with other settings ({saved.read_text().strip()}); use another --runs")
    run.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(settings) + "\n")
    loop = SelfImprovementLoop(agent, run, data["tasks"], data["gate"], cfg.update, cfg.loop, progress=False)
    path = run / "measures.jsonl"
    measured = {m["round"]: m for m in read_jsonl(path)} if path.is_file() else {}

    def kept(row: dict) -> dict | None:
        """A rolled-back round kept weights already measured: the same weights answer greedily the same."""
        if row["promoted"]:
            return None
        return next((m for m in measured.values() if m["policy_version"] == row["policy_version"]), None)

    def record(row: dict) -> None:
        same = kept(row)
        if same:
            m = {**same, "round": row["round"], "measure_seconds": 0.0}
        else:
            m = {"round": row["round"], "policy_version": row["policy_version"], **measure(agent, data)}
        measured[m["round"]] = m
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(m) + "\n")
        print(f"{setting} seed {seed} round {m['round']}: {'promoted' if row['promoted'] else 'rolled back'}"
              f" ({row['policy_version']}); held-out accuracy {m['accuracy']:.3f}, harmful {m['harmful_rate']:.3f}"
              + (f"; {'; '.join(row.get('guards') or [])}" if row.get("guards") else ""), flush=True)

    missing = [row for row in loop.rounds() if row["round"] not in measured]
    for row in missing:  # rounds done in an earlier sitting but not measured: measure their promoted policy
        if kept(row) is None:
            agent.policy.load_adapter(run / "promoted" / row["policy_version"], version=row["policy_version"])
        record(row)
    if missing:  # back to the weights the loop resumed from
        loop.updater.resume(loop.dir.checkpoints)
        agent.policy.version = loop.state.promoted_version
    if 0 not in measured:  # the starting policy: round 0
        record({"round": 0, "policy_version": agent.policy.version, "promoted": True})
    while loop.state.round < args.rounds and not loop.state.stopped:
        loop.run(loop.state.round + 1)
        record(loop.rounds()[-1])
    rows = []
    for row in loop.rounds():
        m = measured[row["round"]]
        rows.append({
            "round": row["round"], "promoted": row["promoted"], "policy_version": row["policy_version"],
            "guards": row.get("guards", []), "accuracy": m["accuracy"], "harmful_rate": m["harmful_rate"],
            "gate_composite": row["eval"]["value"], "kl": row.get("kl"), "entropy": row.get("entropy"),
            "answer_tokens": row.get("answer_tokens"), "distinct_rate": row.get("distinct_rate"),
            "zero_variance_rate": row.get("zero_variance_rate"), "seconds": row.get("seconds"),
        })
    return rows


def summary(rows: list[dict]) -> dict:
    """Base, best and final held-out accuracy of the promoted policy; rounds promoted; guards fired."""
    acc = [r["accuracy"] for r in rows]
    return {"rounds": len(rows) - 1, "base_accuracy": acc[0], "best_accuracy": max(acc), "final_accuracy": acc[-1],
            "final_below_best": max(acc) - acc[-1], "final_minus_base": acc[-1] - acc[0],
            "base_harmful": rows[0]["harmful_rate"], "final_harmful": rows[-1]["harmful_rate"],
            "promoted": sum(r["promoted"] for r in rows[1:]), "guards_fired": sum(bool(r["guards"]) for r in rows)}


def plot(runs: dict[str, list[dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("accuracy", "held-out accuracy (promoted)"), ("harmful_rate", "harmful advice flagged"),
              ("kl", "mean KL to the reference"), ("entropy", "entropy of sampled tokens"),
              ("answer_tokens", "answer tokens"), ("distinct_rate", "distinct answers per group")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title) in zip(axes.flat, panels):
        for name, rows in sorted(runs.items()):
            xs = [r["round"] for r in rows if r.get(key) is not None]
            ax.plot(xs, [r[key] for r in rows if r.get(key) is not None], marker=".",
                    linestyle="-" if name.startswith("guarded") else "--", label=name)
        ax.set_title(title)
        ax.set_xlabel("round")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    ap.add_argument("--tasks-per-round", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--groups-per-step", type=int, default=1)
    ap.add_argument("--gate-size", type=int, default=16, help="held-out questions of the label-free gate")
    ap.add_argument("--gate-k", type=int, default=4)
    ap.add_argument("--held-out", type=int, default=40, help="labelled questions measured after each round")
    ap.add_argument("--harm", type=int, default=24, help="harm probes measured after each round")
    ap.add_argument("--runs", default="runs/bench-stability", help="where the loops' run directories go")
    ap.add_argument("--out", default="tools/results/bench_stability.json")
    args = ap.parse_args()

    embedder = Embedder()
    passages = [Passage(**p) for p in read_jsonl(DATA / "passages.jsonl")]
    rows = read_jsonl(DATA / "eval.jsonl")
    data = {
        "embedder": embedder, "index": FactIndex.build(passages, embedder),
        "tasks": read_jsonl(DATA / "train_questions.jsonl"),
        "gate": [{"id": r["id"], "question": r["question"]} for r in rows[0::2]],  # no answers: label-free
        "held_out": rows[1::2][: args.held_out], "harm": read_jsonl(DATA / "harm_probe.jsonl")[: args.harm],
        "species": sorted({p.metadata.get("species") for p in passages} - {None}),
    }
    runs = {}
    for seed in args.seeds:
        for setting in args.settings:
            runs[f"{setting}-s{seed}"] = run_one(setting, seed, data, args)
    out = Path(args.out)
    plot(runs, out.with_suffix(".png"))
    settings = {k: v for k, v in vars(args).items() if k not in ("seeds", "settings", "runs", "out")}
    summaries = {name: summary(rows) for name, rows in runs.items()}
    write_report({"benchmark": "stability", "settings": settings, "gate": GATE, "guards": GUARDS,
                  "penalties": PENALTIES, "summary": summaries, "runs": runs}, out)
    for name, s in summaries.items():
        print(f"{name}: accuracy base {s['base_accuracy']:.3f} best {s['best_accuracy']:.3f} final "
              f"{s['final_accuracy']:.3f}; harmful {s['base_harmful']:.3f} -> {s['final_harmful']:.3f}; "
              f"{s['promoted']}/{s['rounds']} promoted, guards fired in {s['guards_fired']} rounds")
        if name.startswith("guarded"):  # the target, on 40 questions (one question = 2.5 points)
            met = s["final_below_best"] <= 0.01 + 1e-9 and s["final_minus_base"] > 0
            print(f"  target (ends <= 1 point below its best round and above base): {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
