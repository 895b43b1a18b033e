"""Progress of long work (decoding image files, decomposing layers, calibration passes, rank searches): one
helper for every package, so that a terminal shows a bar and a redirected log stays readable.

- on a terminal (``sys.stderr.isatty()``): a tqdm bar that leaves nothing behind when done (``leave=False``);
- elsewhere (a log file, CI, a pipe, Hydra's job log): one plain log line at every quarter of the work and at
  most every ``interval_s`` seconds in between, ``"<desc>: <done>/<total> (<percent>%), <seconds> s"``, without
  carriage returns;
- below ``min_total`` steps: nothing at all, so that a tiny model or a test logs no progress.

:class:`Progress` is a context manager (``with Progress(n, "decoding") as bar: ... bar.update()``); :func:`progress`
wraps an iterable (``for name, module in progress(targets, "decomposing layers", min_total=16): ...``).
A caller may hand its own ``logger`` so that the lines carry its module's name; the default is ``lrk.progress``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

MIN_TOTAL = 500  # steps below which nothing is shown (image files; callers with slower steps pass their own)
INTERVAL_S = 30.0  # at most this long between two log lines when not on a terminal


class Progress:
    """A progress bar over ``total`` steps, shown when ``total >= min_total``: tqdm on a terminal; elsewhere a log
    line at every quarter and at most every ``interval_s`` seconds (readable without carriage returns)."""

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        min_total: int = MIN_TOTAL,
        interval_s: float = INTERVAL_S,
        logger: logging.Logger | None = None,
    ) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.log = logger or log
        self.active = total > 0 and total >= min_total
        self.tty = self.active and sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False)
        self.interval_s = interval_s
        self.start = self.last = time.perf_counter()
        self.next_quarter = 1

    def update(self, n: int = 1) -> None:
        """``n`` more steps done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if not self.active:
            return
        now = time.perf_counter()
        quarter = self.done * 4 >= self.next_quarter * self.total
        if quarter or now - self.last >= self.interval_s:
            while self.next_quarter * self.total <= self.done * 4:
                self.next_quarter += 1
            self.last = now
            self.log.info(
                "%s: %d/%d (%.0f%%), %.1f s",
                self.desc,
                self.done,
                self.total,
                100 * self.done / self.total,
                now - self.start,
            )

    def close(self) -> None:
        """Remove the terminal bar (no-op for log lines); safe to call twice."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    items: Iterable[T],
    desc: str,
    *,
    total: int | None = None,
    min_total: int = MIN_TOTAL,
    interval_s: float = INTERVAL_S,
    logger: logging.Logger | None = None,
) -> Iterator[T]:
    """Yield every item of ``items``, counting one step after each item's work (when the loop asks for the next
    one). ``total`` defaults to ``len(items)``; an iterable without a length and no ``total`` shows nothing.
    The bar is closed when the loop ends, also on ``break`` or an error."""
    if total is None:
        total = len(items) if isinstance(items, Sized) else 0
    bar = Progress(total, desc, min_total=min_total, interval_s=interval_s, logger=logger)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()
