"""What a long stage shows while it runs: a tqdm bar on a terminal, one line per stage otherwise.

A log file or a CI console gets ``merge ... 387 MB in 3.1 s`` (the start of the line is written
when the stage starts, the rest when it ends) instead of a bar redrawn with carriage returns.
Every stage of merge, convert, quantize, fidelity and the llama.cpp build goes through `stage`.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float, digits: int = 1) -> str:
    """Bytes for people, in SI units (1 kB = 1000 B, 1 MB = 1000 kB, ...): the one size format."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{int(n)} B" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1000
    return f"{n} B"


def human_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


class Stage:
    """One stage of work with a known or unknown amount (``total``) in ``unit``s.

    ``update``/``set`` move it on; ``close`` (or leaving the ``with`` block) ends it. On a terminal
    it is a tqdm bar (``bar``: default when ``total`` is known); otherwise, and for short stages
    without a bar, ``desc ...`` when it starts and ``<n> <unit> in <time>`` when it ends.
    """

    def __init__(self, desc: str, *, total: float | None = None, unit: str = "it", bytes_: bool = False,
                 enabled: bool = True, bar: bool | None = None, stream: TextIO | None = None):
        self.desc, self.total, self.unit, self.bytes = desc, total, unit, bytes_
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.n = 0
        self.start = time.perf_counter()
        self.closed = False
        self.bar = None
        if not enabled:
            return
        isatty = getattr(self.stream, "isatty", None)
        if isatty is not None and isatty() and (bar if bar is not None else total is not None):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="B" if bytes_ else unit, unit_scale=bytes_,
                            file=self.stream, dynamic_ncols=True, leave=True)
        else:
            self.stream.write(f"{desc} ...")
            self.stream.flush()

    def set_total(self, total: float) -> None:
        self.total = total
        if self.bar is not None and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()

    def update(self, n: float = 1) -> None:
        self.set(self.n + n)

    def set(self, n: float) -> None:
        """Move to ``n`` done (counts from tools that print "[n/total]")."""
        if self.bar is not None and n != self.n:
            self.bar.update(n - self.n)
        self.n = n

    def done_text(self) -> str:
        took = human_seconds(time.perf_counter() - self.start)
        if not self.n and self.total is None:
            return f"done in {took}"
        amount = human_bytes(self.n) if self.bytes else f"{self.n:g} {self.unit}"
        return f"{amount} in {took}"

    def close(self, *, failed: BaseException | None = None, note: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.close()
            if failed is not None:
                self.stream.write(f"{self.desc}: failed ({type(failed).__name__})\n")
        elif self.enabled:
            text = f"failed ({type(failed).__name__}) after {human_seconds(time.perf_counter() - self.start)}" \
                if failed is not None else self.done_text()
            self.stream.write(f" {text}{'; ' + note if note else ''}\n")
        if self.enabled:
            self.stream.flush()

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc)

