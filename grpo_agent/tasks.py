"""Tasks made from a corpus (issue #20): questions written from the passages of a fact index, so a user who
brings only documents has something to run the loop on. Search Self-Play (arXiv 2510.18821) and SPICE
(arXiv 2510.24684) keep a made question only when the documents answer it; R-Zero (arXiv 2508.05004) keeps
the ones of middle difficulty.

Two ways to make one:
  made by code   a sentence of the passage that states a name, a number or a year becomes an echo question
                 ("Tigers were listed in which year?") or a cloze ("Fill in the blank: ..."), with that span
                 kept as the task's answer;
  proposed       the policy writes one question about the passage (greedy, one line); the passage's text is
                 kept as its `reference` (no answer span).
A task is kept only when retrieval with the question alone returns its source passage in the top `top_k`,
its answer is not in the question, and it is not a near-duplicate of a kept task (cosine >= `max_similarity`
of their embeddings); `mixed_only` further keeps a task with an answer only when the policy's K answers to
it are neither all right nor all wrong. Every task keeps its source passage id; the JSONL written is what
`grpo-agent loop --tasks` reads.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .evaluation import is_correct, normalise
from .records import Passage
from .text import split_sentences

ORIGIN = "corpus"  # a made task's `origin`: its answer comes from the documents, not a human label
BLANK = "____"
CLOZE = "Fill in the blank: {sentence}"
PROPOSE = ("Read the passage and write one question that it answers. Reply with the question only.\n\n"
           "Passage: {text}")

_YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")
_NUMBER = re.compile(r"\b\d[\d,]*(?:\.\d+)?(?:\s?(?:%|per cent|percent))?")
_NAME = re.compile(r"\b[A-Z][\w'’-]*(?:\s+(?:of\s+(?:the\s+)?|de\s+|and\s+)?[A-Z][\w'’-]*)*")
_UNIT = re.compile(r"^\s+([a-z]+)")
# A sentence that opens with one of these lacks its subject out of context ("It is listed as ...").
_PRONOUNS = {"it", "its", "they", "their", "them", "this", "these", "those", "he", "she", "his", "her", "such"}
# Capitalised only because they open a sentence, or too common to be an answer.
# A name followed by a lowercase word other than these modifies it ("African elephants", "Panthera tigris",
# "Chinese medicine"): the span would be half a noun phrase, so it is not asked for.
_FOLLOWERS = {"in", "on", "at", "of", "and", "or", "to", "for", "by", "from", "with", "as", "is", "are", "was",
              "were", "has", "have", "had", "which", "that", "where", "who", "since", "after", "before", "during",
              "until", "than", "but", "so", "while", "because", "a", "an", "the", "its", "their", "into", "across"}
_WH = re.compile(r"\b(what|which|who|whom|whose|where|when|why|how)\b", re.IGNORECASE)
_NOT_NAMES = {"the", "a", "an", "in", "on", "at", "of", "for", "by", "all", "some", "most", "many", "both",
              "each", "every", "about", "around", "over", "under", "after", "before", "during", "since",
              "when", "while", "as", "and", "but", "or", "if", "there", "here", "one", "only", "no", "not"}


@dataclass
class Task:
    """A question made from a passage; `answer` is the span it asks for (None for a proposed question)."""

    id: str
    question: str
    passage_id: str
    kind: str  # "wh" | "cloze" | "proposed"
    answer: str | None = None
    aliases: list[str] = field(default_factory=list)
    reference: str | None = None  # the passage text, for a proposed question

    def to_json(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if v not in (None, [])}, "origin": ORIGIN}


def corpus_answer(task: dict) -> str | None:
    """The answer span of a task made from the corpus (its `origin` says so), else None: a hand-written task's
    "answer" is a human label, which the label-free loop never scores with."""
    return task.get("answer") if task.get("origin") == ORIGIN else None


@dataclass
class MakeReport:
    """What `make_tasks` made, kept and dropped (by reason)."""

    made: int = 0
    kept: int = 0
    passages: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        why = ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common()) or "none"
        return (f"{self.passages} passages: made {self.made} tasks, kept {self.kept} "
                f"({self.kept / max(self.made, 1):.0%}); dropped: {why}")


def spans(sentence: str) -> list[tuple[str, str]]:
    """(span, type) the sentence states: years, numbers (with the noun they count) and names. Type is the
    wh-phrase that asks for it ("which year", "how many tigers", "what percentage", "what")."""
    found, taken = [], []

    def free(m: re.Match) -> bool:
        return all(m.end() <= a or m.start() >= b for a, b in taken)

    for m in _YEAR.finditer(sentence):
        found.append((m.group(0), "which year", m.start()))
        taken.append(m.span())
    for m in _NUMBER.finditer(sentence):
        if not free(m) or not re.search(r"\d", m.group(0)):
            continue
        text = m.group(0).rstrip(",.")
        unit = _UNIT.match(sentence[m.start() + len(text):])
        if text.endswith(("%", "cent")):
            wh = "what percentage"
        elif unit and unit.group(1) not in _NOT_NAMES:
            wh = f"how many {unit.group(1)}"
        else:
            wh = "what number"
        found.append((text, wh, m.start()))
        taken.append((m.start(), m.start() + len(text)))
    for m in _NAME.finditer(sentence):
        words = m.group(0).split()
        start = m.start()
        while words and words[0].lower() in _NOT_NAMES:  # "The Gir forest" -> "Gir forest"; "In" -> nothing
            start += len(words[0]) + 1
            words = words[1:]
        text = " ".join(words)
        if text.endswith(("'s", "’s")):  # "Africa's largest parks": the possessive is not the name
            text = text[:-2]
        following = re.match(r"\s+([a-z]+)", sentence[m.end():])
        if following and following.group(1) not in _FOLLOWERS:
            continue  # half a noun phrase ("African" of "African elephants", "Kemp" of "Kemp's ridley")
        if not text or start == 0 or not free(m) or len(text) < 3:  # the sentence's first word: not a name
            continue
        found.append((text, "what", start))
    return [(text, wh) for text, wh, _ in sorted(found, key=lambda x: x[2])]


def questions_from_sentence(sentence: str) -> list[tuple[str, str, str]]:
    """(kind, question, answer) made from one sentence: an echo question and a cloze per span."""
    sentence = " ".join(sentence.split())
    words = sentence.split()
    if not 6 <= len(words) <= 45 or words[0].lower().strip(",") in _PRONOUNS:
        return []
    out = []
    echo = _WH.search(sentence) is None  # a sentence with its own wh-word would read "what was called the what"
    for text, wh in spans(sentence):
        i = sentence.find(text)
        before, after = sentence[:i], sentence[i + len(text):]
        if wh.startswith("how many ") and after.lstrip().lower().startswith(wh.split()[-1]):
            after = after.lstrip()[len(wh.split()[-1]):]  # "3,900 tigers" -> "how many tigers"
        if echo:
            question = (before + wh + after).rstrip(" .;:!") + "?"
            out.append(("wh", question[0].upper() + question[1:], text))
        out.append(("cloze", CLOZE.format(sentence=before + BLANK + after), text))
    return out


def answer_in_question(question: str, answer: str) -> bool:
    """Whether the answer's words appear in the question (it would give itself away)."""
    a = normalise(answer)
    return bool(a) and re.search(rf"(?<![a-z0-9]){re.escape(a)}(?![a-z0-9])", normalise(question)) is not None


