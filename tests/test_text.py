import pytest

from grpo_agent.text import NUMBER_WORDS, repetition, split_sentences


def test_split_sentences_ends_at_punctuation_and_paragraphs():
    text = "Pangolins are trafficked. Why? For their scales! (Mostly.)\n\nA new paragraph\nkeeps its line"
    assert split_sentences(text) == ["Pangolins are trafficked.", "Why?", "For their scales!", "(Mostly.)",
                                     "A new paragraph keeps its line"]
    assert split_sentences("About 4.5 million remain.") == ["About 4.5 million remain."]  # no space: no break
    assert split_sentences("  \n\n ") == []


def test_number_words_map_to_their_values():
    assert NUMBER_WORDS["ten"] == 10 and NUMBER_WORDS["ninety"] == 90 and NUMBER_WORDS["hundred"] == 100
    assert "thousand" not in NUMBER_WORDS


def test_repetition_is_the_share_of_repeated_word_trigrams():
    assert repetition("the snow leopard lives in the mountains") == 0.0
    assert repetition("a b c a b c a b c") == pytest.approx(1 - 3 / 7)  # 7 trigrams, 3 distinct
    assert repetition("Too short") == 0.0
    assert repetition("A B C a b c", n=3) == pytest.approx(1 - 3 / 4)  # case does not matter
