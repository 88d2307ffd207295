"""A key -> value table of integer keys on any device (spconv's ``spconv.pytorch.hash.HashTable``).

spconv's table is an open-addressing hash table; this one keeps its keys sorted, with their
values alongside, and finds keys by binary search (``torch.searchsorted``). So it needs no fixed
size on a GPU, and its results do not depend on the device or on thread timing: ``items()``
lists the keys in increasing order (spconv: slot order), an insert gives a key already present
its new value (as spconv's GPU table; its CPU table keeps the old one), and a key given more
than once in one call takes its last value (spconv's GPU table: any of them; CPU: the first).

Example:
    >>> table = HashTable("cpu", torch.int64, torch.int32)
    >>> table.insert(torch.tensor([7, 3, 9]), torch.tensor([0, 1, 2], dtype=torch.int32))
    >>> values, is_empty = table.query(torch.tensor([9, 4, 3]))
    >>> values.tolist(), is_empty.tolist()
    ([2, 0, 1], [False, True, False])
    >>> keys, values, count = table.items()
    >>> keys.tolist(), values.tolist(), int(count)
    ([3, 7, 9], [1, 0, 2], 3)
"""

from __future__ import annotations

import operator
from typing import Optional, Union

import torch
from torch import Tensor

KEY_DTYPES = (torch.int32, torch.int64)
VALUE_DTYPES = (torch.int32, torch.int64, torch.float32, torch.float64)

__all__ = ["HashTable"]


