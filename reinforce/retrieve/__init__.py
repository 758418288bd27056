"""Retrieval-augmented transfer sets: ``python -m reinforce.retrieve`` (the CLI and its method, ``__main__``),
``curate`` (embed, search, clean, write the manifest), ``search`` (the search backends: faiss flat / IVF-PQ, exact
torch; the selection strategies). A manifest it writes is the source ``retrieved:FILE.parquet``.
"""

from __future__ import annotations

from reinforce.retrieve.curate import EMBEDDED, Retrieval, RetrieveConfig, check_widths, embed, retrieve

__all__ = ["EMBEDDED", "Retrieval", "RetrieveConfig", "check_widths", "embed", "retrieve"]
