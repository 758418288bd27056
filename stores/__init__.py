"""Reinforced stores: zarr v3 arrays of named teacher targets and augmentation records, plus codecs."""

from stores.codecs import create_codec, list_codecs
from stores.manifest import StoreManifest
from stores.store import StoreCorruptError, StoreFormatError, StoreWriter, open_store

__all__ = ["StoreCorruptError", "StoreFormatError", "StoreManifest", "StoreWriter", "create_codec", "list_codecs",
           "open_store"]
