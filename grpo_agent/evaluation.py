"""Task sets and evaluation: gold-answer checks (never a training signal in the label-free loop), reading
task files, and scoring an agent on held-out tasks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from .errors import GRPOAgentError
from .rundir import EvalResult
from .text import NUMBER_WORDS


def normalise(text: str) -> str:
    """Lower-case words with punctuation removed, thousands separators dropped and number words as digits."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text.lower())
    words = re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.replace("-", " "))
    return " ".join(str(NUMBER_WORDS.get(w, w)) for w in words)


def is_correct(answer: str, gold: str, aliases: Iterable[str] = ()) -> bool:
    """Whether `answer` states the gold answer (or an alias) as a whole-word phrase not negated or qualified
    by the word before it; a yes/no gold answer must open the answer."""
    said = normalise(answer)
    for target in (gold, *aliases):
        t = normalise(target)
        if not t:
            continue
        if t in ("yes", "no"):
            if said.split()[:1] == [t]:
                return True
        elif any(_QUALIFIER.search(said[: m.start()]) is None
                 for m in re.finditer(rf"(?<![a-z0-9]){re.escape(t)}(?![a-z0-9])", said)):
            return True
    return False


# A word right before the match that changes its meaning: "not endangered", "critically endangered" for
# gold "Endangered", "near threatened" for gold "Threatened".
_QUALIFIER = re.compile(r"\b(not|non|near|critically|never)\s$")


# ----- task sets and evaluation ------------------------------------------------------------------------
TASK_KEYS = ("question", "prompt", "task")


def read_tasks(path: str | Path) -> list[dict]:
    """Tasks from a JSONL file: one object per line with the question under "question" (or "prompt" or
    "task"), and optionally "id", a gold "answer" and "aliases". A plain .txt file holds one question a line."""
    path = Path(path)
    if not path.is_file():
        raise GRPOAgentError(f"task file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [{"id": f"{path.stem}-{i}", "question": line.strip()}
                for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    tasks = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GRPOAgentError(f"{path}:{n} is not valid JSON ({e}); write one JSON object per line") from e
        key = next((k for k in TASK_KEYS if isinstance(row, dict) and isinstance(row.get(k), str)), None)
        if key is None:
            raise GRPOAgentError(f'{path}:{n} has no "question" text; each line needs {{"question": "..."}}')
        answer, aliases = row.get("answer"), row.get("aliases", [])
        if answer is not None and not isinstance(answer, str):
            raise GRPOAgentError(f'{path}:{n}: "answer" must be a string (write {json.dumps(str(answer))})')
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise GRPOAgentError(f'{path}:{n}: "aliases" must be a list of strings')
        tasks.append({**row, "question": row[key], "id": str(row.get("id", f"{path.stem}-{n}"))})
    if not tasks:
        raise GRPOAgentError(f"task file {path} holds no tasks")
    return tasks


def evaluate(agent, tasks: Sequence[dict], label_free: bool = False, k: int = 4, batch: int = 8,
             seed: int = 1234, progress: bool = True, unit: str = "answer") -> EvalResult:
    """Score the agent on held-out tasks, answering each directly (unit "answer", the facts retrieved for it in
    its prompt) or in a multi-turn episode with the search tool (unit "episode").

    With gold answers (and label_free False): accuracy of its greedy answer (k=1, temperature 0).
    Otherwise: the mean composite self-score of k answers sampled per task (fixed seed, so two rounds are
    compared on the same draws of the sampler). "values" holds each task's score, in task order, for a
    paired comparison of two evals. Nothing is logged.
    """
    from tqdm import tqdm

    labelled = not label_free and all("answer" in t for t in tasks)
    values: list[float] = []
    sampled = []
    chunks = [tasks[i : i + batch] for i in range(0, len(tasks), batch)]
    for i, chunk in enumerate(tqdm(chunks, desc="eval", unit="batch", disable=not progress, leave=False)):
        questions = [t["question"] for t in chunk]
        if labelled and unit == "episode":
            groups, _ = agent.episode_runner(temperature=0.0).run(questions, 1)
            values += [float(is_correct(g.completions[0].text, t["answer"], t.get("aliases", ())))
                       for g, t in zip(groups, chunk)]
        elif labelled:
            replies = agent.respond_batch(questions, log=False, k=1, temperature=0.0)
            values += [float(is_correct(r.answer, t["answer"], t.get("aliases", ()))) for r, t in zip(replies, chunk)]
        elif unit == "episode":
            answered = agent.episode_groups(questions, seed=seed + i, k=k)
            values += [sum(s.composite) / len(s.composite) for s in answered.scored]
            sampled += answered.groups
        else:
            groups, contexts = agent.sample_groups(questions, k=k, seed=seed + i)
            for scored in agent.scorer.score_groups(groups, contexts):
                values.append(sum(scored.composite) / len(scored.composite))
            sampled += groups
    watched = {}
    if sampled:  # the evaluated policy's own samples: what the collapse guards watch
        watched = {k: v for k, v in monitors(sampled).items() if k in ("entropy", "distinct_rate", "answer_tokens")}
    return EvalResult(metric="accuracy" if labelled else "composite", value=sum(values) / max(len(values), 1),
                      n=len(values), values=values, monitors=watched or None)


def monitors(groups) -> dict:
    """What collapse looks like, measured on a round's groups: the entropy of the sampled tokens (estimated
    as their mean negative log-prob, at the sampling temperature), answer length in tokens, the share of
    distinct answers within a group, the share of groups whose scores did not vary, and each signal's mean."""
    completions = [c for g in groups for c in g.sampled]  # the policy's own: not a guard's safe completion
    logprobs = [lp for c in completions for lp, m in zip(c.logprobs, c.mask or [1] * len(c.logprobs)) if m]
    composites = [c.composite for c in completions if c.composite is not None]
    signals: dict[str, list[float]] = {}
    for c in completions:
        for name, value in c.scores.items():
            if value == value:  # not NaN
                signals.setdefault(name, []).append(value)
    distinct = [len({" ".join(c.text.lower().split()) for c in g.sampled}) / len(g.sampled)
                for g in groups if g.sampled]
    avg = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {
        "groups": len(groups), "zero_variance_groups": sum(g.zero_variance for g in groups),
        "zero_variance_rate": avg([float(g.zero_variance) for g in groups]),
        "train_composite": avg(composites), "entropy": -avg(logprobs) if logprobs else None,
        "answer_tokens": avg([float(c.sampled_tokens) for c in completions]),
        "distinct_rate": avg(distinct), "signals": {name: avg(v) for name, v in sorted(signals.items())},
        **episode_monitors(completions),
    }


def episode_monitors(completions) -> dict:
    """Of multi-turn episodes (none: {}): the policy's turns, tool calls and tool errors per episode, and the
    share of episodes that searched by their own choice (an exploring episode's forced first search not counted)."""
    episodes = [c.turns for c in completions if c.turns is not None]
    if not episodes:
        return {}
    calls = [sum(t["role"] == "tool" for t in turns) for turns in episodes]
    chosen = [c - sum(bool(t.get("forced")) for t in turns) for c, turns in zip(calls, episodes)]
    n = len(episodes)
    return {"episodes": n, "turns": sum(sum(t["role"] == "assistant" for t in e) for e in episodes) / n,
            "tool_calls": sum(calls) / n, "tool_errors": sum(sum(bool(t.get("error")) for t in e) for e in episodes) / n,
            "search_rate": sum(c > 0 for c in chosen) / n}

