"""Training-free GRPO: a library of lessons learned by comparing the answers of each group, no weight update.

After a group is scored, the model is shown its best and worst answers with their scores and the reasons
the scorers gave, and the lessons already in the library that bear on the question, and asked for one
operation on the library (the semantic counterpart of a group-relative advantage):

    ADD: <a short, general lesson>
    MODIFY <n>: <a better wording of lesson n>
    DELETE <n>
    KEEP

A model too small to follow that format (the bundled 135M one) is constrained (`constrained`, the default):
its operation is the most probable of the four words at the start of its reply, read from its next-token
distribution, and it then writes the rest of the line after that word. Code checks the operation before
applying it: the first line that parses is taken, a lesson must be a
sentence of reasonable length, `n` must name a lesson that was shown, an ADD too close to an existing lesson
is a duplicate (kept as is), and the library never grows past `max_lessons` (the lesson learned from the
fewest groups goes). Anything else is counted as malformed and skipped. Lessons live in the trajectory
store with the groups they came from; a flat FAISS index over their embeddings picks the top-m for each
new task's prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ExperienceError, GRPOAgentError
from .records import Group, Lesson
from .rundir import replacing
from .scoring import GroupScores, ScoreContext

LESSON_SYSTEM = (
    "You improve an assistant by writing short, general lessons from its good and bad answers. Reply with "
    "exactly one line in one of these forms:\nADD: <lesson>\nMODIFY <number>: <lesson>\nDELETE <number>\nKEEP"
)
LESSON_PROMPT = (
    "Question: {question}\n\nBest answer (score {best_score:.2f}): {best}\nWhy: {best_why}\n\n"
    "Worst answer (score {worst_score:.2f}): {worst}\nWhy: {worst_why}\n\n"
    "Current lessons:\n{lessons}\n\n"
    "What general lesson explains why the best answer is better? Add it, improve a current lesson, delete a "
    "wrong one, or keep the lessons as they are. One line."
)
OPERATIONS = ("ADD", "MODIFY", "DELETE", "KEEP")
_OP = re.compile(r"^\W*(ADD|MODIFY|DELETE|KEEP)\b\s*(\d+)?\s*[:.\-]?\s*(.*)$", re.IGNORECASE)



@dataclass
class Operation:
    """One parsed library operation: kind is add, modify, delete or keep; index is 1-based in the shown list."""

    kind: str
    index: int | None = None
    text: str = ""


def parse_operation(text: str) -> Operation | None:
    """The first line of the model's reply that is a well-formed operation, or None."""
    for line in text.strip().splitlines():
        m = _OP.match(line.strip())
        if not m:
            continue
        kind, index, rest = m.group(1).lower(), m.group(2), m.group(3).strip().strip('"')
        if kind == "keep":
            return Operation("keep")
        if kind == "add" and not index and _is_lesson(rest):
            return Operation("add", None, rest)
        if kind == "modify" and index and _is_lesson(rest):
            return Operation("modify", int(index), rest)
        if kind == "delete" and index and not rest:
            return Operation("delete", int(index))
        return None  # an operation keyword with the wrong shape: malformed, do not look further
    return None


def _is_lesson(text: str) -> bool:
    """A lesson is one or two sentences of words: 4 to 60 words, under 300 characters."""
    words = re.findall(r"[A-Za-z]+", text)
    return 4 <= len(words) <= 60 and len(text) <= 300