class HashTable:
    """Integer keys (int32 / int64) mapped to values (int32, int64, float32, float64), with
    spconv's methods: ``insert``, ``query``, ``insert_exist_keys``, ``assign_arange_``,
    ``items``.

    Args:
        device: where the keys and values live; every tensor given must be there.
        key_dtype: ``torch.int32`` or ``torch.int64``.
        value_dtype: ``torch.int32``, ``torch.int64``, ``torch.float32`` or ``torch.float64``.
        max_size: the most distinct keys the table may hold (spconv requires it on a GPU, where
            its table has a fixed size: twice the key count is usual); an insert that would go
            beyond it raises ``ValueError`` and changes nothing. -1: no limit.
    """

    def __init__(self, device: Union[torch.device, str], key_dtype: torch.dtype,
                 value_dtype: torch.dtype, max_size: int = -1) -> None:
        if key_dtype not in KEY_DTYPES:
            raise ValueError(f"key_dtype must be torch.int32 or torch.int64, got {key_dtype}")
        if value_dtype not in VALUE_DTYPES:
            raise ValueError("value_dtype must be torch.int32, torch.int64, torch.float32 or "
                             f"torch.float64, got {value_dtype}")
        max_size = _count_argument("max_size", max_size, "-1 (no limit) or a key count >= 0")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.key_dtype, self.value_dtype, self.max_size = key_dtype, value_dtype, max_size
        self._keys = torch.empty(0, dtype=key_dtype, device=self.device)  # sorted, distinct
        self._values = torch.empty(0, dtype=value_dtype, device=self.device)

    def insert(self, keys: Tensor, values: Optional[Tensor] = None) -> None:
        """Adds ``keys`` with ``values`` (1-D, one per key); a key already present takes its
        new value. Without ``values``, new keys get 0 (spconv: undefined) and keys already
        present keep theirs."""
        self._check("keys", keys, self.key_dtype)
        if values is not None:
            self._check("values", values, self.value_dtype, keys)
        distinct, last = _last_of_each(keys)
        found, position = self._find(distinct)
        new_keys = distinct[~found]
        if self.max_size >= 0 and len(self._keys) + len(new_keys) > self.max_size:
            raise ValueError(f"insert: the table would hold {len(self._keys) + len(new_keys)} "
                             f"keys, more than its max_size {self.max_size}")
        if values is not None:
            chosen = values.detach()[last]  # values are stored, not their autograd graph
            self._values[position[found]] = chosen[found]
            new_values = chosen[~found]
        else:
            new_values = torch.zeros(len(new_keys), dtype=self.value_dtype, device=self.device)
        merged_keys = torch.cat([self._keys, new_keys])
        order = torch.argsort(merged_keys)
        self._keys = merged_keys[order]
        self._values = torch.cat([self._values, new_values])[order]

    def query(self, keys: Tensor, values: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The values of ``keys`` and a bool tensor, True where a key is not in the table.

        ``values``, if given (1-D, one per key), receives the values in place and is returned;
        its entries for absent keys are left as they are. Otherwise a new tensor is returned,
        0 for absent keys (spconv: undefined)."""
        self._check("keys", keys, self.key_dtype)
        if values is None:
            values = torch.zeros(len(keys), dtype=self.value_dtype, device=self.device)
        else:
            self._check("values", values, self.value_dtype, keys)
        found, position = self._find(keys)
        values[found] = self._values[position[found]]
        return values, ~found

    def insert_exist_keys(self, keys: Tensor, values: Tensor) -> Tensor:
        """Sets the values of those ``keys`` already in the table (a key given twice: its last
        value); adds none. Returns a uint8 tensor, 1 where a key was not in the table."""
        self._check("keys", keys, self.key_dtype)
        self._check("values", values, self.value_dtype, keys)
        distinct, last = _last_of_each(keys)
        found, position = self._find(distinct)
        self._values[position[found]] = values.detach()[last[found]]
        return (~self._find(keys)[0]).to(torch.uint8)

    def assign_arange_(self) -> Tensor:
        """Numbers the keys: their values become 0, 1, ... in the order of :meth:`items`
        (increasing keys). Integer value types only. Returns the key count, an int64 tensor
        of one element on the table's device."""
        if self.value_dtype not in (torch.int32, torch.int64):
            raise ValueError("assign_arange_ needs an integer value_dtype (torch.int32 or "
                             f"torch.int64), the table's is {self.value_dtype}")
        self._values = torch.arange(len(self._keys), dtype=self.value_dtype, device=self.device)
        return self._count(len(self._keys))

    def items(self, max_size: int = -1) -> tuple[Tensor, Tensor, Tensor]:
        """``(keys, values, count)``: the keys in increasing order, their values, and their
        number (an int64 tensor of one element); at most ``max_size`` of them unless -1. The
        tensors are copies: editing them leaves the table as it is."""
        max_size = _count_argument("max_size", max_size, "-1 (all) or a count >= 0")
        count = len(self._keys) if max_size == -1 else min(max_size, len(self._keys))
        return self._keys[:count].clone(), self._values[:count].clone(), self._count(count)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return (f"HashTable({len(self)} keys, device={self.device}, key_dtype={self.key_dtype}, "
                f"value_dtype={self.value_dtype}, max_size={self.max_size})")

    def _find(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Whether each key is in the table, and where (any position where it is not)."""
        if len(self._keys) == 0:
            return (torch.zeros(len(keys), dtype=torch.bool, device=self.device),
                    torch.zeros(len(keys), dtype=torch.int64, device=self.device))
        position = torch.searchsorted(self._keys, keys).clamp_(max=len(self._keys) - 1)
        return self._keys[position] == keys, position

    def _count(self, count: int) -> Tensor:
        return torch.tensor([count], dtype=torch.int64, device=self.device)

    def _check(self, name: str, tensor: Tensor, dtype: torch.dtype,
               keys: Optional[Tensor] = None) -> None:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(tensor.shape)}")
        if tensor.dtype != dtype:
            raise ValueError(f"{name} must be {dtype} (the table's "
                             f"{'key' if keys is None else 'value'}_dtype), got {tensor.dtype}")
        if tensor.device != self.device:
            raise ValueError(f"{name} is on {tensor.device}, the table on {self.device}")
        if keys is not None and len(tensor) != len(keys):
            raise ValueError(f"{name} must hold one entry per key: {len(tensor)} for "
                             f"{len(keys)} keys")


def _count_argument(name: str, value, allowed: str) -> int:
    """``value`` as an int (Python or numpy integers), if it is -1 or at least 0."""
    try:
        count = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        count = None
    if count is None or count < -1:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return count


def _last_of_each(keys: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct keys, sorted, and for each the position of its last occurrence in ``keys``:
    a call that repeats a key gives it the last of its values, as assignments in turn would."""
    distinct, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    positions = torch.arange(len(keys), device=keys.device)
    last = torch.zeros(len(distinct), dtype=torch.int64, device=keys.device)
    return distinct, last.scatter_reduce_(0, inverse, positions, "amax", include_self=False)
