#!/usr/bin/env python3
"""Benchmark data for benches/run.sh. Standard library only.

Usage:
  generate.py file    PATH SIZE_MIB    one file of random bytes
  generate.py inspect DIR FILES        FILES files of 4 KiB in 100 directories
  generate.py archive DIR SIZE_MIB     a sequencing-run-like mix of large, medium and small files
  generate.py tiny    DIR FILES        FILES files of 16-64 bytes in 1000 directories

All content is random (os.urandom), so nothing compresses or deduplicates. Everything is
written under a `.partial` sibling and renamed into place at the end: a path that exists is
complete, and an interrupted run leaves only the `.partial` sibling, which run.sh removes.
"""

import os
import random
import sys

MIB = 1 << 20
KIB = 1 << 10
# Large writes keep generation fast; the data is read back by the benchmarks anyway.
WRITE_CHUNK = 4 * MIB


def write_random(path, size):
    with open(path, "xb") as f:
        left = size
        while left > 0:
            n = min(left, WRITE_CHUNK)
            f.write(os.urandom(n))
            left -= n


def spread(root, count, per_dir_names, per_dir_count):
    """Yields (path, index) for `count` files spread over directories of `per_dir_count`."""
    for i in range(count):
        d = os.path.join(root, per_dir_names(i // per_dir_count))
        if i % per_dir_count == 0:
            os.makedirs(d, exist_ok=True)
        yield os.path.join(d, f"f{i:07d}.dat"), i


def gen_file(path, size_mib):
    write_random(path, size_mib * MIB)


def gen_inspect(root, files):
    os.makedirs(root)
    dirs = 100
    per_dir = max(1, -(-files // dirs))
    for path, _ in spread(root, files, lambda d: f"d{d:03d}", per_dir):
        write_random(path, 4 * KIB)


def gen_tiny(root, files):
    """Many tiny files fast: one process, raw os.open/os.write, content sliced from a pool."""
    os.makedirs(root)
    dirs = 1000
    per_dir = max(1, -(-files // dirs))
    pool = os.urandom(4 * MIB)
    sizes = random.Random(7)
    offset = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for path, _ in spread(root, files, lambda d: f"d{d:04d}", per_dir):
        n = sizes.randint(16, 64)
        if offset + n > len(pool):
            offset = 0
        fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, pool[offset : offset + n])
        finally:
            os.close(fd)
        offset += n


def gen_archive(root, size_mib):
    """Like a sequencing run: 62.5 % in 4 large files, 25 % in 1-4 MiB files, 12.5 % in
    4-64 KiB files (at 2048 MiB: 4 x 320 MiB, about 200 medium and 7,500 small files)."""
    total = size_mib * MIB
    layout = random.Random(42)
    os.makedirs(root)

    large = os.path.join(root, "fastq")
    os.makedirs(large)
    large_each = total * 5 // 8 // 4
    for k in range(1, 5):
        name = f"Sample{k}_S{k}_L001_R1_001.fastq.gz"
        write_random(os.path.join(large, name), large_each)

    def fill(subdir, budget, low, high, per_dir):
        i = 0
        while budget > 0:
            size = min(budget, layout.randint(low, high))
            d = os.path.join(root, subdir, f"{i // per_dir:03d}")
            if i % per_dir == 0:
                os.makedirs(d)
            write_random(os.path.join(d, f"{subdir}_{i:05d}.bin"), size)
            budget -= size
            i += 1

    fill("medium", total // 4, 1 * MIB, 4 * MIB, 50)
    fill("small", total - 4 * large_each - total // 4, 4 * KIB, 64 * KIB, 500)


def main():
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    kind, target, amount = sys.argv[1], sys.argv[2].rstrip("/"), int(sys.argv[3])
    generators = {"file": gen_file, "inspect": gen_inspect, "archive": gen_archive, "tiny": gen_tiny}
    if kind not in generators or amount < 1:
        print(__doc__, file=sys.stderr)
        return 2
    if os.path.lexists(target):
        print(f"generate.py: `{target}` exists already", file=sys.stderr)
        return 1
    partial = target + ".partial"
    generators[kind](partial, amount)
    os.rename(partial, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
