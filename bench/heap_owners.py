#!/usr/bin/env python3
"""Sums a jemalloc heap profile by the code that allocated.

    jeprof --collapsed --nodefraction=0 --edgefraction=0 --nodecount=100000 \\
        target/release/sse-gateway gw.<pid>.<n>.i<n>.heap > late.folded
    python3 bench/heap_owners.py late.folded              # top owners
    python3 bench/heap_owners.py early.folded late.folded  # what changed

Each stack is charged to its innermost frame outside the allocator and the
standard library (`alloc::`, `core::`, `std::`, jemalloc's own), so
`Vec::with_capacity` called from `sled::arc::Arc::copy_from_slice` counts
for the latter. Used for BENCHMARKS.md "Soak: sixth hour".
"""
import collections
import re
import sys

SKIP = re.compile(r"(_?rjem|prof_|imalloc|irallocx|alloc::|core::|std::|<alloc|<core|<std|__rust)")


def owner(stack):
    for frame in reversed(stack.split(";")):
        name = re.sub(r"<[0-9a-f]+>$", "", frame).replace("[inline]", "")
        if SKIP.match(name):
            continue
        return name[:140]
    return "?"


def load(path):
    totals = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, value = line.rstrip().rpartition(" ")
            if stack:
                totals[owner(stack)] += int(value)
    return totals


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    first = load(sys.argv[1])
    if len(sys.argv) == 2:
        print(f"total {sum(first.values()) >> 10} KiB")
        for name, size in first.most_common(20):
            print(f"{size >> 10:>8} KiB  {name}")
        return
    second = load(sys.argv[2])
    print(f"total {sum(first.values()) >> 10} -> {sum(second.values()) >> 10} KiB")
    rows = sorted(((second[k] - first[k], k) for k in set(first) | set(second)),
                  key=lambda r: -abs(r[0]))
    for change, name in rows[:20]:
        print(f"{change >> 10:>+8} KiB  {first[name] >> 10:>7} -> {second[name] >> 10:>7}  {name}")


if __name__ == "__main__":
    main()
