"""Whether to draw a progress bar: only when asked and stderr is a terminal.

tqdm redraws its bar with carriage returns on stderr. On a terminal that is one
line updating in place; in a log file (``segsvc train ... 2> train.log``, a job's
``train.log``, CI) every redraw stays, so the trainer and ``segsvc eval`` draw
bars on terminals only. The log keeps the trainer's one line per epoch.
"""

from __future__ import annotations

import sys


def show_progress(requested: bool) -> bool:
    """``requested`` (``train.progress``, ``--no-progress``), and only on a terminal."""
    stream = sys.stderr
    if not requested or stream is None:
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a stream without isatty, or a closed one
        return False
