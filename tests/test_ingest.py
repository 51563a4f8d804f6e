import json
from pathlib import Path

import pytest

from grpo_agent.cli import main
from grpo_agent.ingest import find_files, ingest, read_passages, split_passages
from grpo_agent.retrieval import FactIndex, RetrievalError
from grpo_agent.text import split_sentences

DATA = Path(__file__).resolve().parent.parent / "data" / "conservation"

ARTICLE = """# Pangolins

Pangolins are scaly mammals that eat ants and termites. All eight species are threatened by trafficking.
Their scales are made of keratin, like human fingernails!

Buying pangolin scale products fuels poaching. Is there a legal trade? No: CITES lists all eight species on
Appendix I. Rescue centres rehabilitate confiscated pangolins and release them.
"""


def test_split_sentences_respects_paragraphs_and_punctuation():
    sentences = split_sentences(ARTICLE)
    assert sentences[0] == "# Pangolins"
    assert "Their scales are made of keratin, like human fingernails!" in sentences
    assert "Is there a legal trade?" in sentences
    assert "No: CITES lists all eight species on Appendix I." in sentences  # line break inside a sentence


def test_split_passages_keeps_whole_sentences_within_size_with_overlap():
    chunks = split_passages(ARTICLE, size=120, overlap=60)
    sentences = split_sentences(ARTICLE)
    assert len(chunks) > 2
    for chunk in chunks:
        assert len(chunk) <= 120 or chunk in sentences  # only a lone long sentence may exceed the size
        assert all(s in sentences for s in _sentences_of(chunk, sentences))
    # consecutive chunks share a trailing sentence when it fits in the overlap
    assert any(set(_sentences_of(a, sentences)) & set(_sentences_of(b, sentences)) for a, b in zip(chunks, chunks[1:]))
    assert split_passages(ARTICLE, size=10_000, overlap=0) == [" ".join(sentences)]
    with pytest.raises(RetrievalError, match="overlap"):
        split_passages(ARTICLE, size=100, overlap=100)


def _sentences_of(chunk, sentences):
    return [s for s in sentences if s in chunk]


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "notes").mkdir(parents=True)
    (root / "pangolins.md").write_text(ARTICLE)
    (root / "notes" / "tigers.txt").write_text(
        "Tigers need large connected forests. Poaching for skins and bones threatens them.\n\n"
        "Camera traps help count tigers."
    )
    (root / "notes" / "skip.pdf").write_bytes(b"%PDF not ingested")
    (root / "facts.jsonl").write_text(
        json.dumps({"id": "vulture-1", "text": "Diclofenac poisoned South Asian vultures.", "source": "BirdLife 2021",
                    "metadata": {"species": "vultures"}}) + "\n\n"
        + json.dumps({"text": "Coral reefs bleach in warm water."}) + "\n"
        + json.dumps({"id": "dup", "text": "Coral reefs  bleach in warm water."}) + "\n"
    )
    (root / "facts.csv").write_text('id,text,source\nkakapo-1,"The kakapo is a flightless parrot of New Zealand.",DOC\n')
    return root


def test_find_files_recurses_and_filters(corpus):
    names = [p.name for p in find_files([corpus])]
    assert sorted(names) == ["facts.csv", "facts.jsonl", "pangolins.md", "tigers.txt"]
    with pytest.raises(RetrievalError, match="unsupported file type"):
        find_files([corpus / "notes" / "skip.pdf"])
    with pytest.raises(RetrievalError, match="no such file or folder"):
        find_files([corpus / "missing"])


def test_read_passages_keeps_source_path_and_position(corpus):
    md = list(read_passages(corpus / "pangolins.md", size=150, overlap=0))
    assert [p.metadata["position"] for p in md] == list(range(len(md)))
    assert all(p.metadata["path"] == str(corpus / "pangolins.md") and p.source == "pangolins.md" for p in md)
    (vulture, coral, dup) = read_passages(corpus / "facts.jsonl")
    assert vulture.id == "vulture-1" and vulture.source == "BirdLife 2021"
    assert vulture.metadata["species"] == "vultures" and vulture.metadata["position"] == 1
    assert coral.id.endswith("facts.jsonl:3") and coral.metadata["position"] == 3
    (kakapo,) = read_passages(corpus / "facts.csv")
    assert kakapo.id == "kakapo-1" and kakapo.source == "DOC"


