"""A histogram from a Prometheus text scrape, and its quantiles as Prometheus estimates them.

The bench reads dbmux's borrow wait (DatabaseConnectionsBorrowLatency) from its admin /metrics
after a run; the quantile is what `histogram_quantile()` would say over the same buckets, so
it can be checked against a Prometheus server's dashboard.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# `name{label="value",...} 123` (the labels optional; a trailing timestamp ignored).
_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def buckets(text: str, name: str) -> list[tuple[float, float]]:
    """Histogram `name`'s cumulative buckets as (upper bound, count), +Inf last, summed over
    its label sets (a histogram per proxy, say); [] if the scrape has none."""
    totals: dict[float, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m.group(1) != f"{name}_bucket":
            continue
        le = dict(_LABEL.findall(m.group(2) or "")).get("le")
        if le is None:
            continue
        bound = float(le)  # "+Inf" parses
        totals[bound] = totals.get(bound, 0.0) + float(m.group(3))
    return sorted(totals.items())


@dataclass(frozen=True)
class Estimate:
    """A quantile's estimate and the bucket it lies in, which is all the histogram knows."""

    value: float
    lower: float
    upper: float


def quantile(q: float, cumulative: list[tuple[float, float]]) -> Estimate | None:
    """Prometheus's histogram_quantile(q): linear within the bucket the q-th observation falls
    in (from 0 for the first bucket); in +Inf's, the highest finite bound. None: no data."""
    if not cumulative or not math.isinf(cumulative[-1][0]) or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return Estimate(lower, lower, bound)
            share = (rank - below) / (count - below) if count > below else 1.0
            return Estimate(lower + (bound - lower) * share, lower, bound)
        lower, below = bound, count
    return None  # unreachable: +Inf's count is the total