class ExperienceLibrary:
    """Lessons in the store, an embedding index over them, and learning from scored groups."""

    def __init__(self, store, embedder, policy=None, max_lessons: int = 32, top_m: int = 3,
                 shown: int = 5, duplicate_cosine: float = 0.9, max_new_tokens: int = 60, constrained: bool = True):
        self.store, self.embedder, self.policy = store, embedder, policy
        self.max_lessons, self.top_m, self.shown = max_lessons, top_m, shown
        self.duplicate_cosine, self.max_new_tokens = duplicate_cosine, max_new_tokens
        self.constrained = constrained  # pick the operation word from the model's probabilities (small models)
        self.stats: Counter[str] = Counter()  # add, modify, delete, keep, duplicate, evicted, malformed
        self._index = None  # (lesson ids, faiss index), rebuilt after every change

    # ----- reading -----------------------------------------------------------------------------------------
    def lessons(self) -> list[Lesson]:
        return self.store.lessons()

    def relevant(self, question: str, m: int | None = None) -> list[str]:
        """The texts of the m lessons most similar to the question (what goes into the prompt)."""
        hits = self._search(question, m or self.top_m)
        return [lesson.text for lesson, _ in hits]

    def _search(self, text: str, m: int) -> list[tuple[Lesson, float]]:
        lessons = self.store.lessons()
        if not lessons or m < 1:
            return []
        ids, index = self._ensure_index(lessons)
        query = self.embedder.encode([text])
        scores, rows = index.search(query, min(m, len(ids)))
        by_id = {x.lesson_id: x for x in lessons}
        return [(by_id[ids[r]], float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]

    def _ensure_index(self, lessons: list[Lesson]):
        import faiss

        ids = [x.lesson_id for x in lessons]
        key = [(x.lesson_id, x.text) for x in lessons]
        if self._index is None or self._index[0] != key:
            vectors = self.embedder.encode([x.text for x in lessons]).astype(np.float32)
            index = faiss.IndexFlatIP(vectors.shape[1])  # embeddings are normalised: inner product = cosine
            index.add(vectors)
            self._index = (key, index)
        return ids, self._index[1]

    # ----- learning ----------------------------------------------------------------------------------------
    def messages(self, group: Group, context: ScoreContext, scored: GroupScores,
                 shown: list[Lesson]) -> list[dict]:
        """The chat asking the model for one library operation on a scored group."""
        best, worst = scored.ranking[0], scored.ranking[-1]

        def why(i: int) -> str:
            return "; ".join(f"{name}: {reasons[i]}" for name, reasons in scored.explanations.items()) or "-"

        listing = "\n".join(f"{n}. {x.text}" for n, x in enumerate(shown, 1)) or "(none yet)"
        prompt = LESSON_PROMPT.format(
            question=context.question, best=group.completions[best].text[:600], best_why=why(best)[:400],
            best_score=scored.composite[best], worst=group.completions[worst].text[:600],
            worst_why=why(worst)[:400], worst_score=scored.composite[worst], lessons=listing)
        return [{"role": "system", "content": LESSON_SYSTEM}, {"role": "user", "content": prompt}]

    def learn(self, groups: Sequence[Group], contexts: Sequence[ScoreContext],
              scored: Sequence[GroupScores]) -> list[Operation | None]:
        """Ask the model for one operation per group (groups whose scores did not vary teach nothing), in one
        batched greedy call, and apply each that checks out. Returns the parsed operations (None: malformed
        or skipped)."""
        if self.policy is None:
            raise GRPOAgentError("learning lessons needs a model: give ExperienceLibrary a policy")
        todo = [i for i, (g, s) in enumerate(zip(groups, scored)) if not g.zero_variance and len(s.ranking) > 1]
        self.stats["skipped_flat"] += len(groups) - len(todo)
        if not todo:
            return [None] * len(groups)
        shown = {i: [x for x, _ in self._search(contexts[i].question, self.shown)] for i in todo}
        chats = [self.messages(groups[i], contexts[i], scored[i], shown[i]) for i in todo]
        texts = self._constrained(chats, [shown[i] for i in todo]) if self.constrained else [
            r.completions[0].text for r in
            self.policy.sample(chats, k=1, max_new_tokens=self.max_new_tokens, temperature=0.0)]
        ops: list[Operation | None] = [None] * len(groups)
        for i, text in zip(todo, texts):
            op = parse_operation(text)
            if op is None:
                self.stats["malformed"] += 1
            elif self.apply(op, shown[i], groups[i].group_id):
                ops[i] = op
        return ops

    def _constrained(self, chats: list[list[dict]], shown: list[list[Lesson]]) -> list[str]:
        """Operation lines for a model too small to follow the format: the operation is the model's most
        probable first word among ADD, MODIFY, DELETE and KEEP (MODIFY and DELETE only when lessons were
        shown), read from its next-token distribution; then the model writes the rest after that word."""
        tok = self.policy.tokenizer
        first = {kind: tok.encode(kind, add_special_tokens=False)[0] for kind in OPERATIONS}
        logp = self.policy.next_token_logprobs(chats)  # (B, V)
        kinds = []
        for row, lessons in zip(logp, shown):
            allowed = [k for k in OPERATIONS if lessons or k in ("ADD", "KEEP")]
            kinds.append(max(allowed, key=lambda k: float(row[first[k]])))
        texts = ["KEEP" if kind == "KEEP" else None for kind in kinds]
        for kind in ("ADD", "MODIFY", "DELETE"):
            rows = [i for i, x in enumerate(kinds) if x == kind]
            if not rows:
                continue
            prefix = "ADD:" if kind == "ADD" else kind  # no trailing space: the model's next token carries it
            length = 4 if kind == "DELETE" else self.max_new_tokens
            for i, g in zip(rows, self.policy.sample([chats[i] for i in rows], k=1, max_new_tokens=length,
                                                     temperature=0.0, prefix=prefix)):
                rest = g.completions[0].text.strip().splitlines()
                texts[i] = f"{prefix} {rest[0]}" if rest else prefix
        return texts

    def apply(self, op: Operation, shown: list[Lesson], group_id: str) -> bool:
        """Apply a parsed operation against the lessons that were shown; False (counted) when it does not check out."""
        if op.kind in ("modify", "delete") and not 1 <= (op.index or 0) <= len(shown):
            self.stats["malformed"] += 1
            return False
        if op.kind == "keep":
            self.stats["keep"] += 1
        elif op.kind == "delete":
            self.store.delete_lesson(shown[op.index - 1].lesson_id)
            self.stats["delete"] += 1
        elif op.kind == "modify":
            target = shown[op.index - 1]
            self.store.put_lesson(target.lesson_id, op.text, [*target.origin_groups, group_id])
            self.stats["modify"] += 1
        else:  # add
            near = self._search(op.text, 1)
            if near and near[0][1] >= self.duplicate_cosine:
                self.stats["duplicate"] += 1
                return True
            self.store.put_lesson(uuid.uuid4().hex[:12], op.text, [group_id])
            self.stats["add"] += 1
            self._evict()
        return True

    def _evict(self) -> None:
        """Keep at most max_lessons: drop the lessons learned from the fewest groups, oldest first."""
        lessons = self.store.lessons()
        extra = len(lessons) - self.max_lessons
        for lesson in sorted(lessons, key=lambda x: (len(x.origin_groups), x.updated))[: max(extra, 0)]:
            self.store.delete_lesson(lesson.lesson_id)
            self.stats["evicted"] += 1

    # ----- files -------------------------------------------------------------------------------------------
    def export(self, path: str | Path) -> Path:
        """Write the library as JSON (.json) or Markdown (.md), both editable and loadable with `load`; the file
        is replaced whole."""
        path = Path(path)
        lessons = self.store.lessons()
        if path.suffix == ".md":
            lines = ["# Lessons", "", "One lesson per bullet; edit freely and load back with "
                     "`grpo-agent lessons load`.", ""]
            lines += [f"- {x.text} <!-- {x.lesson_id} from {len(x.origin_groups)} group(s) -->" for x in lessons]
            text = "\n".join(lines) + "\n"
        else:
            text = json.dumps({"lessons": [asdict(x) for x in lessons]}, indent=1) + "\n"
        with replacing(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path

    def load(self, path: str | Path) -> int:
        """Replace the library with the lessons of a file written by `export` (and perhaps edited)."""
        path = Path(path)
        if not path.is_file():
            raise ExperienceError(f"lesson file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".md":
            lessons = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.startswith("- "):
                    continue
                m = re.match(r"- (.*?)\s*(?:<!-- (\w+) from \d+ group\(s\) -->)?\s*$", line)
                lessons.append(Lesson(m.group(2) if m and m.group(2) else uuid.uuid4().hex[:12],
                                      m.group(1) if m else line[2:].strip()))
        else:
            try:
                lessons = json.loads(text)["lessons"]
                lessons = [Lesson(str(x.get("lesson_id") or uuid.uuid4().hex[:12]), str(x["text"]),
                                  list(x.get("origin_groups", []))) for x in lessons]
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ExperienceError(f"{path} is not a lesson file ({e!r}): expected {{\"lessons\": [{{\"text\": ...}}]}}") from e
        empty = [x for x in lessons if not x.text.strip()]
        if empty:
            raise ExperienceError(f"{path}: {len(empty)} lesson(s) have no text; remove them or write the lesson")
        self.store.replace_lessons(lessons)
        return len(lessons)
