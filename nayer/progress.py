"""Progress for long work that stays readable where carriage-return bars do not: Ray's log forwarding (every
worker line arrives prefixed, out of order with other workers), `ray job logs`, and sbatch output files.

On a terminal the round loop shows a tqdm bar; anywhere else it prints one line per round. Workers never draw
bars: `LineProgress` prints a plain line every `interval` seconds, and only for phases that last that long. Other
long work (teacher training, a single-process run's synthesis and KD phases) takes `progress_bar`: a bar on a
terminal, those plain lines anywhere else.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")

# The round line: (metrics.jsonl key, shown as, format). agree / teacher_ce: how the teacher rates the round's kept
# images (nayer.metrics); top1: the student on the labeled set.
ROUND_FIELDS = (("top1", "top1", "{:.2f}"), ("syn_agreement", "agree", "{:.0f}%"),
                ("syn_teacher_ce", "teacher_ce", "{:.2f}"), ("kd_loss", "kd_loss", "{:.3f}"), ("buffer", "buffer", "{}"))


def round_fields(record: dict) -> dict[str, str]:
    """The round line's fields of a metrics record, formatted (missing ones left out)."""
    return {label: fmt.format(record[key]) for key, label, fmt in ROUND_FIELDS if record.get(key) is not None}


class LineProgress:
    """tqdm's `update`/`close` interface, printing `desc: n/total unit (pct%), rate` lines instead of a bar:
    at most one per `interval` seconds, plus a closing line if any was printed and it did not show the end yet
    (short phases stay silent)."""

    def __init__(self, total: int, desc: str, unit: str = "step", interval: float = 30.0,
                 write: Callable[[str], None] = print):
        self.total, self.desc, self.unit, self.interval, self.write = total, desc, unit, interval, write
        self.n, self.start = 0, time.perf_counter()
        self.last = self.start
        self.printed = -1  # the count the last line showed (-1: none yet)
        self.postfix = ""

    def _line(self, now: float) -> None:
        rate = self.n / max(now - self.start, 1e-9)
        pct = 100 * self.n / self.total if self.total else 100.0
        self.write(f"{self.desc}: {self.n}/{self.total} {self.unit}s ({pct:.0f}%), {rate:.2f} {self.unit}s/s, "
                   f"{now - self.start:.0f}s{self.postfix}")
        self.printed, self.last = self.n, now

    def set_postfix(self, **values) -> None:
        """Shown at the end of the next line, as tqdm shows it after the bar."""
        self.postfix = "".join(f", {k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self._line(now)

    def close(self) -> None:
        if 0 <= self.printed < self.n:  # a closing line, unless the last line already showed the end
            self._line(time.perf_counter())


def progress_bar(total: int, desc: str, unit: str = "step", leave: bool = True) -> tqdm | LineProgress:
    """A tqdm bar where a person watches a terminal (tqdm draws on stderr; `leave=False`: erased when done), else
    plain lines (`LineProgress`)."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return LineProgress(total, desc, unit)


def tracked(items: Iterable[T], bar: tqdm | LineProgress) -> Iterator[T]:
    """`items`, counting each on `bar`, which is closed after the last."""
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()


class RoundProgress:
    """The round loop's display: a tqdm bar on a terminal, else one line per finished round."""

    def __init__(self, name: str, start: int, total: int, unit: str = "round"):
        self.name, self.total, self.unit = name, total, unit
        self.bar = tqdm(desc=name, unit=unit, initial=start, total=total, dynamic_ncols=True) \
            if sys.stdout.isatty() else None

    def round_done(self, record: dict) -> None:
        shown = round_fields(record)
        if self.bar is not None:
            self.bar.set_postfix(shown)
            self.bar.update()
            return
        fields = " ".join(f"{k}={v}" for k, v in shown.items())
        print(f"{self.name} {self.unit} {record['epoch'] + 1}/{self.total} [{record['phase']}] {fields} "
              f"elapsed={record['elapsed']:.0f}s", flush=True)

    def write(self, message: str) -> None:
        if self.bar is not None:
            tqdm.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
