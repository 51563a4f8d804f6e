"""Tasks made from a corpus: spans, echo questions and clozes, the filters, the CLI, and the loop reading them."""

import json

import pytest

from grpo_agent.cli import main
from grpo_agent.evaluation import is_correct, read_tasks
from grpo_agent.records import Passage
from grpo_agent.retrieval import FactIndex
from grpo_agent.tasks import (BLANK, answer_in_question, make_tasks, mixed_only, questions_from_sentence, spans,
                              write_tasks)

PASSAGES = [
    Passage("tig-1", "The tiger is listed as Endangered on the IUCN Red List. India holds about 3,600 wild tigers, "
            "roughly three-quarters of the world's wild tigers."),
    Passage("sea-1", "Sea otters were hunted almost to extinction for their fur, and an international treaty in 1911 "
            "protected sea otters from commercial hunting."),
    Passage("vaq-1", "The vaquita lives only in the northern Gulf of California in Mexico. Fewer than 20 vaquitas "
            "remain, most drowned in gillnets set for totoaba."),
    Passage("kak-1", "The kakapo is a flightless, nocturnal parrot found only in New Zealand. It breeds only in years "
            "when rimu trees produce heavy crops of fruit."),
]


@pytest.fixture(scope="module")
def index(embedder):
    return FactIndex.build(PASSAGES, embedder)


def test_spans_are_the_names_numbers_and_years_a_sentence_states():
    found = dict(spans("India holds about 3,600 wild tigers, and a treaty in 1911 protected Sea Otters in Alaska."))
    assert found["1911"] == "which year" and found["3,600"] == "how many wild"  # "about how many wild tigers"
    assert found["Alaska"] == "what" and "India" not in found  # the sentence's first word is not taken as a name
    assert dict(spans("About 40% of the reef was bleached."))["40%"] == "what percentage"


def test_half_a_noun_phrase_is_never_the_answer_and_a_wh_sentence_gets_no_echo_question():
    assert spans("Poaching threatens African savanna elephants across their range today.") == []
    assert "Panthera" not in dict(spans("The tiger (Panthera tigris) is listed as Endangered on the IUCN Red List."))
    assert "Kemp" not in dict(spans("The Kemp's ridley turtle is listed as Critically Endangered by the IUCN."))
    made = questions_from_sentence("Studies show that what was called one species lives in Hunan and Guizhou.")
    assert made and {kind for kind, _, _ in made} == {"cloze"}


def test_a_sentence_becomes_an_echo_question_and_a_cloze_that_ask_for_the_span():
    made = questions_from_sentence("An international treaty in 1911 protected sea otters from commercial hunting.")
    assert ("wh", "An international treaty in which year protected sea otters from commercial hunting?", "1911") in made
    assert ("cloze", f"Fill in the blank: An international treaty in {BLANK} protected sea otters from commercial "
            "hunting.", "1911") in made
    assert questions_from_sentence("It breeds only in years when rimu trees produce heavy crops of fruit in 2019.") == []
    assert questions_from_sentence("Too short in 1911.") == []


def test_an_answer_that_the_question_states_gives_itself_away():
    assert answer_in_question("Which treaty of 1911 protected sea otters in 1911?", "1911")
    assert not answer_in_question("Which year protected sea otters?", "1911")


def test_made_tasks_keep_their_source_pass_the_filters_and_count_what_was_dropped(index):
    tasks, report = make_tasks(index, per_passage=2, seed=0, progress=False)
    assert tasks and report.kept == len(tasks) and report.made == report.kept + sum(report.dropped.values())
    ids = {p.id for p in PASSAGES}
    for t in tasks:
        assert t.passage_id in ids and t.answer and not answer_in_question(t.question, t.answer)
        assert t.passage_id in {h.passage.id for h in index.search(t.question, 3)}  # retrieval finds its source
        assert is_correct(index.get(t.passage_id).text, t.answer)  # the answer is what the passage states
    assert max(sum(t.passage_id == i for t in tasks) for i in ids) <= 2
    again, _ = make_tasks(index, per_passage=2, seed=0, progress=False)
    assert [t.question for t in again] == [t.question for t in tasks]  # seeded
    first, first_report = make_tasks(index, per_passage=2, seed=0, limit=2, progress=False)
    assert [t.question for t in first] == [t.question for t in tasks[: len(first)]] and len(first) >= 2
    assert first_report.passages < len(PASSAGES)  # it stopped once enough were kept
    strict, strict_report = make_tasks(index, per_passage=2, seed=0, max_similarity=0.0, progress=False)
    assert len(strict) == 1 and strict_report.dropped["near-duplicate"] > 0  # every later one is "similar"


