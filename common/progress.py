"""Progress of long loops: a live bar on a terminal, a few status lines in a log.

On a TTY :func:`progress` returns a tqdm bar. Without one (CI, ``nohup``, a pipe) a bar would write
every update as a carriage-return line, hundreds of kilobytes per run; :class:`LineProgress` instead
prints one short line every ``interval`` seconds and one at the end (never the same count twice).
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` as occasional status lines::

        [dfq] finetune acq: 120/300 step (40%), 45 s, about 68 s left (kd=0.12)
    """

    def __init__(self, total: int, desc: str, unit: str = "step", initial: int = 0, *,
                 stream: TextIO | None = None, interval: float = LOG_INTERVAL_S) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start = initial
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.t0 = self.last = time.monotonic()
        self.postfix = ""
        self.closed = False
        self.printed_n: int | None = None   # the count the last line showed

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def set_postfix(self, values: dict | None = None, refresh: bool = False, **kw) -> None:
        items = {**(values or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def _print(self, now: float) -> None:
        elapsed = now - self.t0
        done = self.n - self.start
        line = f"[dfq] {self.desc}: {self.n}/{self.total} {self.unit}"
        if self.total:
            line += f" ({100 * self.n / self.total:.0f}%)"
        line += f", {elapsed:.0f} s"
        if 0 < done and self.n < self.total:
            line += f", about {elapsed / done * (self.total - self.n):.0f} s left"
        if self.postfix:
            line += f" ({self.postfix})"
        print(line, file=self.stream, flush=True)
        self.printed_n = self.n

    def close(self) -> None:
        """Print the final line, unless the last interval line already showed this count (a slow
        last step can cross the interval and print it from ``update``)."""
        if not self.closed:
            self.closed = True
            if self.printed_n != self.n:
                self._print(time.monotonic())


def progress(total: int, desc: str, unit: str = "step", initial: int = 0, *, stream: TextIO | None = None):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a :class:`LineProgress`."""
    stream = stream if stream is not None else sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=stream)
    return LineProgress(total, desc, unit, initial, stream=stream)
