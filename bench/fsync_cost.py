#!/usr/bin/env python3
"""What sled's fsync per log write costs per commit (BENCHMARKS.md, Durability).

Before issue 15 a commit was sled's pwrite + sync_file_range, then our
fdatasync; now sled's sync_file_range fails with ENOSYS (seccomp) and sled
fsyncs instead. This times both sequences on one file in the current
directory: python3 bench/fsync_cost.py [COMMITS] [ROUNDS]
"""
import ctypes
import os
import sys
import time

LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
# SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER, as sled calls it.
SYNC_FILE_RANGE_FLAGS = 1 | 2 | 4


def commits_per_second(kind: str, commits: int) -> float:
    path = f"fsync-cost-{kind}.tmp"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    record = os.urandom(3000)
    offset = 0
    started = time.perf_counter()
    for _ in range(commits):
        os.pwrite(fd, record, offset)
        if kind == "sync_file_range":
            rc = LIBC.sync_file_range(
                fd, ctypes.c_longlong(offset), ctypes.c_longlong(len(record)),
                SYNC_FILE_RANGE_FLAGS)
            if rc != 0:
                raise OSError(ctypes.get_errno(), "sync_file_range")
        else:
            os.fsync(fd)
        os.fdatasync(fd)
        offset += len(record)
    elapsed = time.perf_counter() - started
    os.close(fd)
    os.unlink(path)
    return commits / elapsed


def main() -> None:
    commits = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    for round_ in range(1, rounds + 1):
        for kind in ("sync_file_range", "fsync"):
            rate = commits_per_second(kind, commits)
            print(f"round {round_}: pwrite + {kind} + fdatasync: {rate:,.0f} commits/s",
                  flush=True)


if __name__ == "__main__":
    main()
