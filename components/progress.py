"""tqdm bars for epochs and data passes, silent when stderr is not a terminal (CI logs, `make run > log`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, leave: bool = False, total: int | None = None) -> Iterable[T]:
    """`total`: the length of an iterable that has none (a generator)."""
    return tqdm(iterable, desc=desc, leave=leave, total=total, unit="batch", disable=None, dynamic_ncols=True)
