"""Self-improvement from a corpus alone (issue #20): tasks made from the passages, weights and a verifier fitted
on them, and label-free GRPO trained on them, judged against the hand-written questions that none of it read.

Parts (--parts, each written to --out as it finishes; a rerun with the same settings skips what is done):
  tasks     per domain: grpo-agent tasks' figures on data/<domain>/passages.jsonl (made and kept per passage,
            the share whose source passage retrieval finds, the drops by reason, seconds per 500 kept tasks);
  scoring   K answers sampled to --calibrate-tasks + --verifier-tasks corpus tasks (conservation), judged by
            each task's answer span. The first --calibrate-tasks fit the composite's weights as
            `grpo-agent calibrate` does; the rest train the verifier (grpo_agent/verifier.py). Both are then
            scored on the test half of bench_scoring.py's hand-written questions (its samples and score cache,
            gold answers used only to measure): AUROC, pairwise and best-of-K of the dev-split weights, the
            calibrated weights, the verifier alone and the composite with the verifier (its weight fitted on
            the calibration tasks, which it did not train on); the verifier's cost over sampling time;
  loop      per domain and seed: label-free GRPO (bench_quality's settings) on tasks made from the passages only,
            rewarded by the label-free composite plus answer_match (the task's corpus answer) at
            --answer-match-weight; single-sample accuracy on the domain's hand-written questions (conservation:
            bench_quality's held-out odd rows; astronomy: all) against the base model.

    .venv/bin/python tools/bench_corpus.py                                  # everything (hours on 2 cores)
    .venv/bin/python tools/bench_corpus.py --parts tasks scoring
    .venv/bin/python tools/bench_corpus.py --parts loop --domains astronomy --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_quality import NEUTRAL_SYSTEM, measure_answers, task_order
from bench_scoring import file_sha, in_dev, load_samples
from benchlib import read_jsonl, write_report

from grpo_agent.agent import GRPOAgent
from grpo_agent.calibrate import fit_weights, metrics
from grpo_agent.config import Config, SamplingConfig, ScoringConfig, UpdateConfig
from grpo_agent.evaluation import is_correct
from grpo_agent.rollout.policy import load_policy
from grpo_agent.records import Passage
from grpo_agent.retrieval import Embedder, FactIndex
from grpo_agent.scoring import ScoreResult, combine
from grpo_agent.tasks import corpus_answer, labelled_groups, make_tasks
from grpo_agent.updater import GRPOUpdater
from grpo_agent.scoring.verifier import VerifierScorer
from grpo_agent.verifier import Verifier, examples_from

ROOT = Path(__file__).resolve().parent.parent
DOMAINS = ("conservation", "astronomy")
PARTS = ("tasks", "scoring", "loop")
WEIGHTED = ("grounding", "consistency", "education")


def domain_index(domain: str, embedder: Embedder) -> FactIndex:
    return FactIndex.build([Passage(**p) for p in read_jsonl(ROOT / "data" / domain / "passages.jsonl")], embedder)


def part_tasks(domain: str, embedder: Embedder, args) -> dict:
    index = domain_index(domain, embedder)
    t0 = time.perf_counter()
    tasks, report = make_tasks(index, args.per_passage, seed=0, top_k=args.top_k)
    seconds = time.perf_counter() - t0
    passages = report.passages
    not_found = report.dropped.get(f"source not in top {args.top_k}", 0)
    checked = report.made - report.dropped.get("over per-passage", 0) - report.dropped.get("answer in question", 0)
    return {"domain": domain, "passages": passages, "made": report.made, "kept": report.kept,
            "made_per_passage": report.made / passages, "kept_per_passage": report.kept / passages,
            "kept_share": report.kept / report.made, "source_found_share": 1 - not_found / max(checked, 1),
            "dropped": dict(report.dropped), "seconds": seconds,
            "seconds_per_500_kept": seconds / max(report.kept, 1) * 500,
            "by_kind": {k: sum(t.kind == k for t in tasks) for k in sorted({t.kind for t in tasks})}}


def part_scoring(embedder: Embedder, args) -> dict:
    """Calibrated weights and the verifier, fitted on corpus tasks, scored on bench_scoring's test half."""
    index = domain_index("conservation", embedder)
    made, _ = make_tasks(index, per_passage=1, seed=0, limit=args.calibrate_tasks + args.verifier_tasks)
    tasks = [t.to_json() for t in made][: args.calibrate_tasks + args.verifier_tasks]
    cfg = Config(sampling=SamplingConfig(k=args.scoring_k, max_new_tokens=64, temperature=0.8))
    agent = GRPOAgent.from_config(cfg, policy=load_policy("default"), index=index, embedder=embedder)
    t0 = time.perf_counter()
    tasks, groups, contexts, labels = labelled_groups(agent, tasks, k=args.scoring_k, seed=0)
    sample_s = time.perf_counter() - t0
    cal = slice(0, args.calibrate_tasks)
    train = slice(args.calibrate_tasks, len(tasks))
    from grpo_agent.scoring import make_scorer

    scorers = {n: make_scorer(n, embedder=embedder) for n in WEIGHTED}
    cal_results = {n: [s.score(g, c) for g, c in zip(groups[cal], contexts[cal])] for n, s in scorers.items()}
    calibrated, cal_fit = fit_weights(cal_results, labels[cal])

    examples = examples_from(tasks[train], groups[train], contexts[train], labels[train])
    t0 = time.perf_counter()
    verifier = Verifier.untrained()
    losses = verifier.fit(examples, epochs=args.verifier_epochs, lr=args.verifier_lr, seed=0)
    train_s = time.perf_counter() - t0
    verifier.save(ROOT / args.verifier_out)

    scorer = VerifierScorer(verifier)

    def verify(gs, cs) -> list[ScoreResult]:
        return [scorer.score(g, c) for g, c in zip(gs, cs)]

    cal_results["verifier"] = verify(groups[cal], contexts[cal])
    with_verifier, with_fit = fit_weights(cal_results, labels[cal])

    # bench_scoring's hand-written questions: its samples and cached scores, test half only
    questions, hw_groups, hw_contexts, hw_sampling_s = load_samples(ROOT / args.samples)
    cache_file = json.loads((ROOT / args.score_cache).read_text())
    if cache_file.get("samples_sha1") != file_sha(ROOT / args.samples):
        raise SystemExit(f"{args.score_cache} holds scores of another samples file than {args.samples}: rerun "
                         "tools/bench_scoring.py to score its samples")
    cache = cache_file["signals"]
    test = [i for i, q in enumerate(questions) if not in_dev(q["id"])]
    hw_labels = [np.array([is_correct(x.text, questions[i]["answer"], questions[i].get("aliases", ()))
                           for x in hw_groups[i].completions]) for i in test]
    results = {n: [ScoreResult(n, cache[n][i]["scores"], cache[n][i]["explanations"]) for i in test]
               for n in WEIGHTED}
    t0 = time.perf_counter()
    results["verifier"] = verify([hw_groups[i] for i in test], [hw_contexts[i] for i in test])
    verify_s = time.perf_counter() - t0
    sampling_per_group = hw_sampling_s / len(hw_groups)

    def score(weights: dict) -> dict:
        names = list(results)
        comp = [np.array(combine([results[n][j] for n in names], weights, len(y)).composite)
                for j, y in enumerate(hw_labels)]
        return metrics(comp, hw_labels)

    dev_weights = {"grounding": 0.5, "consistency": 0.25, "education": 0.0}  # bench_scoring's dev-half choice
    dev_file = ROOT / "tools" / "results" / "bench_scoring.json"
    if dev_file.is_file():
        chosen = json.loads(dev_file.read_text())["composite"]["weights_chosen_on_dev"]
        dev_weights = {n: chosen.get(n, 0.0) for n in WEIGHTED}
    row = {
        "corpus_tasks": len(tasks), "k": args.scoring_k, "sampling_seconds": sample_s,
        "calibration": {"tasks": args.calibrate_tasks, "weights": calibrated, "fit": cal_fit},
        "verifier": {"tasks": len(tasks) - args.calibrate_tasks, "examples": len(examples),
                     "right_share": float(np.mean([e.label for e in examples])), "epochs": args.verifier_epochs,
                     "losses": losses, "train_seconds": train_s,
                     "cost_over_sampling": verify_s / len(test) / sampling_per_group,
                     "weights_with_verifier": with_verifier, "fit_with_verifier": with_fit},
        "test_questions": len(test),
        "test": {"dev_split_weights": {"weights": dev_weights, **score(dev_weights)},
                 "calibrated_weights": {"weights": calibrated, **score(calibrated)},
                 "verifier_alone": score({"verifier": 1.0}),
                 "with_verifier": {"weights": with_verifier, **score(with_verifier)},
                 "oracle_best_of_k": float(np.mean([y.any() for y in hw_labels]))},
    }
    row["test"]["calibrated_minus_dev_auroc"] = (row["test"]["calibrated_weights"]["auroc"]
                                                 - row["test"]["dev_split_weights"]["auroc"])
    return row


