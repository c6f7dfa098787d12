"""Executors: in-process and on the session's 2-worker dask cluster.

Reference: plain Python (sums and maps written out by hand). The dask
executor must give the same values as the in-process one (a tree reduction
adds in another order: float sums agree to 1e-12 relative), yield every
position once, receive broadcast values, and raise a task's error here.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import numpy as np
import pytest

from influx._executor import (
    DaskExecutor,
    Executor,
    LocalExecutor,
    executor_for,
    tree_add,
)

Pair = namedtuple("Pair", ["first", "second"])


def square(item: int, offset: float = 0.0) -> dict[str, Any]:
    """A task with a nested result (module level: workers import it)."""
    value = np.arange(3, dtype=np.float64) * item + offset
    return {"array": value, "parts": [item, (item * 0.5, None)], "pair": Pair(item, 1)}


def times(item: int, factor: np.ndarray) -> np.ndarray:
    return factor * item


def fails_on_three(item: int) -> int:
    if item == 3:
        raise ValueError(f"task {item} failed on purpose")
    return item


def _expected_sum(items: list[int], offset: float) -> dict[str, Any]:
    return {
        "array": sum(np.arange(3.0) * i + offset for i in items),
        "parts": [sum(items), (sum(i * 0.5 for i in items), None)],
        "pair": Pair(sum(items), len(items)),
    }


def _check_same(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    np.testing.assert_allclose(actual["array"], expected["array"], rtol=1e-12)
    assert actual["parts"][0] == expected["parts"][0]
    assert actual["parts"][1][0] == pytest.approx(expected["parts"][1][0], rel=1e-12)
    assert actual["parts"][1][1] is None
    assert isinstance(actual["parts"], list) and isinstance(actual["parts"][1], tuple)
    assert isinstance(actual["pair"], Pair) and actual["pair"] == expected["pair"]


def test_tree_add_structures() -> None:
    first = {"a": [np.ones(2), (1, None)], "b": Pair(2.0, np.zeros(1))}
    second = {"a": [np.full(2, 3.0), (4, None)], "b": Pair(0.5, np.ones(1))}
    total = tree_add(first, second)
    np.testing.assert_array_equal(total["a"][0], [4.0, 4.0])
    assert total["a"][1] == (5, None) and isinstance(total["a"][1], tuple)
    assert isinstance(total["b"], Pair) and total["b"].first == 2.5
    np.testing.assert_array_equal(total["b"].second, [1.0])
    with pytest.raises(ValueError):
        tree_add([1, 2], [1])


def test_local_executor() -> None:
    ex = executor_for(None)
    assert isinstance(ex, LocalExecutor) and ex.workers == 1
    items = [1, 2, 3, 4, 5]
    assert [p for p, _ in ex.map(square, items, 0.5)] == [0, 1, 2, 3, 4]
    _check_same(ex.sum(square, items, 0.5), _expected_sum(items, 0.5))
    shared = np.arange(3.0)
    assert ex.broadcast(shared) is shared
    assert executor_for(ex) is ex
    with pytest.raises(ValueError, match="task 3 failed"):
        ex.sum(fails_on_three, items)


def test_executor_for_refuses_other_objects() -> None:
    with pytest.raises(TypeError, match=r"dask\.distributed\.Client"):
        executor_for("tcp://127.0.0.1:8786")
    with pytest.raises(NotImplementedError):
        Executor().broadcast(1)


def test_dask_executor_matches_local(dask_client: Any) -> None:
    ex = executor_for(dask_client)
    assert isinstance(ex, DaskExecutor) and ex.workers == 2
    items = list(range(1, 12))  # odd count: a leaf carried up the tree
    expected = _expected_sum(items, 0.25)
    _check_same(ex.sum(square, items, 0.25), expected)
    _check_same(LocalExecutor().sum(square, items, 0.25), expected)
    # map: every position once, each with its own item's result
    found = dict(ex.map(square, items, 0.0))
    assert sorted(found) == list(range(len(items)))
    for position, result in found.items():
        np.testing.assert_array_equal(result["array"], np.arange(3.0) * items[position])
    # a broadcast value reaches the tasks as the value itself
    factor = np.array([1.0, -2.0])
    handle = ex.broadcast(factor)
    total = ex.sum(times, items, handle)
    np.testing.assert_array_equal(total, factor * sum(items))
    assert ex.sum(times, [7], handle).tolist() == [7.0, -14.0]


def test_dask_task_errors_reach_the_client(dask_client: Any) -> None:
    ex = executor_for(dask_client)
    for items in ([1, 2, 3, 4], [3, *range(4, 40)]):
        with pytest.raises(ValueError, match="task 3 failed on purpose"):
            ex.sum(fails_on_three, items)
        with pytest.raises(ValueError, match="task 3 failed on purpose"):
            list(ex.map(fails_on_three, items[::-1]))
        # the client still works afterwards (its tasks are not left cancelled)
        assert ex.sum(fails_on_three, [1, 2]) == 3
        assert dict(ex.map(fails_on_three, [4, 5])) == {0: 4, 1: 5}
