"""LangChain adapters: the fact index as a `BaseRetriever`, so it drops into any LangChain chain."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field

from ..retrieval import FactIndex


class FactIndexRetriever(BaseRetriever):
    """Returns the k passages of a `FactIndex` most similar to the query as LangChain `Document`s.

    Each document's metadata holds the passage id, its source citation, the similarity score and the
    passage's own metadata.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: FactIndex
    k: int = Field(default=4, ge=1)
    min_score: float | None = None  # drop passages less similar than this (cosine)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        hits = self.index.search(query, kwargs.get("k", self.k))
        return [
            Document(
                page_content=hit.passage.text,
                id=hit.passage.id,
                metadata={**hit.passage.metadata, "id": hit.passage.id, "source": hit.passage.source,
                          "score": hit.score},
            )
            for hit in hits
            if self.min_score is None or hit.score >= self.min_score
        ]
