"""``spconv.pytorch.tables``: ``AddTable``, ``ConcatTable``, ``JoinTable``."""

from ..nn.tables import AddTable, ConcatTable, JoinTable

__all__ = [
    "AddTable",
    "ConcatTable",
    "JoinTable",
]
