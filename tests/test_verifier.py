"""The verifier learned from corpus tasks: it learns from labelled answers, round-trips through safetensors, is
a scoring signal, and `grpo-agent verifier` trains one from an index."""

import random

import numpy as np
import pytest

from grpo_agent.calibrate import metrics
from grpo_agent.cli import main
from grpo_agent.config import ScoringConfig
from grpo_agent.errors import ConfigError
from grpo_agent.records import Completion, Group, Passage
from grpo_agent.retrieval import FactIndex
from grpo_agent.scoring import ScoreContext, build_self_scorer
from grpo_agent.verifier import Example, Verifier, VerifierError, read_examples, write_examples

FACTS = [("vaquita", "Mexico"), ("kakapo", "New Zealand"), ("tiger", "India"), ("sea otter", "California"),
         ("okapi", "Congo"), ("orangutan", "Borneo"), ("lemur", "Madagascar"), ("kiwi", "New Zealand"),
         ("snow leopard", "Nepal"), ("saola", "Laos"), ("axolotl", "Mexico"), ("tuatara", "New Zealand")]
PLACES = sorted({p for _, p in FACTS})


def toy_examples(seed: int, pairs=FACTS) -> list[Example]:
    """Answers that name the place the fact states (right) or another place (wrong), in varied wordings."""
    rng = random.Random(seed)
    out = []
    for animal, place in pairs:
        question, facts = f"Where does the {animal} live?", [f"The {animal} lives only in {place}."]
        for wrong in rng.sample([p for p in PLACES if p != place], 2):
            out.append(Example(question, facts, f"The {animal} lives in {place}.", True))
            out.append(Example(question, facts, f"The {animal} lives in {wrong}.", False))
    return out


@pytest.fixture(scope="module")
def trained():
    verifier = Verifier.untrained()
    examples = toy_examples(0, FACTS[:8]) + toy_examples(5, FACTS[:8])
    losses = verifier.fit(examples, epochs=10, lr=1e-4, batch_size=8, progress=False)
    return verifier, losses


def test_the_verifier_learns_which_answers_state_the_fact(trained):
    verifier, losses = trained
    assert losses[-1] < losses[0]
    test = toy_examples(1, FACTS[8:])  # animals it was not trained on
    by_q: dict[str, list] = {}
    for e in test:
        by_q.setdefault(e.question, []).append(e)
    scores = [np.array(verifier.score(q, es[0].facts, [e.answer for e in es])) for q, es in by_q.items()]
    labels = [np.array([e.label for e in es]) for es in by_q.values()]
    assert metrics(scores, labels)["auroc"] >= 0.8


def test_a_saved_verifier_scores_the_same_and_loads_nothing_unsafe(trained, tmp_path):
    verifier, _ = trained
    path = verifier.save(tmp_path / "verifier")
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    again = Verifier.load(path)
    args = ("Where does the okapi live?", ["The okapi lives only in Congo."], ["In Congo.", "In Laos."])
    assert np.allclose(again.score(*args), verifier.score(*args), atol=1e-5)
    assert again.meta["epochs"] == 10
    with pytest.raises(VerifierError, match="grpo-agent verifier"):
        Verifier.load(tmp_path)  # not a verifier directory
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(VerifierError, match="safetensors"):
        Verifier.load(path)  # pickled weights are never read


def test_training_needs_right_and_wrong_answers():
    with pytest.raises(VerifierError, match="both"):
        Verifier.untrained().fit([e for e in toy_examples(0) if e.label], progress=False)


def test_the_verifier_is_a_signal_and_its_absence_names_the_fix(trained):
    verifier, _ = trained
    cfg = ScoringConfig(weights={"verifier": 1.0}, gates=[])
    with pytest.raises(ConfigError, match="grpo-agent verifier"):
        build_self_scorer(cfg)
    scorer = build_self_scorer(cfg, verifier=verifier)
    group = Group(messages=[{"role": "user", "content": "Where does the okapi live?"}], prompt_token_ids=[1, 2],
                  completions=[Completion(text=t, token_ids=[5], logprobs=[-0.1], finish_reason="stop")
                               for t in ("The okapi lives in Laos.", "The okapi lives in Congo.")])
    scorer.score_groups([group], [ScoreContext("Where does the okapi live?",
                                               [Passage("p", "The okapi lives only in Congo.")])])
    assert group.completions[1].composite > group.completions[0].composite
    assert group.completions[1].advantage > 0 > group.completions[0].advantage


def test_grpo_agent_verifier_trains_from_an_index(tiny_model_dir, embedder, tmp_path, capsys):
    directory = tmp_path / "facts"
    FactIndex.build([Passage(f"p{i}", f"The {a} lives only in {p}, where about {10 + i} wild ones remain.")
                     for i, (a, p) in enumerate(FACTS)], embedder).save(directory)
    examples = tmp_path / "answers.jsonl"
    args = ["verifier", "--model", str(tiny_model_dir), "--index", str(directory), "-k", "2", "--max-new-tokens", "4",
            "--tasks", "6", "--epochs", "1", "--examples", str(examples)]
    # the tiny random policy's answers are all wrong: nothing to learn from, and nothing is written
    assert main([*args, "--out", str(tmp_path / "v0")]) == 1
    err = capsys.readouterr().err
    assert "both" in err and str(examples) in err and not (tmp_path / "v0" / "verifier.json").exists()
    sampled = read_examples(examples)
    assert len(sampled) == 12 and {e.question for e in sampled}
    write_examples(examples, toy_examples(0))  # labelled answers from a file: no sampling
    assert main([*args, "--out", str(tmp_path / "v1")]) == 0
    out = capsys.readouterr().out
    assert "no sampling" in out and "held out" in out and "scoring.verifier" in out
    assert Verifier.load(tmp_path / "v1").meta["tasks"] == len(FACTS)
    assert main([*args, "--out", str(tmp_path / "v1")]) == 1  # never overwrites a verifier
