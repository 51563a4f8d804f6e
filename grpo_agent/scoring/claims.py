"""Text pieces the scorers compare: claims (sentences), the numbers and names a claim states, final answers."""

from __future__ import annotations

import re

from ..text import NUMBER_WORDS, split_sentences

_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)(?![\w])")
# Capitalised words that are not names when they start a clause or are common sentence openers.
_NOT_NAMES = {
    "i", "a", "an", "the", "this", "that", "these", "those", "it", "its", "they", "their", "there", "here", "he",
    "she", "we", "you", "your", "yes", "no", "however", "also", "in", "on", "at", "as", "by", "for", "from", "of",
    "to", "and", "but", "or", "if", "when", "while", "because", "so", "some", "many", "most", "all", "each",
    "both", "one", "other", "overall", "additionally", "furthermore", "moreover", "finally", "first", "second",
}
_NAME = re.compile(r"\b[A-Z][a-zA-Z'\-]+(?:\s+[A-Z][a-zA-Z'\-]+)*")


def split_claims(text: str, min_words: int = 3) -> list[str]:
    """The sentences of an answer that state something (at least `min_words` words)."""
    return [s for s in split_sentences(text) if len(s.split()) >= min_words]


def numbers(text: str) -> set[str]:
    """Numbers stated in `text`, normalised ("1,600" -> "1600", "ten" -> "10")."""
    found = {m.group(1).replace(",", "") for m in _NUMBER.finditer(text)}
    found |= {str(NUMBER_WORDS[w]) for w in re.findall(r"[a-z]+", text.lower()) if w in NUMBER_WORDS and w != "one"}
    return {n[:-2] if n.endswith(".0") else n for n in found}


def names(text: str) -> set[str]:
    """Capitalised names in `text` (lower-cased), leaving out a sentence's first word and common openers."""
    out: set[str] = set()
    for sentence in split_sentences(text):
        for m in _NAME.finditer(sentence):
            words = m.group(0).split()
            if m.start() == 0 or sentence[: m.start()].rstrip().endswith((":", "-", "(", '"')):
                words = words[1:]  # a sentence's first word is capitalised anyway
            words = [w for w in words if w.lower() not in _NOT_NAMES]
            if words:
                out.add(" ".join(words).lower())
    return out


_STOPWORDS = set(
    "that this with from have which their they there been were what when where will would could should about "
    "into than then them these those also such because while more most many much very only other some over "
    "under after before being does doing just like make made your yours ours".split()
)


def content_stems(text: str) -> list[str]:
    """Content words (3+ characters, numbers included, common function words left out), cut to a 5-character
    stem so that "poaching" and "poached" meet."""
    return [w[:5] for w in re.findall(r"[a-z0-9][a-z0-9'\-]{2,}", text.lower()) if w not in _STOPWORDS]


def final_answer(text: str) -> str | None:
    """A short final answer to vote on, when one can be extracted: yes/no, a short span, or a number."""
    words = re.findall(r"[a-z0-9][a-z0-9'\-.]*", text.lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    if len(words) <= 5:  # the whole answer is a short span
        return " ".join(w for w in words if w not in ("the", "a", "an")).strip(".")
    claims = split_sentences(text)
    first = numbers(claims[0]) if claims else set()
    return f"#{sorted(first)[0]}" if len(first) == 1 else None
