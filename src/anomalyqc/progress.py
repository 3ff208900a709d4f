"""Progress reporting without a progress-bar library.

Models, workflows and generators report progress through a plain callback, so importing or
fitting them never pulls in a terminal UI; the CLI supplies one that draws rich bars on stderr
(stdout carries the JSON). A Python user passes any callable, or nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sized
from typing import TypeVar

T = TypeVar("T")

# progress(description, completed, total): `completed` grows for one description; `total` is
# None when the length is not known in advance.
Progress = Callable[[str, int, int | None], None]


def check_progress(progress: Progress | None) -> Progress | None:
    """The callback itself; refuses what cannot be called (e.g. the old `progress=True`)
    up front rather than deep inside a fit."""
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be None or a callable (description, completed, total), "
                        f"got {progress!r}")
    return progress


def tracked(items: Iterable[T], progress: Progress | None, description: str,
            total: int | None = None) -> Iterator[T]:
    """Yield items, reporting (description, items done, total) before the first and after each."""
    report = check_progress(progress)
    if report is None:
        yield from items
        return
    if total is None and isinstance(items, Sized):
        try:
            total = len(items)
        except TypeError:  # e.g. a DataLoader over an iterable dataset
            total = None
    report(description, 0, total)
    for done, item in enumerate(items, start=1):
        yield item
        report(description, done, total)