def part_loop(domain: str, seed: int | None, embedder: Embedder, args) -> dict:
    """Base (seed None) or label-free GRPO on corpus-made tasks; accuracy on the domain's hand-written questions."""
    index = domain_index(domain, embedder)
    questions = read_jsonl(ROOT / "data" / domain / "eval.jsonl")
    held_out = questions[1::2] if domain == "conservation" else questions
    weights = dict(ScoringConfig().weights) | {"answer_match": args.answer_match_weight}
    cfg = Config(sampling=SamplingConfig(k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature),
                 scoring=ScoringConfig(weights=weights))
    agent = GRPOAgent.from_config(cfg, policy=load_policy("default"), index=index, embedder=embedder,
                                  store_path=Path(tempfile.mkdtemp(prefix="bench-corpus-")) / "store.sqlite")
    if domain != "conservation":
        agent.system = NEUTRAL_SYSTEM
    row: dict = {"domain": domain, "seed": seed}
    if seed is not None:
        made, _ = make_tasks(index, args.per_passage, seed=seed, top_k=args.top_k, progress=False)
        pool = [t.to_json() for t in made]
        tasks = task_order(pool, args.groups, seed)
        updater = GRPOUpdater(agent.policy, UpdateConfig(learning_rate=args.lr, groups_per_step=1, seed=seed))
        t0, history = time.perf_counter(), []
        for i in range(0, len(tasks), args.sample_batch):
            chunk = tasks[i : i + args.sample_batch]
            batch = agent.scored_groups([t["question"] for t in chunk], references=[corpus_answer(t) for t in chunk],
                                        seed=seed * 1_000_003 + i)
            history += updater.train(batch.groups)
            print(f"  {domain} seed {seed}: {i + len(chunk)}/{len(tasks)} groups, {time.perf_counter() - t0:.0f} s",
                  flush=True)
        last = history[-4:]
        row.update(pool=len(pool), learn_seconds=time.perf_counter() - t0,
                   kl=statistics.mean(m["kl"] for m in last) if last else 0.0)
    row["held_out"] = measure_answers(agent, held_out, args.eval_k, seed=10_000)
    return row


