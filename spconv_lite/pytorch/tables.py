"""``spconv.pytorch.tables``: ``AddTable``, ``AddTableMisaligned``, ``ConcatTable``,
``JoinTable``."""

from ..nn.tables import AddTable, AddTableMisaligned, ConcatTable, JoinTable

__all__ = [
    "AddTable",
    "AddTableMisaligned",
    "ConcatTable",
    "JoinTable",
]