def code_tasks(passage: Passage, per_passage: int, rng: random.Random) -> list[Task]:
    """Up to `per_passage` x 4 candidate tasks from the passage's sentences (the filters keep fewer), in a
    seeded order that alternates echo questions and clozes."""
    made = [(kind, q, a) for s in split_sentences(passage.text) for kind, q, a in questions_from_sentence(s)]
    rng.shuffle(made)
    wh, cloze = [m for m in made if m[0] == "wh"], [m for m in made if m[0] == "cloze"]
    pairs = min(len(wh), len(cloze))  # an echo question first (it reads as users ask), then the longer list's rest
    order = [m for pair in zip(wh, cloze) for m in pair] + wh[pairs:] + cloze[pairs:]
    return [Task(f"task-{passage.id}-{i}", q, passage.id, kind, answer=a)
            for i, (kind, q, a) in enumerate(order[: per_passage * 4])]


def proposed_tasks(passages: Sequence[Passage], policy, batch: int = 8) -> list[Task]:
    """One question per passage written by the policy (greedy), up to its first question mark."""
    out = []
    for start in range(0, len(passages), batch):
        chunk = passages[start : start + batch]
        chats = [[{"role": "user", "content": PROPOSE.format(text=p.text)}] for p in chunk]
        groups = policy.sample(chats, k=1, max_new_tokens=48, temperature=0.0)
        for p, g in zip(chunk, groups):
            text = g.completions[0].text.strip().splitlines()[0] if g.completions[0].text.strip() else ""
            text = re.sub(r"^(question|q)\s*[:.]\s*", "", text, flags=re.IGNORECASE)
            if "?" in text and len(text[: text.index("?")].split()) >= 4:
                out.append(Task(f"task-{p.id}-p", text[: text.index("?") + 1], p.id, "proposed", reference=p.text))
    return out


