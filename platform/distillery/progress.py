"""Progress lines from inside Ray workers."""
from __future__ import annotations

import sys


def say(message: str) -> None:
    """Print one line from a Ray Train worker, once.

    Ray Train patches `print` in its workers to tee to both the console and its logger, which shows
    every line twice on the driver; the process's own stdout reaches the driver exactly once.
    """
    print(message, file=sys.__stdout__ or sys.stdout, flush=True)