def test_the_policy_proposes_a_question_and_mixed_only_drops_all_right_or_all_wrong(tiny_policy, index):
    tasks, _ = make_tasks(index, per_passage=1, seed=0, policy=tiny_policy, progress=False)
    assert all(t.answer is None and t.reference for t in tasks if t.kind == "proposed")
    kept = mixed_only(tasks, tiny_policy, index, k=2, max_new_tokens=4, progress=False)
    assert all(t.kind == "proposed" for t in kept)  # the tiny model never says a span: every task "all wrong"


def test_grpo_agent_tasks_writes_a_file_the_loop_reads(embedder, index, tmp_path, capsys):
    directory = tmp_path / "facts"
    index.save(directory)
    out = tmp_path / "tasks.jsonl"
    assert main(["tasks", "--index", str(directory), "--out", str(out), "--quiet"]) == 0
    assert "kept" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    read = read_tasks(out)
    assert len(read) == len(rows) > 0 and all(r["answer"] and r["passage_id"] for r in read)
    assert main(["tasks", "--index", str(tmp_path / "none"), "--out", str(out)]) == 1
    assert main(["tasks", "--index", str(directory), "--out", str(out), "--per-passage", "0"]) == 1
    write_tasks([], tmp_path / "empty.jsonl")  # an empty list writes an empty file, nothing half-written
    assert (tmp_path / "empty.jsonl").read_text() == ""


