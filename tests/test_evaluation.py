from grpo_agent.evaluation import is_correct, normalise


def test_normalise():
    assert normalise("About 4,000 Snow-Leopards; ten reserves.") == "about 4000 snow leopards 10 reserves"


def test_is_correct_matches_whole_phrases_and_aliases():
    assert is_correct("The IUCN lists it as Vulnerable.", "Vulnerable")
    assert is_correct("Only about ten remain.", "10")
    assert is_correct("Roughly 1,600 seals.", "1600")
    assert not is_correct("It is Critically Endangered.", "Endangered")
    assert is_correct("It is Critically Endangered.", "Critically Endangered")
    assert not is_correct("It is not vulnerable.", "Vulnerable")
    assert is_correct("Not threatened by trade; it is Vulnerable.", "Vulnerable")
    assert not is_correct("There are 100 left.", "10")
    assert is_correct("It lives in Gir National Park.", "Gujarat", aliases=["Gir National Park"])
    assert is_correct("Yes, it is listed.", "yes") and not is_correct("It is not, no.", "yes")
    assert not is_correct("No idea, but yes maybe", "yes")
