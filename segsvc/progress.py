"""Progress bars that draw only when asked and stderr is a terminal.

tqdm redraws its bar with carriage returns on stderr. On a terminal that is one
line updating in place; in a log file (``segsvc train ... 2> train.log``, a job's
``train.log``, CI) every redraw stays, so the trainer, ``segsvc eval``, the data
commands, the client's bars and ``segsvc export`` draw bars on terminals only.
The log keeps the trainer's one line per epoch, and a job followed from a log
(``jobs wait``, ``--wait``) one plain line per milestone (``JobBar``).
"""

from __future__ import annotations

import io
import sys
from typing import TYPE_CHECKING, Any, Hashable, Iterable

if TYPE_CHECKING:
    from tqdm import tqdm


def show_progress(requested: bool) -> bool:
    """``requested`` (``train.progress``, ``--no-progress``), and only on a terminal."""
    stream = sys.stderr
    if not requested or stream is None:
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a stream without isatty, or a closed one
        return False


class _Nowhere(io.TextIOBase):
    """Where a bar asked for off a terminal draws: it still counts, and ``str(bar)`` is its line."""

    def write(self, text: str) -> int:
        return len(text)


def progress_bar(requested: bool, iterable: Iterable[Any] | None = None, **options: Any) -> "tqdm":
    """A tqdm bar on stderr when ``show_progress(requested)``; asked for elsewhere, one drawn nowhere; else off."""
    from tqdm import tqdm  # looked up now: tests replace tqdm.tqdm

    if show_progress(requested):
        return tqdm(iterable, **options)
    return tqdm(iterable, disable=not requested, file=_Nowhere(), **options)


_NO_MILESTONE = object()


class JobBar:
    """The bar of a wait on a job: redrawn in place on a terminal. Asked for elsewhere (a log file), it draws
    nothing and ``show`` writes its text as one plain line each time the job reaches a new milestone (a
    state, an epoch, a tenth of its images), not a redraw per wait step."""

    def __init__(self, requested: bool, **options: Any) -> None:
        self.bar = progress_bar(requested, **options)
        self._lines = requested and not show_progress(requested)
        self._milestone: Hashable = _NO_MILESTONE

    def show(self, milestone: Hashable) -> None:
        """Redraw the bar (a terminal), or write its line if ``milestone`` is new (a log)."""
        if not self._lines:
            self.bar.refresh()
        elif milestone != self._milestone:
            self._milestone = milestone
            print(self.bar, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