def test_the_loop_runs_on_tasks_made_from_the_index(tiny_model_dir, embedder, tmp_path, capsys):
    from grpo_agent.store import TrajectoryStore

    directory = tmp_path / "facts"  # short passages: the tiny model's context is 512 characters
    FactIndex.build([Passage(f"p{i}", text) for i, text in enumerate([
        "A treaty signed in 1911 protected sea otters.", "Fewer than 20 vaquitas remain in Mexico.",
        "The kakapo is a parrot found only in New Zealand.", "India holds about 3,600 wild tigers today."])],
        embedder).save(directory)
    agent = ["--model", str(tiny_model_dir), "--index", str(directory), "-k", "2", "--max-new-tokens", "4",
             "--seed", "0"]
    run = tmp_path / "run"
    loop = ["loop", "--rounds", "1", "--run", str(run), "--tasks-per-round", "2", "--margin", "1", *agent]
    assert main([*loop, "--tasks-from-index", "--eval-share", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "tasks from the index" in out and "round 1: 2 groups" in out
    with TrajectoryStore(run / "store.sqlite") as store:
        groups = store.groups(source="loop")
    logged = {g.info.task_id for g in groups}
    assert logged and all(t.startswith("task-p") for t in logged)  # the corpus-made tasks were collected
    assert all(g.info.meta.get("reference") for g in groups)  # with their corpus answers, for answer_match
    assert main(loop) == 1 and "--tasks-from-index" in capsys.readouterr().err  # neither tasks nor the index
    assert main([*loop, "--tasks-from-index", "--eval-share", "1.5"]) == 1
    assert "eval share" in capsys.readouterr().err


def test_answer_match_scores_a_corpus_task_and_sits_out_a_users_question(embedder):
    from grpo_agent.records import Completion, Group
    from grpo_agent.scoring import ScoreContext, SelfScorer, make_scorer
    from grpo_agent.tasks import corpus_answer

    group = Group(messages=[], prompt_token_ids=[1], completions=[
        Completion(t, [1], [0.0], "stop") for t in ("The treaty was signed in 1911.", "It was in 1920.")])
    match = make_scorer("answer_match")
    scored = match.score(group, ScoreContext("A treaty in which year protected sea otters?", [], "1911"))
    assert scored.scores == [1.0, 0.0] and scored.applicable
    scorer = SelfScorer([match, make_scorer("consistency", embedder=embedder)], {"answer_match": 1.0, "consistency": 0.5})
    with_ref, _ = scorer.score_group(group, ScoreContext("q", [], "1911"))
    without, _ = scorer.score_group(group, ScoreContext("q", []))
    assert with_ref.composite[0] > with_ref.composite[1] and "answer_match" in with_ref.signals
    assert "answer_match" not in without.signals and not without.problems  # left out quietly, not an error
    assert corpus_answer({"answer": "1911", "origin": "corpus"}) == "1911"
    assert corpus_answer({"answer": "Vulnerable"}) is None  # a hand-written gold answer is a label: never scored


def test_calibrate_picks_the_weights_that_rank_right_answers_first():
    import numpy as np

    from grpo_agent.calibrate import fit_weights
    from grpo_agent.scoring import ScoreResult

    rng = np.random.default_rng(0)
    labels = [np.array([True, False, False, True]) for _ in range(6)]
    telling = {"good": [ScoreResult("good", [0.9, 0.2, 0.1, 0.8], [""] * 4) for _ in labels],
               "noise": [ScoreResult("noise", list(rng.random(4)), [""] * 4) for _ in labels]}
    weights, m = fit_weights(telling, labels)
    assert weights["good"] > 0 and weights["noise"] < weights["good"] and m["pairwise"] > 0.9 and m["best_of_k"] == 1.0


def test_write_weights_sets_the_scoring_table_and_keeps_the_rest(tmp_path):
    from grpo_agent.calibrate import write_weights
    from grpo_agent.config import config_template, load_config
    from grpo_agent.errors import ConfigError

    path = tmp_path / "grpo-agent.toml"
    path.write_text(config_template())
    write_weights(path, {"grounding": 0.5, "consistency": 1.0})
    cfg = load_config(path)
    assert cfg.scoring.weights["grounding"] == 0.5 and cfg.scoring.weights["consistency"] == 1.0
    assert cfg.scoring.weights["answer_match"] == 0.0 and cfg.sampling.k == 8  # the rest untouched
    bare = tmp_path / "bare.toml"
    bare.write_text('[sampling]\nk = 4\n')
    write_weights(bare, {"grounding": 0.25})
    assert load_config(bare).scoring.weights["grounding"] == 0.25 and load_config(bare).sampling.k == 4
    with pytest.raises(ConfigError, match="grpo-agent init"):
        write_weights(tmp_path / "missing.toml", {"grounding": 1.0})
    before = path.read_text()
    with pytest.raises(ConfigError):
        write_weights(path, {"grounding": 0.0, "consistency": 0.0, "education": 0.0, "reasoning": 0.0})
    assert path.read_text() == before  # a write that would not load leaves the file as it was


def test_grpo_agent_calibrate_writes_weights_fitted_on_corpus_tasks(tiny_model_dir, embedder, tmp_path, capsys):
    from grpo_agent.config import config_template, load_config

    directory = tmp_path / "facts"
    FactIndex.build([Passage(f"p{i}", text) for i, text in enumerate([
        "A treaty signed in 1911 protected sea otters.", "Fewer than 20 vaquitas remain in Mexico.",
        "The kakapo is a parrot found only in New Zealand.", "India holds about 3,600 wild tigers today."])],
        embedder).save(directory)
    config = tmp_path / "grpo-agent.toml"
    config.write_text(config_template())
    args = ["calibrate", "--config", str(config), "--model", str(tiny_model_dir), "--index", str(directory), "-k", "2",
            "--max-new-tokens", "4", "--tasks", "3"]
    assert main(args) == 0
    assert "corpus tasks" in capsys.readouterr().out and "set by grpo-agent calibrate" in config.read_text()
    assert set(load_config(config).scoring.weights) >= {"grounding", "consistency", "education"}
    assert main([*args[:1], "--model", str(tiny_model_dir), "--tasks", "3"]) == 1  # no index to make tasks from


def test_a_passages_candidates_alternate_kinds_and_keep_every_one_once():
    import random

    from grpo_agent.tasks import code_tasks

    text = ("A treaty signed in 1911 protected sea otters along the coast. Studies show what was called one "
            "species was first named in 1880. Fewer than 20 vaquitas remain in the Gulf today.")
    made = code_tasks(Passage("p", text), per_passage=10, rng=random.Random(0))
    every = [(k, q, a) for s in text.split(". ") for k, q, a in questions_from_sentence(s.rstrip(".") + ".")]
    assert sorted(t.question for t in made) == sorted(q for _, q, _ in every)  # none lost, none twice
    assert made[0].kind == "wh" and made[1].kind == "cloze"
