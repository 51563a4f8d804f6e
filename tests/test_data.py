"""The bundled conservation corpus and question sets are complete and consistent."""

import json
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data" / "conservation"
TOPICS = {"status", "range", "population", "threats", "helps", "harms", "ecology", "practice"}


def read(name):
    with (DATA / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def norm(text):
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def passages():
    return {p["id"]: p for p in read("passages.jsonl")}


def test_passages(passages):
    rows = read("passages.jsonl")
    assert len(rows) >= 300 and len(passages) == len(rows)  # ids unique
    texts = set()
    for p in rows:
        assert set(p) == {"id", "text", "source", "metadata"}
        assert 10 <= len(p["text"].split()) <= 90, p["id"]
        assert p["source"].strip(), f"{p['id']} needs a source citation"
        assert p["metadata"]["topic"] in TOPICS, p["id"]
        assert norm(p["text"]) not in texts, f"{p['id']} duplicates another passage"
        texts.add(norm(p["text"]))


def test_train_questions_have_no_answers():
    rows = read("train_questions.jsonl")
    assert len(rows) >= 300
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"id", "question"} and r["question"].strip().endswith("?"), r


def test_eval_questions_are_supported_and_held_out(passages):
    rows = read("eval.jsonl")
    assert len(rows) >= 120 and len({r["id"] for r in rows}) == len(rows)
    train = {norm(r["question"]) for r in read("train_questions.jsonl")}
    for r in rows:
        assert set(r) == {"id", "question", "answer", "aliases", "passage_id"}
        assert r["passage_id"] in passages, f"{r['id']}: unknown passage {r['passage_id']}"
        assert 1 <= len(r["answer"].split()) <= 6, r["id"]
        text = passages[r["passage_id"]]["text"].lower()
        assert any(a.lower() in text for a in [r["answer"], *r["aliases"]]), f"{r['id']}: answer not in passage"
        assert norm(r["question"]) not in train, f"{r['id']} is also a training question"


def rule_species() -> list[str]:
    import tomllib

    rules = DATA.parent.parent / "grpo_agent" / "scoring" / "rules" / "conservation.toml"
    return [w.lower() for w in tomllib.loads(rules.read_text())["species"]]


def test_harm_probes():
    rows = read("harm_probe.jsonl")
    assert len(rows) >= 60 and len({r["id"] for r in rows}) == len(rows)
    species = rule_species()
    for r in rows:
        assert set(r) == {"id", "request", "species", "harm", "split"}
        assert r["request"].strip() and r["species"].strip() and r["harm"].strip()
        named = any(w in r["species"].lower() or w in r["request"].lower() for w in species)
        assert r["split"] == ("dev" if named else "heldout"), r["id"]  # held out: no species the rules name
    assert sum(r["split"] == "heldout" for r in rows) >= 30


def test_benign_lookalikes_share_the_split_rule():
    rows = read("benign_lookalikes.jsonl")
    assert len(rows) >= 80 and len({r["id"] for r in rows}) == len(rows)
    species = rule_species()
    for r in rows:
        assert set(r) == {"id", "request", "species", "category", "looks_like", "split"}
        if r["split"] == "heldout":
            assert not any(w in r["species"].lower() or w in r["request"].lower() for w in species), r["id"]
        else:
            assert r["split"] == "dev" and any(w in r["species"].lower() for w in species), r["id"]
    assert min(sum(r["split"] == s for r in rows) for s in ("dev", "heldout")) >= 40


def test_labelled_harm_answers():
    rows = read("harm_answers_labelled.jsonl")
    probes = {r["id"] for r in read("harm_probe.jsonl")}
    assert len(rows) >= 100
    for r in rows:
        assert set(r) == {"id", "request", "species", "harm", "answer", "harmful", "reason"}
        assert r["id"] in probes and isinstance(r["harmful"], bool) and r["reason"].strip()
    assert 0.2 < sum(r["harmful"] for r in rows) / len(rows) < 0.8  # both kinds, to measure recall and false flags


def test_the_other_domain_set_is_supported_and_apart_from_conservation():
    other = DATA.parent / "astronomy"
    passages = {p["id"]: p for p in map(json.loads, (other / "passages.jsonl").read_text().splitlines())}
    rows = [json.loads(line) for line in (other / "eval.jsonl").read_text().splitlines() if line.strip()]
    assert len(passages) >= 60 and len(rows) >= 40 and len({r["id"] for r in rows}) == len(rows)
    conservation = {norm(p["text"]) for p in read("passages.jsonl")}
    for p in passages.values():
        assert set(p) == {"id", "text", "source", "metadata"} and p["source"].strip(), p["id"]
        assert norm(p["text"]) not in conservation, p["id"]
    for r in rows:
        assert set(r) == {"id", "question", "answer", "aliases", "passage_id"}
        assert r["answer"].lower() in passages[r["passage_id"]]["text"].lower(), f"{r['id']}: answer not in passage"
        assert f" {norm(r['answer'])} " not in f" {norm(r['question'])} ", f"{r['id']}: the question gives the answer away"
