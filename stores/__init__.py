"""Reinforced stores: zarr v3 arrays of teacher targets and augmentation records, plus codecs."""

from stores.codecs import create_codec
from stores.store import StoreCorruptError, StoreWriter, open_store

__all__ = ["StoreCorruptError", "StoreWriter", "create_codec", "open_store"]