def make_tasks(index, per_passage: int = 2, seed: int = 0, top_k: int = 3, max_similarity: float = 0.92,
               policy=None, passages: Iterable[Passage] | None = None, progress: bool = True,
               limit: int | None = None) -> tuple[list[Task], MakeReport]:
    """Tasks from the passages of `index` (or `passages` of it): made by code, plus one proposed by `policy`
    per passage when one is given; filtered as the module docstring says. With `limit`, it stops at the
    passage where that many are kept (the same first tasks as without it)."""
    from tqdm import tqdm

    passages = list(passages if passages is not None else index.passages())
    rng = random.Random(seed)
    report = MakeReport(passages=len(passages))
    candidates: dict[str, list[Task]] = {p.id: code_tasks(p, per_passage, rng) for p in passages}
    if policy is not None:
        for t in proposed_tasks(passages, policy):
            candidates[t.passage_id].insert(0, t)
    kept: list[Task] = []
    kept_vectors: list[np.ndarray] = []
    bar = tqdm(passages, desc="making tasks", unit="passage", disable=not progress)
    for seen, p in enumerate(bar, 1):
        tasks = candidates[p.id]
        report.made += len(tasks)
        mine = 0
        hits = index.search_batch([t.question for t in tasks], k=top_k) if tasks else []
        vectors = index.embedder.encode([t.question for t in tasks]) if tasks else []
        for t, found, v in zip(tasks, hits, vectors):
            if mine >= per_passage + (policy is not None):
                report.dropped["over per-passage"] += 1
            elif t.answer is not None and answer_in_question(t.question, t.answer):
                report.dropped["answer in question"] += 1
            elif p.id not in {h.passage.id for h in found}:
                report.dropped[f"source not in top {top_k}"] += 1
            elif kept_vectors and float(np.max(np.stack(kept_vectors) @ v)) >= max_similarity:
                report.dropped["near-duplicate"] += 1
            else:
                kept.append(t)
                kept_vectors.append(v)
                mine += 1
        bar.set_postfix(kept=len(kept))
        if limit is not None and len(kept) >= limit:
            report.passages = seen
            break
    bar.close()
    report.kept = len(kept)
    return kept, report