def test_ingest_builds_a_searchable_index_and_reports_counts(corpus, tmp_path, embedder):
    report = ingest([corpus], tmp_path / "idx", embedder, size=150, overlap=0, progress=False)
    assert report.files_read == 4 and report.duplicates_skipped == 1  # the repeated coral record
    index = FactIndex.load(tmp_path / "idx", embedder)
    assert len(index) == report.passages_added
    assert index.search("What poisoned vultures?", 1)[0].passage.id == "vulture-1"
    assert "flightless parrot" in index.search("kakapo", 1)[0].passage.text


def test_reingest_skips_unchanged_files_and_replaces_changed_ones(corpus, tmp_path, embedder):
    ingest([corpus], tmp_path / "idx", embedder, progress=False)
    again = ingest([corpus], tmp_path / "idx", embedder, progress=False)
    assert again.files_unchanged == 4 and again.passages_added == 0
    (corpus / "notes" / "tigers.txt").write_text("Tiger numbers in Nepal have risen with better protection.")
    changed = ingest([corpus], tmp_path / "idx", embedder, progress=False)
    assert changed.files_replaced == 1 and changed.files_unchanged == 3
    assert changed.passages_added == 1 and changed.passages_removed == 1
    index = FactIndex.load(tmp_path / "idx", embedder)
    texts = [p.text for p in index.passages()]
    assert "Tiger numbers in Nepal have risen with better protection." in texts
    assert not any("Poaching for skins" in t for t in texts)
    assert len(index) == len(FactIndex.load(tmp_path / "idx", embedder).passages())


def test_bad_records_name_the_file_and_line_and_keep_the_index(corpus, tmp_path, embedder):
    ingest([corpus], tmp_path / "idx", embedder, progress=False)
    before = len(FactIndex.load(tmp_path / "idx", embedder))
    bad = corpus / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json}\n')
    with pytest.raises(RetrievalError, match=r"bad.jsonl:2: not valid JSON"):
        ingest([corpus], tmp_path / "idx", embedder, progress=False)
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(RetrievalError, match=r'bad.jsonl:2: a record needs a non-empty "text" field'):
        ingest([corpus], tmp_path / "idx", embedder, progress=False)
    assert len(FactIndex.load(tmp_path / "idx", embedder)) == before


def test_files_without_passages_are_skipped_and_reported(corpus, tmp_path, embedder):
    (corpus / "questions.jsonl").write_text('{"id": "q1", "question": "Where do kakapo live?"}\n')
    (corpus / "table.csv").write_text("title,year\nx,2020\n")
    report = ingest([corpus], tmp_path / "idx", embedder, progress=False)
    assert report.files_read == 6 and len(report.files_skipped) == 2
    assert "questions.jsonl: its records have no \"text\" field" in report.summary()


def test_empty_corpus_is_an_error(tmp_path, embedder):
    (tmp_path / "empty.md").write_text("\n\n")
    with pytest.raises(RetrievalError, match="corpus is empty"):
        ingest([tmp_path], tmp_path / "idx", embedder, progress=False)
    assert not (tmp_path / "idx").exists()  # nothing written for an empty corpus
    (tmp_path / "no-docs").mkdir()
    with pytest.raises(RetrievalError, match="no .txt, .md, .jsonl, .csv files found"):
        ingest([tmp_path / "no-docs"], tmp_path / "idx2", embedder, progress=False)


def test_cli_ingest_and_search_on_a_folder_of_markdown(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Okapi\n\nThe okapi lives in the rainforests of the Democratic Republic of Congo.")
    (docs / "b.md").write_text("Red pandas eat mostly bamboo. They live in the eastern Himalayas.")
    assert main(["ingest", str(docs), "--index", str(tmp_path / "idx"), "--quiet"]) == 0
    assert "2 files read" in capsys.readouterr().out
    assert main(["search", "Where do okapis live?", "--index", str(tmp_path / "idx"), "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "1. [" in out and "Democratic Republic of Congo" in out and "(a.md)" in out
    assert main(["search", "x", "--index", str(tmp_path / "nope")]) == 1
    assert "not a grpo-agent index" in capsys.readouterr().err


def test_the_bundled_corpus_folder_ingests_with_every_passage(tmp_path, embedder, capsys):
    n = sum(1 for line in (DATA / "passages.jsonl").open() if line.strip())
    assert main(["ingest", str(DATA), "--index", str(tmp_path / "idx"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{n} passages added" in out and "0 duplicates skipped" in out
    for name in ("eval.jsonl", "harm_probe.jsonl", "train_questions.jsonl"):  # question sets, not passages
        assert f"skipped {name}" in out
    index = FactIndex.load(tmp_path / "idx", embedder)
    first = json.loads((DATA / "passages.jsonl").open().readline())
    assert index.get(first["id"]).source == first["source"]
