"""Reading pclited's /metrics: Prometheus text exposition, and quantiles from histogram buckets.

The quantile follows PromQL's histogram_quantile(): find the bucket holding the rank, interpolate linearly inside
it (from 0 for the first bucket), and answer the highest finite bound when the rank falls in the +Inf bucket.
"""

from __future__ import annotations

import math
from collections import defaultdict

Labels = tuple[tuple[str, str], ...]


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by sample name (`pclite_boot_phase_seconds_bucket`, ...), each with its labels and value."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), float(sample.value)))
    return dict(samples)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """q in [0, 1] over cumulative (upper bound, count) buckets; None when there are no observations."""
    if not buckets:
        return None
    buckets = sorted(buckets)
    if not math.isinf(buckets[-1][0]):
        return None  # a histogram always has +Inf; without it the total is unknown
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for index, (bound, count) in enumerate(buckets):
        if count >= rank:
            if math.isinf(bound):
                return buckets[index - 1][0] if index > 0 else None
            if index == 0 and bound <= 0:
                return bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return None


def buckets_by(samples: dict, metric: str, group_by: tuple[str, ...],
               where: dict[str, str] | None = None) -> dict[Labels, list[tuple[float, float]]]:
    """A histogram's buckets summed per combination of `group_by` labels (like `sum by (...)` in PromQL)."""
    sums: dict[Labels, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, value in samples.get(f"{metric}_bucket", []):
        if where and any(labels.get(k) != v for k, v in where.items()):
            continue
        key = tuple((name, labels.get(name, "")) for name in group_by)
        sums[key][float(labels["le"])] += value
    return {key: sorted(by_le.items()) for key, by_le in sums.items()}


def total_by(samples: dict, name: str, group_by: tuple[str, ...]) -> dict[Labels, float]:
    sums: dict[Labels, float] = defaultdict(float)
    for labels, value in samples.get(name, []):
        sums[tuple((k, labels.get(k, "")) for k in group_by)] += value
    return dict(sums)
