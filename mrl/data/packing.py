"""Packing several short sequences into fixed-capacity rows (best-fit decreasing)."""

from __future__ import annotations

import bisect


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins whose total length is at most ``capacity``.

    Items are placed longest first, each into the bin with the least room that still fits it
    (a new bin when none does). Deterministic: ties go to the lower index. Indices inside a bin
    are returned in ascending order.
    """
    if any(length > capacity or length < 1 for length in lengths):
        raise ValueError(f"every length must be in [1, {capacity}] to be packed")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index)
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[item]
        pos = bisect.bisect_left(free, (size, -1))
        if pos == len(free):
            bins.append([item])
            bisect.insort(free, (capacity - size, len(bins) - 1))
        else:
            room, index = free.pop(pos)
            bins[index].append(item)
            bisect.insort(free, (room - size, index))
    return [sorted(b) for b in bins]
