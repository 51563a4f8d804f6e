"""Corpus ingestion: read .txt, .md, .jsonl and .csv files, split documents into passages on sentence
boundaries, and add them to a FactIndex; re-ingesting a changed file replaces its passages."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .records import Passage
from .retrieval import Embedder, FactIndex, RetrievalError
from .text import split_sentences

SUFFIXES = (".txt", ".md", ".jsonl", ".csv")


def split_passages(text: str, size: int = 600, overlap: int = 100) -> list[str]:
    """Chunks of at most ~`size` characters made of whole sentences; consecutive chunks share trailing
    sentences up to `overlap` characters. A single sentence longer than `size` is its own chunk."""
    if size < 1 or overlap < 0 or overlap >= size:
        raise RetrievalError(f"chunk size {size} and overlap {overlap}: need size >= 1 and 0 <= overlap < size")
    chunks: list[str] = []
    current: list[str] = []
    for sentence in split_sentences(text):
        if current and len(" ".join(current + [sentence])) > size:
            chunks.append(" ".join(current))
            tail: list[str] = []  # the overlap: last sentences of this chunk, within `overlap` chars
            for s in reversed(current):
                if len(" ".join([s] + tail)) > overlap:
                    break
                tail.insert(0, s)
            current = tail if len(" ".join(tail + [sentence])) <= size else []
        current.append(sentence)
    if current:
        chunks.append(" ".join(current))
    return chunks


@dataclass
class IngestReport:
    """What one ingestion did."""

    files_read: int = 0
    files_unchanged: int = 0  # same content as last time: skipped
    files_replaced: int = 0  # changed since last time: old passages removed
    passages_added: int = 0
    passages_removed: int = 0
    duplicates_skipped: int = 0  # same text as a passage already indexed or earlier in this run
    files_skipped: list[str] = field(default_factory=list)  # .jsonl/.csv files that hold no passages, and why

    def summary(self) -> str:
        text = (
            f"{self.files_read} files read ({self.files_unchanged} unchanged, {self.files_replaced} replaced), "
            f"{self.passages_added} passages added, {self.passages_removed} removed, "
            f"{self.duplicates_skipped} duplicates skipped"
        )
        return text + "".join(f"\n  skipped {why}" for why in self.files_skipped)


def find_files(paths: Iterable[str | Path]) -> list[Path]:
    """The supported files named by `paths`, folders searched recursively, in a stable order."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES))
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise RetrievalError(f"{path}: unsupported file type; ingest reads {', '.join(SUFFIXES)}")
            found.append(path)
        else:
            raise RetrievalError(f"{path}: no such file or folder")
    return list(dict.fromkeys(p.resolve() for p in found))


def read_passages(path: Path, size: int = 600, overlap: int = 100) -> Iterator[Passage]:
    """Passages from one file. .txt/.md: split on sentences; .jsonl: one record per line with "text" and
    optional "id", "source", "metadata"; .csv: one row per record, same columns."""
    key = str(path)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md"):
        for i, chunk in enumerate(split_passages(path.read_text(encoding="utf-8"), size, overlap)):
            yield Passage(id=f"{key}#{i}", text=chunk, source=path.name, metadata={"path": key, "position": i})
        return
    records = _jsonl_records(path) if suffix == ".jsonl" else _csv_records(path)
    for line, record in records:
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise RetrievalError(f'{path}:{line}: a record needs a non-empty "text" field')
        base_id = str(record.get("id") or f"{key}:{line}")
        metadata = record.get("metadata") or {}
        if isinstance(metadata, str):  # a CSV cell may hold JSON
            metadata = json.loads(metadata) if metadata.strip().startswith("{") else {"note": metadata}
        chunks = split_passages(text, size, overlap) if len(text) > size else [" ".join(text.split())]
        for j, chunk in enumerate(chunks):
            yield Passage(
                id=base_id if len(chunks) == 1 else f"{base_id}#{j}",
                text=chunk,
                source=str(record.get("source") or path.name),
                metadata={**metadata, "path": key, "position": line},
            )


def holds_passages(path: Path) -> bool:
    """False for a .jsonl/.csv file whose first record has no "text" field (e.g. a question set beside a
    corpus); such a file is skipped, while a later record without text is an error."""
    if path.suffix.lower() not in (".jsonl", ".csv"):
        return True
    records = _jsonl_records(path) if path.suffix.lower() == ".jsonl" else _csv_records(path, require_text=False)
    first = next(iter(records), None)
    return first is not None and "text" in first[1]


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RetrievalError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise RetrievalError(f'{path}:{n}: each line must be a JSON object with a "text" field')
            yield n, record


def _csv_records(path: Path, require_text: bool = True) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if require_text and (not reader.fieldnames or "text" not in reader.fieldnames):
            raise RetrievalError(f'{path}: a CSV corpus needs a header row with a "text" column')
        for n, row in enumerate(reader, 2):
            yield n, row


def ingest(
    paths: Iterable[str | Path],
    index_dir: str | Path,
    embedder: Embedder | None = None,
    size: int = 600,
    overlap: int = 100,
    kind: str = "auto",
    progress: bool = True,
) -> IngestReport:
    """Ingest files and folders into the index at `index_dir` (created if missing) and save it."""
    from tqdm import tqdm

    files = find_files(paths)
    if not files:
        raise RetrievalError(f"no {', '.join(SUFFIXES)} files found in {', '.join(map(str, paths))}")
    embedder = embedder or Embedder()
    index_dir = Path(index_dir)
    exists = (index_dir / "manifest.json").is_file()
    index = FactIndex.load(index_dir, embedder) if exists else FactIndex(embedder, kind)
    report = IngestReport()
    seen_texts = {_text_key(p.text) for p in index.passages()}
    new: list[Passage] = []
    new_ids: set[str] = set()
    for path in tqdm(files, desc="reading", unit="file", disable=not progress):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        key = str(path)
        report.files_read += 1
        if index.documents.get(key) == digest:
            report.files_unchanged += 1
            continue
        if not holds_passages(path):
            report.files_skipped.append(f'{path.name}: its records have no "text" field (not a passage file)')
            continue
        if key in index.documents:  # changed: drop what it gave last time
            old = [p for p in index.passages() if p.metadata.get("path") == key]
            seen_texts -= {_text_key(p.text) for p in old}
            report.passages_removed += index.delete(p.id for p in old)
            report.files_replaced += 1
        for passage in read_passages(path, size, overlap):
            text_key = _text_key(passage.text)
            if text_key in seen_texts or passage.id in index or passage.id in new_ids:
                report.duplicates_skipped += 1
                continue
            seen_texts.add(text_key)
            new_ids.add(passage.id)
            new.append(passage)
        index.documents[key] = digest
    if len(index) + len(new) == 0:
        raise RetrievalError(f"the corpus is empty: {len(files)} files held no text to index")
    report.passages_added = index.add(new, progress=progress)
    index.save(index_dir)
    return report


def _text_key(text: str) -> str:
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()
