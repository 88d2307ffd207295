"""HashTable (spconv's ``spconv.pytorch.hash.HashTable``) against a Python dict."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import DEVICES

from spconv_lite.hash_table import KEY_DTYPES, VALUE_DTYPES, HashTable


def tensor(values, dtype, device):
    return torch.tensor(values, dtype=dtype, device=device)


def assert_matches(table: HashTable, expected: dict) -> None:
    keys, values, count = table.items()
    assert int(count) == len(table) == len(expected)
    assert keys.tolist() == sorted(expected)
    assert values.tolist() == [expected[key] for key in sorted(expected)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES)
@pytest.mark.parametrize("value_dtype", VALUE_DTYPES)
def test_random_calls_equal_a_dict(key_dtype, value_dtype, device):
    """Inserts (repeated keys: the last value; without values: 0 for new keys), queries,
    updates of present keys and numbering, drawn at random, as a dict does them in turn."""
    rng = random.Random(f"{key_dtype}{value_dtype}")
    low = -(2**31) if key_dtype == torch.int32 else -(2**63)
    pool = [rng.randrange(low, -low) for _ in range(40)] + list(range(-5, 6))
    table, expected = HashTable(device, key_dtype, value_dtype), {}
    for _ in range(60):
        keys = [rng.choice(pool) for _ in range(rng.randrange(0, 12))]
        values = [rng.randrange(-1000, 1000) for _ in keys]
        call = rng.choice(["insert", "insert_keys_only", "query", "update", "query_into",
                           "arange"])
        if call == "insert":
            table.insert(tensor(keys, key_dtype, device), tensor(values, value_dtype, device))
            expected.update(zip(keys, values))
        elif call == "insert_keys_only":
            table.insert(tensor(keys, key_dtype, device))
            expected.update({key: expected.get(key, 0) for key in keys})
        elif call == "update":
            absent = table.insert_exist_keys(tensor(keys, key_dtype, device),
                                             tensor(values, value_dtype, device))
            assert absent.dtype == torch.uint8
            assert absent.tolist() == [int(key not in expected) for key in keys]
            expected.update({key: value for key, value in zip(keys, values) if key in expected})
        elif call in ("query", "query_into"):
            into = tensor(values, value_dtype, device) if call == "query_into" else None
            found, is_empty = table.query(tensor(keys, key_dtype, device), into)
            assert into is None or found is into
            assert is_empty.tolist() == [key not in expected for key in keys]
            fill = values if call == "query_into" else [0] * len(keys)
            assert found.tolist() == [expected.get(key, old) for key, old in zip(keys, fill)]
        elif value_dtype in (torch.int32, torch.int64):
            assert int(table.assign_arange_()) == len(expected)
            expected = {key: number for number, key in enumerate(sorted(expected))}
        assert_matches(table, expected)


def test_items_are_copies_and_max_size_limits_them():
    table = HashTable("cpu", torch.int64, torch.int64)
    table.insert(torch.tensor([9, 2, 5]), torch.tensor([90, 20, 50]))
    keys, values, count = table.items(max_size=2)
    assert keys.tolist() == [2, 5] and values.tolist() == [20, 50] and count.tolist() == [2]
    values.fill_(0)
    assert table.items()[1].tolist() == [20, 50, 90]


def test_an_insert_beyond_max_size_raises_and_changes_nothing():
    """The limit counts distinct keys (spconv's GPU table counts every key it was given)."""
    table = HashTable("cpu", torch.int32, torch.float32, max_size=3)
    table.insert(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="would hold 4 keys, more than its max_size 3"):
        table.insert(torch.tensor([2, 3, 4, 3], dtype=torch.int32),
                     torch.tensor([5.0, 6.0, 7.0, 8.0]))
    assert_matches(table, {1: 1.0, 2: 2.0})
    table.insert(torch.tensor([3, 3, 1], dtype=torch.int32), torch.tensor([6.0, 8.0, 9.0]))
    assert_matches(table, {1: 9.0, 2: 2.0, 3: 8.0})


@pytest.mark.parametrize("arguments, message", [
    ((torch.float32, torch.int32), "key_dtype must be .* got torch.float32"),
    ((torch.int32, torch.float16), "value_dtype must be .* got torch.float16"),
    ((torch.int32, torch.int32, -2), "max_size .* got -2"),
    ((torch.int32, torch.int32, 1.0), "max_size .* got 1.0"),
    ((torch.int32, torch.int32, True), "max_size .* got True"),
])
def test_bad_table_arguments_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        HashTable("cpu", *arguments)


@pytest.mark.parametrize("call, message", [
    (lambda t: t.insert(torch.tensor([1, 2])), "keys must be torch.int32 .* got torch.int64"),
    (lambda t: t.insert(torch.tensor([[1]], dtype=torch.int32)), r"keys must be 1-D, .*\(1, 1\)"),
    (lambda t: t.insert(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1.0, 2.0])),
     "values must be torch.int64 .* got torch.float32"),
    (lambda t: t.query(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([1])),
     "values must hold one entry per key: 1 for 2 keys"),
    (lambda t: t.insert_exist_keys(torch.tensor([1], dtype=torch.int32).to("meta"),
                                   torch.tensor([1])), "keys is on meta, the table on cpu"),
    (lambda t: t.items(max_size=-2), "max_size must be -1 .* got -2"),
])
def test_bad_call_arguments_are_named(call, message):
    table = HashTable("cpu", torch.int32, torch.int64)
    with pytest.raises(ValueError, match=message):
        call(table)
    assert len(table) == 0


def test_numbering_needs_integer_values():
    table = HashTable("cpu", torch.int64, torch.float64)
    table.insert(torch.tensor([4]), torch.tensor([0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="assign_arange_ needs an integer value_dtype"):
        table.assign_arange_()
    assert_matches(table, {4: 0.5})


def test_max_size_takes_numpy_integers_and_zero():
    """spconv sizes tables as ``2 * rows`` of numpy shapes, 0 for an empty input."""
    np = pytest.importorskip("numpy")
    table = HashTable("cpu", torch.int64, torch.int64, max_size=np.int64(2) * 0)
    table.insert(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64))
    with pytest.raises(ValueError, match="more than its max_size 0"):
        table.insert(torch.tensor([1]))
    table = HashTable("cpu", torch.int64, torch.int64, max_size=np.int64(4))
    table.insert(torch.tensor([3, 1]), torch.tensor([30, 10]))
    assert table.items(max_size=np.int32(1))[0].tolist() == [1]


def test_values_are_stored_without_their_autograd_graph():
    table = HashTable("cpu", torch.int64, torch.float64)
    values = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    table.insert(torch.tensor([1, 2]), values * 2)
    table.insert_exist_keys(torch.tensor([2]), values[:1] * 3)
    found, _ = table.query(torch.tensor([1, 2]))
    assert found.tolist() == [2.0, 3.0] and not found.requires_grad
    assert not table.items()[1].requires_grad