def summarise(results: list[dict]) -> dict:
    out: dict = {}
    for domain in DOMAINS:
        base = [r for r in results if r.get("part") == "loop" and r["domain"] == domain and r["seed"] is None]
        runs = [r for r in results if r.get("part") == "loop" and r["domain"] == domain and r["seed"] is not None]
        if base and runs:
            acc = [r["held_out"]["accuracy"] for r in runs]
            b = base[0]["held_out"]["accuracy"]
            out[domain] = {"base_accuracy": b, "accuracy_mean": statistics.mean(acc), "accuracy_min": min(acc),
                           "accuracy_max": max(acc), "gain_points": 100 * (statistics.mean(acc) - b),
                           "seeds": len(runs)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--per-passage", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--calibrate-tasks", type=int, default=64, help="as `grpo-agent calibrate`'s default")
    ap.add_argument("--verifier-tasks", type=int, default=256, help="as `grpo-agent verifier`'s default")
    ap.add_argument("--scoring-k", type=int, default=8, help="answers per corpus task (as bench_scoring's K)")
    ap.add_argument("--verifier-epochs", type=int, default=2)
    ap.add_argument("--verifier-lr", type=float, default=3e-5)
    ap.add_argument("--verifier-out", default="runs/bench-corpus-verifier", help="relative to the repository root")
    ap.add_argument("--samples", default="tools/results/scoring_samples.jsonl")
    ap.add_argument("--score-cache", default="tools/results/scoring_cache.json")
    ap.add_argument("--groups", type=int, default=60, help="groups learned from per seed (as bench_quality)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--sample-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--eval-k", type=int, default=4)
    ap.add_argument("--answer-match-weight", type=float, default=1.0)
    ap.add_argument("--out", default="tools/results/bench_corpus.json")
    args = ap.parse_args()
    settings = {k: v for k, v in vars(args).items() if k not in ("parts", "domains", "seeds", "out", "verifier_out")}

    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    if previous.get("results") and previous.get("settings") != settings:
        raise SystemExit(f"{out} holds results measured with other settings; give another --out or move it away")
    results = previous.get("results", [])
    done = {(r["part"], r.get("domain"), r.get("seed")) for r in results}
    embedder = Embedder()
    units: list[tuple[str, str | None, int | None]] = []
    if "tasks" in args.parts:
        units += [("tasks", d, None) for d in args.domains]
    if "scoring" in args.parts:
        units.append(("scoring", "conservation", None))
    if "loop" in args.parts:
        units += [("loop", d, s) for d in args.domains for s in (None, *args.seeds)]
    for part, domain, seed in units:
        if (part, domain, seed) in done:
            print(f"{part} {domain} seed {seed}: already in {out}, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        if part == "tasks":
            row = part_tasks(domain, embedder, args)
        elif part == "scoring":
            row = {"domain": domain, **part_scoring(embedder, args)}
        else:
            row = part_loop(domain, seed, embedder, args)
        row.update(part=part, seed=seed, seconds_total=time.perf_counter() - t0)
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("dropped",)}, default=str)[:1500], flush=True)
        write_report({"benchmark": "corpus", "settings": settings, "results": results,
                      "summary": summarise(results)}, out)
    print(json.dumps(summarise(results), indent=1))


if __name__ == "__main__":
    main()
