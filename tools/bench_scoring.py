"""How well each label-free signal, and the composite, tracks real answer quality.

On the bundled model, with the top-3 retrieved facts in the prompt, sample K answers for every question of
eval.jsonl, score each group with every signal, and compare with gold correctness (used here only to
measure, never to score):
  AUROC over all answers; pairwise ranking accuracy within a question (correct above wrong, ties 1/2);
  best-of-K accuracy (is the top-ranked answer correct) against the base rate of a random sample.
Composite weights are chosen on a dev half of the questions (grid search, pairwise accuracy) and reported
on the disjoint test half. Safety: the share of answers to eval questions flagged (false flags) and the
share of hand-labelled harmful answers (data/conservation/harm_answers_labelled.jsonl, if present)
flagged. Cost: scoring time against sampling time.

    .venv/bin/python tools/bench_scoring.py [--k 8 --max-new-tokens 64 --temperature 0.8]
        [--samples tools/results/scoring_samples.jsonl]   # reuse sampled groups instead of sampling
        [--reuse-scores reasoning]   # reuse these signals' scores from the cache (same samples file only)
        [--cost-questions 16]        # fresh groups on which sampling and scoring are timed back to back

The cost ratio is measured on --cost-questions fresh groups, sampled and scored in this run, so both times
come from the same machine state.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from benchlib import DATA, read_jsonl, write_report
from tqdm import tqdm

from grpo_agent.calibrate import metrics
from grpo_agent.config import ScoringConfig
from grpo_agent.evaluation import is_correct
from grpo_agent.rollout.policy import load_policy
from grpo_agent.prompts import answer_messages
from grpo_agent.records import Completion, Group, Passage
from grpo_agent.retrieval import Embedder, FactIndex
from grpo_agent.scoring import ScoreContext, ScoreResult, combine, make_scorer
from grpo_agent.scoring.grounding import GroundingScorer

SIGNALS = ["grounding", "consistency", "education", "reasoning", "safety", "grounding_unanchored"]
WEIGHTED = ["grounding", "consistency", "education", "reasoning"]


def in_dev(qid: str) -> bool:
    return int(hashlib.sha1(qid.encode()).hexdigest(), 16) % 2 == 0


def sample_groups(policy, index, questions, k, max_new_tokens, temperature, batch, seed):
    groups, contexts, seconds = [], [], 0.0
    for start in tqdm(range(0, len(questions), batch), desc="sampling", unit="batch"):
        chunk = questions[start : start + batch]
        hits = index.search_batch([q["question"] for q in chunk], k=3)
        chats = [answer_messages(q["question"], [h.passage for h in hs]) for q, hs in zip(chunk, hits)]
        t0 = time.perf_counter()
        sampled = policy.sample(chats, k=k, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + start)
        seconds += time.perf_counter() - t0
        groups += sampled
        contexts += [ScoreContext(q["question"], [h.passage for h in hs]) for q, hs in zip(chunk, hits)]
    return groups, contexts, seconds


def save_samples(path: Path, questions, groups, contexts, sampling_s):
    with path.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"sampling_s": sampling_s}) + "\n")
        for q, g, c in zip(questions, groups, contexts):
            f.write(json.dumps({"question": q, "passages": [asdict(p) for p in c.passages],
                                "completions": [asdict(x) for x in g.completions],
                                "prompt_token_ids": g.prompt_token_ids}) + "\n")


def load_samples(path: Path):
    rows = read_jsonl(path)
    sampling_s = rows[0]["sampling_s"]
    questions, groups, contexts = [], [], []
    for r in rows[1:]:
        questions.append(r["question"])
        groups.append(Group(messages=[], prompt_token_ids=r["prompt_token_ids"],
                            completions=[Completion(**c) for c in r["completions"]]))
        contexts.append(ScoreContext(r["question"]["question"], [Passage(**p) for p in r["passages"]]))
    return questions, groups, contexts, sampling_s


def file_sha(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def load_cache(path: Path, samples_sha: str) -> dict:
    """Cached per-signal scores for this exact samples file (a different file invalidates the cache)."""
    if not path.is_file():
        return {}
    cache = json.loads(path.read_text())
    return cache["signals"] if cache.get("samples_sha1") == samples_sha else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--batch", type=int, default=8, help="questions per sampling call")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N eval questions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", default="tools/results/scoring_samples.jsonl",
                    help="sampled groups are saved here, and reused when the file exists (delete it to resample)")
    ap.add_argument("--score-cache", default="tools/results/scoring_cache.json",
                    help="every signal's scores on the samples file are saved here")
    ap.add_argument("--reuse-scores", nargs="*", default=[], choices=SIGNALS,
                    help="signals whose cached scores to reuse (e.g. reasoning: the slow judge)")
    ap.add_argument("--cost-questions", type=int, default=16)
    ap.add_argument("--cost-budget", type=float, default=0.3,
                    help="a signal costing more than this fraction of sampling time gets no weight in the grid")
    ap.add_argument("--out", default="tools/results/bench_scoring.json")
    args = ap.parse_args()

    embedder = Embedder()
    policy = load_policy("default")
    samples = Path(args.samples)
    if samples.is_file():
        questions, groups, contexts, sampling_s = load_samples(samples)
        print(f"reusing {len(groups)} sampled groups from {samples}")
    else:
        questions = read_jsonl(DATA / "eval.jsonl")[: args.limit]
        index = FactIndex.build([Passage(**p) for p in read_jsonl(DATA / "passages.jsonl")], embedder)
        groups, contexts, sampling_s = sample_groups(policy, index, questions, args.k, args.max_new_tokens,
                                                     args.temperature, args.batch, args.seed)
        samples.parent.mkdir(parents=True, exist_ok=True)
        save_samples(samples, questions, groups, contexts, sampling_s)

    species = sorted({p["metadata"].get("species") for p in read_jsonl(DATA / "passages.jsonl")} - {None})
    scorers = {"grounding": make_scorer("grounding", embedder=embedder),
               "consistency": make_scorer("consistency", embedder=embedder),
               "education": make_scorer("education", embedder=embedder),
               "reasoning": make_scorer("reasoning", judge=policy),
               "safety": make_scorer("safety", species=species),
               # grounding without its anchor: support from any retrieved passage counts fully
               "grounding_unanchored": GroundingScorer(embedder, other_weight=1.0)}
    cache_path, samples_sha = Path(args.score_cache), file_sha(samples)
    cached = load_cache(cache_path, samples_sha)
    reuse = [n for n in args.reuse_scores if n in cached]
    if reuse:
        print(f"reusing cached scores of {', '.join(reuse)} from {cache_path}")
    per_signal = {n: [ScoreResult(n, r["scores"], r["explanations"]) for r in cached[n]] if n in reuse else []
                  for n in SIGNALS}
    for g, c in tqdm(list(zip(groups, contexts)), desc="scoring", unit="group"):
        for name, scorer in scorers.items():
            if name not in reuse:
                per_signal[name].append(scorer.score(g, c))
    cache_path.write_text(json.dumps({"samples_sha1": samples_sha, "signals": {
        n: [{"scores": r.scores, "explanations": r.explanations} for r in rs] for n, rs in per_signal.items()}}))
    labels = [np.array([is_correct(x.text, q["answer"], q["aliases"]) for x in g.completions])
              for q, g in zip(questions, groups)]
    dev = [in_dev(q["id"]) for q in questions]

    def values(name, keep):
        return [np.nan_to_num(np.array(r.scores, dtype=float), nan=0.0) for r, k in zip(per_signal[name], keep) if k]

    def split_labels(keep):
        return [y for y, k in zip(labels, keep) if k]

    report = {"benchmark": "scoring", "signals": {}, "settings": vars(args), "questions": len(groups)}
    everything = [True] * len(groups)
    for name in WEIGHTED + SIGNALS[-1:]:
        report["signals"][name] = metrics(values(name, everything), labels)

    # Cost: fresh groups sampled and scored back to back, so both times come from the same machine state.
    default = ScoringConfig().weights
    cost_qs = read_jsonl(DATA / "eval.jsonl")[: args.cost_questions]
    index = FactIndex.build([Passage(**p) for p in read_jsonl(DATA / "passages.jsonl")], embedder)
    cost_groups, cost_contexts, cost_sampling_s = sample_groups(
        policy, index, cost_qs, args.k, args.max_new_tokens, args.temperature, args.batch, args.seed + 10_000)
    cost = {name: 0.0 for name in SIGNALS[:5]}
    for g, c in zip(cost_groups, cost_contexts):
        for name in cost:
            t0 = time.perf_counter()
            scorers[name].score(g, c)
            cost[name] += time.perf_counter() - t0
    default_signals = [n for n, w in default.items() if w > 0] + ["safety"]
    report["cost"] = {"questions": len(cost_qs), "sampling_s": cost_sampling_s, "scoring_s": cost,
                      "default_scoring_over_sampling": sum(cost[n] for n in default_signals) / cost_sampling_s,
                      "all_signals_over_sampling": sum(cost.values()) / cost_sampling_s}

    # Choose composite weights on the dev half, report them on the test half. Only signals that fit the
    # cost budget (scoring <= --cost-budget of sampling time, measured above) are candidates.
    affordable = [n for n in WEIGHTED if cost[n] / cost_sampling_s <= args.cost_budget]
    report["composite"] = {"grid_signals": affordable}
    grid = [0.0, 0.25, 0.5, 1.0]
    best = None
    for combo in itertools.product(grid, repeat=len(affordable)):
        if not any(combo):
            continue
        weights = {n: 0.0 for n in WEIGHTED} | dict(zip(affordable, combo))
        comp = [np.array(combine([per_signal[n][i] for n in WEIGHTED], weights, len(g.completions)).composite)
                for i, (g, k) in enumerate(zip(groups, dev)) if k]
        m = metrics(comp, split_labels(dev))
        key = (m["pairwise"], m["auroc"])
        if best is None or key > best[0]:
            best = (key, weights, m)
    weights = best[1]
    test = [not d for d in dev]
    comp_test = [np.array(combine([per_signal[n][i] for n in WEIGHTED], weights, len(g.completions)).composite)
                 for i, (g, k) in enumerate(zip(groups, test)) if k]
    comp_default = [np.array(combine([per_signal[n][i] for n in WEIGHTED], default, len(g.completions)).composite)
                    for i, (g, k) in enumerate(zip(groups, test)) if k]
    report["composite"] |= {
        "weights_chosen_on_dev": weights, "dev": best[2], "test": metrics(comp_test, split_labels(test)),
        "default_weights": default, "test_with_default_weights": metrics(comp_default, split_labels(test)),
        "dev_questions": sum(dev), "test_questions": sum(test),
    }
    for name in WEIGHTED + SIGNALS[-1:]:
        report["signals"][name]["test"] = metrics(values(name, test), split_labels(test))

    flagged_eval = float(np.mean([s == 0.0 for r in per_signal["safety"] for s in r.scores]))
    report["safety"] = {"false_flag_rate_on_eval_answers": flagged_eval}
    labelled = DATA / "harm_answers_labelled.jsonl"
    if labelled.is_file():
        rows = read_jsonl(labelled)
        harmful = [r for r in rows if r["harmful"]]
        safe = [r for r in rows if not r["harmful"]]
        fired = lambda r: scorers["safety"].rules.check(r["answer"], r["request"]) is not None  # noqa: E731
        report["safety"].update({
            "labelled_answers": len(rows), "harmful": len(harmful),
            "recall_on_harmful": float(np.mean([fired(r) for r in harmful])) if harmful else None,
            "false_flag_rate_on_labelled_safe": float(np.mean([fired(r) for r in safe])) if safe else None,
        })

    for name in WEIGHTED + SIGNALS[-1:]:
        m = report["signals"][name]
        print(f"{name:22s} AUROC {m['auroc']:.3f}  pairwise {m['pairwise']:.3f}  best-of-K {m['best_of_k']:.3f}"
              f"  (base rate {m['base_rate']:.3f})")
    c = report["composite"]
    print(f"composite    weights chosen on dev ({c['dev_questions']} q): {c['weights_chosen_on_dev']}")
    for split in ("dev", "test", "test_with_default_weights"):
        m = c[split]
        print(f"  {split:26s} AUROC {m['auroc']:.3f}  pairwise {m['pairwise']:.3f}  best-of-K {m['best_of_k']:.3f}"
              f"  (base rate {m['base_rate']:.3f})")
    print(f"safety       {json.dumps(report['safety'])}")
    print(f"cost         sampling {cost_sampling_s:.0f} s ({len(cost_qs)} questions); scoring (default signals) / sampling = "
          f"{report['cost']['default_scoring_over_sampling']:.3f}; all signals {report['cost']['all_signals_over_sampling']:.3f}")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
