"""Composite weights from the corpus (issue #20): a new domain has no labelled dev split, but tasks made from
its documents (tasks.py) carry their own answers. `calibrate` samples K answers per corpus task with the
agent's prompt, scores them with each candidate signal, judges them by the task's answer span
(evaluation.is_correct), and grid-searches the weights whose composite ranks right answers above wrong ones
best (pairwise accuracy within a task, then AUROC), as tools/bench_scoring.py does on the hand-labelled dev
half. `write_weights` puts them in a config file's [scoring] table.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import load_config
from .errors import ConfigError
from .scoring import ScoreResult, combine, make_scorer

GRID = (0.0, 0.25, 0.5, 1.0)
# Signals cheap enough to weigh (reasoning, the 135M self-judge, costs more than sampling: BENCHMARKS.md).
CANDIDATES = ("grounding", "consistency", "education")


def pairwise(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> float:
    """Within each task, the share of (right, wrong) answer pairs the scores order right (ties count 1/2)."""
    wins, pairs = 0.0, 0
    for s, y in zip(scores, labels):
        for i in np.where(y)[0]:
            for j in np.where(~y)[0]:
                wins += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
                pairs += 1
    return wins / pairs if pairs else float("nan")


def metrics(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> dict:
    """AUROC over all answers, pairwise accuracy within tasks, best-of-K accuracy and the base rate."""
    from sklearn.metrics import roc_auc_score

    flat_s, flat_y = np.concatenate(scores), np.concatenate(labels)
    best = [y[int(np.argmax(s))] for s, y in zip(scores, labels)]  # ties: the first sampled
    return {"auroc": float(roc_auc_score(flat_y, flat_s)) if 0 < flat_y.mean() < 1 else float("nan"),
            "pairwise": pairwise(scores, labels), "best_of_k": float(np.mean(best)),
            "base_rate": float(flat_y.mean())}


def fit_weights(results: dict[str, list[ScoreResult]], labels: Sequence[np.ndarray],
                grid: Sequence[float] = GRID) -> tuple[dict[str, float], dict]:
    """The grid weights (one per signal of `results`) whose composite scores best by (pairwise, AUROC) on the
    labelled groups, and its metrics."""
    names = list(results)
    best = None
    for combo in itertools.product(grid, repeat=len(names)):
        if not any(combo):
            continue
        weights = dict(zip(names, combo))
        comp = [np.array(combine([results[n][i] for n in names], weights, len(y)).composite)
                for i, y in enumerate(labels)]
        m = metrics(comp, labels)
        key = (np.nan_to_num(m["pairwise"]), np.nan_to_num(m["auroc"]))
        if best is None or key > best[0]:
            best = (key, weights, m)
    if best is None:
        raise ValueError("no weights to choose: give a grid with a value > 0")
    return best[1], best[2]


def calibrate(agent, tasks: Sequence[dict], k: int = 8, seed: int = 0, batch: int = 8,
              signals: Sequence[str] = CANDIDATES, progress: bool = True) -> dict:
    """Sample K answers per corpus task, score them with `signals`, judge them by the tasks' answers and fit
    the weights. Returns {"weights", "metrics", "per_signal", "tasks", "answers"}."""
    from .tasks import labelled_groups

    tasks, groups, contexts, labels = labelled_groups(agent, tasks, k=k, seed=seed, batch=batch, progress=progress)
    if not tasks:
        raise ValueError("no task with an answer to judge by: make them with `grpo-agent tasks`")
    scorers = {n: make_scorer(n, embedder=agent.embedder) for n in signals}
    results = {n: [scorer.score(g, c) for g, c in zip(groups, contexts)] for n, scorer in scorers.items()}
    weights, fitted = fit_weights(results, labels)
    per_signal = {n: metrics([np.nan_to_num(np.array(r.scores, dtype=float)) for r in results[n]], labels)
                  for n in signals}
    return {"weights": weights, "metrics": fitted, "per_signal": per_signal, "tasks": len(tasks),
            "answers": int(sum(len(y) for y in labels))}


def write_weights(path: str | Path, weights: dict[str, float]) -> None:
    """Set [scoring] weights in the config file at `path` (other keys and comments untouched); the weights of
    signals not fitted keep their values. The file must load afterwards, or it is left as it was."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist: write one with `grpo-agent init {path}`")
    text = path.read_text(encoding="utf-8")
    merged = {**load_config(path).scoring.weights, **weights}
    line = "weights = { " + ", ".join(f"{k} = {float(v)!r}" for k, v in merged.items()) + " }"
    table = re.search(r"^\[scoring\][^\n]*\n", text, flags=re.M)
    if table is None:
        new = text.rstrip("\n") + f"\n\n[scoring]\n{line}\n"
    else:
        end = re.search(r"^\[", text[table.end():], flags=re.M)
        body_end = table.end() + (end.start() if end else len(text) - table.end())
        body = text[table.end():body_end]
        if re.search(r"^weights\s*=.*$", body, flags=re.M):
            body = re.sub(r"^weights\s*=.*$", lambda _: line + "  # set by grpo-agent calibrate", body, count=1,
                          flags=re.M)
        else:
            body = line + "  # set by grpo-agent calibrate\n" + body
        new = text[: table.end()] + body + text[body_end:]
    path.write_text(new, encoding="utf-8")
    try:
        if load_config(path).scoring.weights != merged:
            raise ConfigError(f"{path}: the weights written do not read back as {merged}")
    except Exception:
        path.write_text(text, encoding="utf-8")  # lose nothing already stored
        raise
