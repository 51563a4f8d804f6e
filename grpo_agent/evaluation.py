"""Gold-answer checks for evaluation (never used as a training signal by the label-free loop)."""

from __future__ import annotations

import re
from typing import Iterable

from .scoring.claims import _WORD_NUMBERS


def normalise(text: str) -> str:
    """Lower-case words with punctuation removed, thousands separators dropped and number words as digits."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text.lower())
    words = re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.replace("-", " "))
    return " ".join(str(_WORD_NUMBERS.get(w, w)) for w in words)


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
