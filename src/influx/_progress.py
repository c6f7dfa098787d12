"""Progress bars that cost nothing when switched off."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class _NoBar:
    """Stands in for a tqdm bar when progress is off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


_NO_BAR = _NoBar()


def progress_iter(
    iterable: Iterable[Any], enabled: bool, desc: str, total: int | None = None
) -> Iterable[Any]:
    """``iterable`` itself, or wrapped in a tqdm bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def progress_bar(enabled: bool, desc: str, total: int | None = None) -> Any:
    """A manually advanced tqdm bar, or a no-op stand-in when off."""
    if not enabled:
        return _NO_BAR
    from tqdm.auto import tqdm

    return tqdm(desc=desc, total=total, leave=False)