def mixed_only(tasks: Sequence[Task], policy, index, k: int = 4, top_k: int = 3, max_new_tokens: int = 48,
               temperature: float = 0.8, seed: int = 0, batch: int = 8, report: MakeReport | None = None,
               progress: bool = True) -> list[Task]:
    """The tasks whose K sampled answers (the agent's prompt: the question and its retrieved facts) are
    neither all right nor all wrong by the task's own answer; a task without an answer is kept as is."""
    from tqdm import tqdm

    from .prompts import answer_messages

    out = []
    with_answer = [t for t in tasks if t.answer is not None]
    verdicts: dict[str, list[bool]] = {}
    for start in tqdm(range(0, len(with_answer), batch), desc="sampling answers", unit="batch",
                      disable=not progress):
        chunk = with_answer[start : start + batch]
        hits = index.search_batch([t.question for t in chunk], k=top_k)
        chats = [answer_messages(t.question, [h.passage for h in hs]) for t, hs in zip(chunk, hits)]
        groups = policy.sample(chats, k=k, max_new_tokens=max_new_tokens, temperature=temperature,
                               seed=seed + start)
        for t, g in zip(chunk, groups):
            verdicts[t.id] = [is_correct(c.text, t.answer, t.aliases) for c in g.completions]
    for t in tasks:
        right = verdicts.get(t.id)
        if right is not None and (all(right) or not any(right)):
            if report is not None:
                report.dropped["all right" if all(right) else "all wrong"] += 1
                report.kept -= 1
            continue
        out.append(t)
    return out


def labelled_groups(agent, tasks: Sequence[dict], k: int = 8, seed: int = 0, batch: int = 8, progress: bool = True,
                    ) -> tuple[list[dict], list, list, list[np.ndarray]]:
    """The agent's K sampled answers (its prompt and retrieval) to each task that carries an answer, each judged
    by that answer: (the tasks kept, their groups, scoring contexts, labels as boolean arrays). What calibrate
    and the verifier learn from."""
    from tqdm import tqdm

    tasks = [t for t in tasks if t.get("answer")]
    groups, contexts, labels = [], [], []
    for start in tqdm(range(0, len(tasks), batch), desc="sampling answers", unit="batch", disable=not progress):
        chunk = tasks[start : start + batch]
        sampled, ctx = agent.sample_groups([t["question"] for t in chunk], k=k, seed=seed + start)
        for t, g in zip(chunk, sampled):
            labels.append(np.array([is_correct(x.text, t["answer"], t.get("aliases", ())) for x in g.completions]))
        groups += sampled
        contexts += ctx
    return tasks, groups, contexts, labels


def held_out_passages(passages: Sequence[Passage], share: float, seed: int = 0) -> tuple[list[Passage], list[Passage]]:
    """(train, held out): a seeded `share` of the passages set aside, so gate tasks ask about passages no
    training task was made from."""
    if not 0 < share < 1:
        raise ValueError(f"eval share {share!r}: a share in (0, 1), e.g. 0.2")
    order = sorted(passages, key=lambda p: p.id)
    random.Random(seed).shuffle(order)
    n = max(1, round(len(order) * share))
    held = {p.id for p in order[:n]}
    return [p for p in passages if p.id not in held], [p for p in passages if p.id in held]


def tasks_from_index(index, eval_share: float = 0.2, per_passage: int = 2, seed: int = 0, progress: bool = True,
                     ) -> tuple[list[dict], list[dict], MakeReport]:
    """Training and gate tasks (as `read_tasks` returns them) made from the index's passages, the gate's from a
    held-out share of them."""
    train, held = held_out_passages(index.passages(), eval_share, seed)
    if not train:
        raise ValueError(f"the index holds {len(held)} passage(s): too few to hold some out for the gate")
    tasks, report = make_tasks(index, per_passage, seed, passages=train, progress=progress)
    eval_tasks, eval_report = make_tasks(index, 1, seed, passages=held, progress=progress)
    report.made, report.kept, report.passages = (report.made + eval_report.made, report.kept + eval_report.kept,
                                                 report.passages + eval_report.passages)
    report.dropped.update(eval_report.dropped)
    return [t.to_json() for t in tasks], [t.to_json() for t in eval_tasks], report


def write_tasks(tasks: Sequence[Task], path: str | Path) -> Path:
    """JSONL, one task a line, in the format `read_tasks` (and so `grpo-agent loop --tasks`) reads."""
    from .rundir import replacing

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        Path(tmp).write_text("".join(json.dumps(t.to_json(), ensure_ascii=False) + "\n" for t in tasks),
                             encoding="utf-8")
    return path
