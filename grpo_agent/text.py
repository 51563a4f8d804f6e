"""Plain-text helpers shared by ingestion, scoring and evaluation: sentences, number words, repetition."""

from __future__ import annotations

import re

# A sentence ends at . ! or ? (optionally closed by a quote or bracket) followed by space.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_PARAGRAPH = re.compile(r"\n\s*\n")

NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15,
    "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40,
    "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100,
}


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`; paragraph breaks and Markdown headings always end a sentence."""
    sentences = []
    for para in _PARAGRAPH.split(text):
        para = " ".join(para.split())
        if para:
            sentences.extend(s.strip() for s in _SENTENCE_END.split(para) if s.strip())
    return sentences


def repetition(text: str, n: int = 3) -> float:
    """Fraction of the word n-grams of `text` that repeat an earlier one (0: none)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)
