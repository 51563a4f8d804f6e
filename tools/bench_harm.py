"""How well the harm detector (grpo_agent.harm) tells harmful requests and answers from benign ones.

Data (data/conservation, see its README):
  requests  harm_probe.jsonl (harmful) against benign_lookalikes.jsonl (benign requests sharing words and
            species with harmful ones) and eval.jsonl's questions (plain conservation questions);
  answers   harm_answers_labelled.jsonl: the bundled model's answers to the harm probes, labelled by hand.
Each has a dev split (the species the rule file and its examples were written from; the dev rows are among
the rule file's labelled examples) and a held-out split (species neither names). The [detector] thresholds
are chosen on the examples alone, from 5-fold cross-validated P(harmful) (the highest recall whose
false-flag rate stays <= --max-false-flags), and every figure is reported on the held-out split: for the
rules alone, the learned part alone (P >= 0.5), and the two combined as the rule file's [detector] says and
as chosen here.

    .venv/bin/python tools/bench_harm.py [--rules FILE] [--max-false-flags 0.05] [--out tools/results/bench_harm.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
from benchlib import DATA, read_jsonl, write_report

ROOT = DATA.parent.parent

from grpo_agent.harm import DetectorSettings, ExampleClassifier, HarmDetector, flag_answer, flag_request
from grpo_agent.retrieval import Embedder


def rates(flags: list[bool], labels: list[bool]) -> dict:
    """Recall on the harmful, false-flag rate on the benign."""
    pos = [f for f, y in zip(flags, labels) if y]
    neg = [f for f, y in zip(flags, labels) if not y]
    return {"recall": float(np.mean(pos)) if pos else None, "false_flags": float(np.mean(neg)) if neg else None,
            "harmful": len(pos), "benign": len(neg)}


def request_flags(rule: list[bool], vote: np.ndarray, s: DetectorSettings) -> list[bool]:
    return [flag_request(r, float(v), s) for r, v in zip(rule, vote)]


def answer_flags(rule: list[bool], vote: np.ndarray, s: DetectorSettings) -> list[bool]:
    return [flag_answer(r, float(v), s) for r, v in zip(rule, vote)]


def choose(flags_of, rule, vote, labels, grid: dict, max_false: float) -> tuple[dict, dict]:
    """The grid point with the highest recall whose false-flag rate is <= max_false (ties: fewer false flags);
    without one, the point with the fewest false flags."""
    best = fallback = None
    for values in itertools.product(*grid.values()):
        setting = {k: float(v) for k, v in zip(grid, values)}
        r = rates(flags_of(rule, vote, DetectorSettings(**setting)), labels)
        if r["false_flags"] <= max_false and (best is None or (r["recall"], -r["false_flags"]) > best[0]):
            best = ((r["recall"], -r["false_flags"]), setting, r)
        if fallback is None or (-r["false_flags"], r["recall"]) > fallback[0]:
            fallback = ((-r["false_flags"], r["recall"]), setting, r)
    return (best or fallback)[1], (best or fallback)[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", help="safety rule file (default: the bundled conservation rules)")
    ap.add_argument("--max-false-flags", type=float, default=0.05)
    ap.add_argument("--out", default="tools/results/bench_harm.json")
    args = ap.parse_args()

    embedder = Embedder()
    passages = read_jsonl(DATA / "passages.jsonl")
    species = sorted({p["metadata"].get("species") for p in passages} - {None})
    detector = HarmDetector.load(args.rules, species, embedder)
    probes, benign = read_jsonl(DATA / "harm_probe.jsonl"), read_jsonl(DATA / "benign_lookalikes.jsonl")
    questions = [q["question"] for q in read_jsonl(DATA / "eval.jsonl")]
    answers = read_jsonl(DATA / "harm_answers_labelled.jsonl")
    split_of = {p["id"]: p["split"] for p in probes}

    t0 = time.perf_counter()
    texts = [p["request"] for p in probes] + [b["request"] for b in benign] + questions
    verdicts = detector.requests(texts)
    request_s = time.perf_counter() - t0
    req = {"split": [p["split"] for p in probes] + [b["split"] for b in benign] + ["eval"] * len(questions),
           "label": [True] * len(probes) + [False] * (len(benign) + len(questions)),
           "rule": [v.rule is not None for v in verdicts], "vote": np.array([v.vote for v in verdicts])}
    t0 = time.perf_counter()
    averdicts = [detector.answers([a["answer"]], a["request"])[0] for a in answers]
    answer_s = time.perf_counter() - t0
    ans = {"split": [split_of[a["id"]] for a in answers], "label": [a["harmful"] for a in answers],
           "rule": [v.rule is not None for v in averdicts], "vote": np.array([v.vote for v in averdicts])}

    def cross_validated(kind: str, rule_of) -> tuple[list[bool], np.ndarray, list[bool]]:
        """Rule flags, 5-fold cross-validated P(harmful) and labels of the rule file's examples of one kind."""
        examples = [e for e in detector.rules.examples if e.kind == kind]
        fold = np.arange(len(examples)) % 5
        vote = np.zeros(len(examples))
        for f in range(5):
            fit = ExampleClassifier(embedder, [e for e, g in zip(examples, fold) if g != f], detector.rules.mask,
                                    detector.settings.c)
            vote[fold == f] = fit.scores([e.text for e, g in zip(examples, fold) if g == f])
        return [rule_of(e.text) for e in examples], vote, [e.harmful for e in examples]

    def part(d: dict, split: str) -> tuple[list[bool], np.ndarray, list[bool]]:
        keep = [s == split for s in d["split"]]
        return ([r for r, k in zip(d["rule"], keep) if k], d["vote"][np.array(keep)],
                [y for y, k in zip(d["label"], keep) if k])

    floors = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.01]
    grid = [round(x, 2) for x in np.arange(0.3, 0.96, 0.05)] + [1.01]
    chosen_req, dev_req = choose(request_flags, *cross_validated("request", lambda t: detector.rules.asked(t) is not None),
                                 {"request_threshold": grid, "request_rule_floor": floors}, args.max_false_flags)
    chosen_ans, dev_ans = choose(answer_flags, *cross_validated("answer", lambda t: detector.rules.check(t) is not None),
                                 {"answer_threshold": grid, "answer_rule_floor": floors}, args.max_false_flags)
    current = detector.settings
    report = {"rules": args.rules or "bundled", "max_false_flags": args.max_false_flags,
              "chosen_on_dev": {**chosen_req, **chosen_ans},
              "examples_cross_validated_with_chosen": {"requests": dev_req, "answers": dev_ans},
              "current_settings": vars(current), "requests": {}, "answers": {},
              "seconds": {"requests": request_s, "answers": answer_s, "n_requests": len(texts), "n_answers": len(answers)}}
    for name, d, flags_of, chosen in (("requests", req, request_flags, chosen_req),
                                      ("answers", ans, answer_flags, chosen_ans)):
        for split in ("dev", "heldout"):
            rule, vote, labels = part(d, split)
            report[name][split] = {
                "rules_only": rates(rule, labels),
                "vote_only": rates([v >= 0.5 for v in vote], labels),
                "combined_current": rates(flags_of(rule, vote, current), labels),
                "combined_chosen_on_dev": rates(flags_of(rule, vote, DetectorSettings(**chosen)), labels),
            }
    rule, vote, _ = part(req, "eval")
    report["requests"]["eval_questions_flagged"] = {
        "current": float(np.mean(request_flags(rule, vote, current))),
        "chosen_on_dev": float(np.mean(request_flags(rule, vote, DetectorSettings(**chosen_req)))), "n": len(rule)}

    samples = ROOT / "tools" / "results" / "scoring_samples.jsonl"  # bench_scoring.py's answers to eval.jsonl
    if samples.is_file():
        rows = read_jsonl(samples)[1:]
        pairs = [(c["text"], r["question"]["question"]) for r in rows for c in r["completions"]]
        flagged = [detector.answers([a], q)[0] for a, q in pairs]
        report["answers"]["eval_answers_flagged"] = {
            "rules_only": float(np.mean([v.rule is not None for v in flagged])),
            "combined_current": float(np.mean([v.harmful for v in flagged])), "n": len(pairs),
            "source": str(samples.relative_to(ROOT))}

    print(f"chosen on dev (false flags <= {args.max_false_flags}): {report['chosen_on_dev']}")
    for name in ("requests", "answers"):
        for split in ("dev", "heldout"):
            for how, r in report[name][split].items():
                print(f"{name:8s} {split:7s} {how:24s} recall {r['recall']:.3f} ({r['harmful']})  "
                      f"false flags {r['false_flags']:.3f} ({r['benign']})")
    print(f"eval.jsonl questions flagged as harmful requests: {json.dumps(report['requests']['eval_questions_flagged'])}")
    if "eval_answers_flagged" in report["answers"]:
        print(f"the model's answers to eval.jsonl flagged as harmful: {json.dumps(report['answers']['eval_answers_flagged'])}")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
