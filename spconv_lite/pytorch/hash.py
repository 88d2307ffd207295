"""``spconv.pytorch.hash``: ``HashTable`` (:mod:`spconv_lite.hash_table`)."""

from ..hash_table import HashTable

__all__ = ["HashTable"]
