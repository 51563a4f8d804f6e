"""Does training on multi-turn episodes teach the bundled model when and what to look up? Today's agent (the top 3
facts always in its prompt) against the agent with only the search tool, before and after episode GRPO.

Data as bench_quality.py: the bundled model, the conservation corpus as the fact index, the even rows of
data/conservation/eval.jsonl as the pool learned from (questions only: label-free), the odd rows held out. Each
eval.jsonl row names its supporting passage (passage_id), which only this benchmark reads.

Systems:
  top3            today's agent: one answer per sample, the 3 facts retrieved for the question in its prompt;
  episodes-base   the base model in episodes (episodes.py): no facts in its prompt, the search tool, at most
                  --max-turns turns, the last one an answer;
  episodes-grpo   the same after label-free GRPO on --groups episode groups from the pool (K = --k episodes
                  each, scored on their final answers with the facts each retrieved), one seed per run;
  episodes-explore  as episodes-grpo, with --explore episodes of each collected group made to search on their
                  first turn ([episodes] explore); its held-out episodes choose freely, as every system's do.

Measured on the held-out questions, --eval-k samples (answers or episodes) per question at the sampling
temperature, fixed seeds:
  accuracy        the share of sampled final answers that state the gold answer;
  useful_search   the share of episodes with a search whose results hold the question's supporting passage;
  search_rate, turns, tool_errors per episode;
  seconds_per_group  wall seconds to sample and score one group (an episode group, or a top3 answer group),
                  measured during the eval of the same run.
Targets (issue #22): after training, accuracy at least top3's, and useful_search up by at least 30 points.
Resumable: a rerun with the same settings skips the (system, seed) units already written to --out. Units can run
as separate processes (each its own --out, OMP_NUM_THREADS=1), then --merge gathers their files into --out.

    .venv/bin/python tools/bench_episodes.py            # top3, episodes-base, episodes-grpo and -explore x 3 seeds
    .venv/bin/python tools/bench_episodes.py --seeds 0 --held-out 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench_quality import task_order
from benchlib import DATA, read_jsonl, resumable, write_report

from grpo_agent.agent import GRPOAgent
from grpo_agent.config import Config, EpisodeConfig, SamplingConfig, UpdateConfig
from grpo_agent.evaluation import episode_monitors, is_correct
from grpo_agent.records import Passage
from grpo_agent.retrieval import Embedder, FactIndex
from grpo_agent.rollout.policy import load_policy
from grpo_agent.updater import GRPOUpdater

SYSTEMS = ("top3", "episodes-base", "episodes-grpo", "episodes-explore")
TRAINED = SYSTEMS[2:]


def measure(agent: GRPOAgent, tasks: list[dict], episodes: bool, k: int, seed: int, batch: int) -> dict:
    """k sampled answers (or episodes) per held-out task, scored as the agent scores them, against the gold."""
    right = n = useful = 0
    completions, seconds, groups_n = [], 0.0, 0
    for i in range(0, len(tasks), batch):
        chunk = tasks[i : i + batch]
        questions = [t["question"] for t in chunk]
        t0 = time.perf_counter()
        if episodes:
            groups = agent.episode_groups(questions, seed=seed + i, k=k).groups
        else:
            groups, contexts = agent.sample_groups(questions, k=k, seed=seed + i)
            agent.scorer.score_groups(groups, contexts)
        seconds += time.perf_counter() - t0
        groups_n += len(groups)
        for t, g in zip(chunk, groups):
            for c in g.completions:
                right += is_correct(c.text, t["answer"], t.get("aliases", ()))
                n += 1
                found = {p for turn in c.turns or () for p in turn.get("passage_ids", ())}
                useful += t["passage_id"] in found
            completions += g.completions
    row = {"accuracy": right / n, "samples": n, "questions": len(tasks), "k": k, "seconds_per_group": seconds / groups_n}
    if episodes:
        row.update(useful_search=useful / n, **episode_monitors(completions))
    return row


def learn(agent: GRPOAgent, pool: list[dict], seed: int, args, explore: int = 0) -> dict:
    """Label-free GRPO on --groups episode groups from the pool (on-policy: --sample-batch tasks sampled with the
    current weights, then trained on), `explore` episodes of each made to search first."""
    tasks = task_order(pool, args.groups, seed)
    updater = GRPOUpdater(agent.policy, UpdateConfig(learning_rate=args.lr, groups_per_step=args.groups_per_step,
                                                     seed=seed))
    t0, history, zero, completions = time.perf_counter(), [], 0, []
    for i in range(0, len(tasks), args.sample_batch):
        chunk = tasks[i : i + args.sample_batch]
        groups = agent.episode_groups([t["question"] for t in chunk], seed=seed * 1_000_003 + i, explore=explore).groups
        zero += sum(g.zero_variance for g in groups)
        completions += [c for g in groups for c in g.completions]
        history += updater.train(groups)
        name = "episodes-explore" if explore else "episodes-grpo"
        print(f"  {name} seed {seed}: {i + len(chunk)}/{len(tasks)} groups, {time.perf_counter() - t0:.0f} s"
              + (f", KL {history[-1]['kl']:.4f}" if history else "")
              + f", searched {episode_monitors(completions)['search_rate']:.2f}", flush=True)
    last = history[-4:]
    return {"learn_seconds": time.perf_counter() - t0, "groups": len(tasks), "zero_variance_groups": zero,
            "steps": len(history), "kl": statistics.mean(m["kl"] for m in last) if last else 0.0,
            "train": episode_monitors(completions)}


def summarise(results: list[dict]) -> dict:
    out = {}
    for system in SYSTEMS:
        rows = [r for r in results if r["system"] == system]
        if not rows:
            continue
        keys = [k for k in ("accuracy", "useful_search", "search_rate", "turns", "tool_errors", "seconds_per_group")
                if k in rows[0]["held_out"]]
        out[system] = {"seeds": len(rows), **{k: statistics.mean(r["held_out"][k] for r in rows) for k in keys},
                       **{f"{k}_min": min(r["held_out"][k] for r in rows) for k in keys},
                       **{f"{k}_max": max(r["held_out"][k] for r in rows) for k in keys}}
    for system, tag in (("episodes-grpo", ""), ("episodes-explore", "_explore")):
        if "top3" in out and system in out:
            out[f"accuracy_minus_top3{tag}"] = out[system]["accuracy"] - out["top3"]["accuracy"]
        if "episodes-base" in out and system in out:
            out[f"useful_search_gain_points{tag}"] = 100 * (out[system]["useful_search"]
                                                            - out["episodes-base"]["useful_search"])
    if "top3" in out and "episodes-base" in out:
        out["episode_over_answer_seconds"] = out["episodes-base"]["seconds_per_group"] / out["top3"]["seconds_per_group"]
    return out


def save(out: Path, settings: dict, results: list[dict]) -> None:
    write_report({"benchmark": "episodes", "settings": settings, "results": results,
                  "summary": summarise(results)}, out)


def merge(files: list[Path], out: Path, settings: dict, results: list[dict], done: set) -> None:
    """Units measured by separate processes into one file: same settings (a file from before --explore existed
    counts as its episodes-explore-free settings), each (system, seed) once."""
    for f in files:
        report = json.loads(f.read_text())
        theirs = {**report["settings"], "explore": report["settings"].get("explore", settings["explore"])}
        if theirs != settings:
            raise SystemExit(f"{f} was measured with other settings ({report['settings']}); give the same flags")
        for row in report["results"]:
            if row["system"] == "episodes-explore" and "explore" not in report["settings"]:
                raise SystemExit(f"{f}: an episodes-explore unit without its explore setting")
            if (row["system"], row["seed"]) not in done:
                results.append(row)
                done.add((row["system"], row["seed"]))
    results.sort(key=lambda r: (SYSTEMS.index(r["system"]), r["seed"] if r["seed"] is not None else -1))
    save(out, settings, results)
    print(summarise(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--groups", type=int, default=60, help="episode groups learned from per seed")
    ap.add_argument("--k", type=int, default=4, help="episodes per group while learning")
    ap.add_argument("--sample-batch", type=int, default=4)
    ap.add_argument("--groups-per-step", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--search-top-k", type=int, default=3)
    ap.add_argument("--explore", type=int, default=1, help="episodes-explore: episodes of a group made to search first")
    ap.add_argument("--eval-k", type=int, default=4)
    ap.add_argument("--held-out", type=int, default=0, help="held-out questions evaluated (0: all)")
    ap.add_argument("--batch", type=int, default=8, help="held-out tasks sampled together")
    ap.add_argument("--out", default="tools/results/bench_episodes.json")
    ap.add_argument("--merge", nargs="+", metavar="FILE", help="gather these result files into --out, run nothing")
    args = ap.parse_args()
    settings = {k: v for k, v in vars(args).items() if k not in ("seeds", "systems", "out", "merge")}
    out = Path(args.out)
    results, done = resumable(out, settings)
    if args.merge:
        return merge([Path(f) for f in args.merge], out, settings, results, done)

    embedder = Embedder()
    rows = read_jsonl(DATA / "eval.jsonl")
    pool, held_out = rows[0::2], rows[1::2][: args.held_out or None]
    index = FactIndex.build([Passage(**p) for p in read_jsonl(DATA / "passages.jsonl")], embedder)
    cfg = Config(sampling=SamplingConfig(k=args.k, max_new_tokens=args.max_new_tokens, temperature=args.temperature),
                 episodes=EpisodeConfig(max_turns=args.max_turns, search_top_k=args.search_top_k))
    print(f"pool {len(pool)} tasks, held-out {len(held_out)}", flush=True)
    plan = [(s, None) for s in ("top3", "episodes-base") if s in args.systems]
    plan += [(s, seed) for s in TRAINED for seed in args.seeds if s in args.systems]
    for system, seed in plan:
        if (system, seed) in done:
            print(f"{system} seed {seed}: already in {out}, skipped", flush=True)
            continue
        agent = GRPOAgent.from_config(cfg, policy=load_policy("default"), index=index, embedder=embedder,
                                      store_path=Path(tempfile.mkdtemp(prefix="bench-episodes-")) / "store.sqlite")
        row = {"system": system, "seed": seed}
        if system in TRAINED:
            row.update(learn(agent, pool, seed, args, explore=args.explore if system == "episodes-explore" else 0))
        row["held_out"] = measure(agent, held_out, system != "top3", args.eval_k, seed=10_000, batch=args.batch)
        h = row["held_out"]
        print(f"{system} seed {seed}: accuracy {h['accuracy']:.3f}"
              + (f", useful search {h['useful_search']:.3f}, searched {h['search_rate']:.3f}, turns {h['turns']:.2f}"
                 if "useful_search" in h else "") + f", {h['seconds_per_group']:.1f} s a group", flush=True)
        results.append(row)
        save(out, settings, results)
    print(summarise(results))


if __name__ == "__main__":
    main()
