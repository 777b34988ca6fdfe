#!/usr/bin/env python3
"""Reference timing of the original Python inspect algorithm (Bioloop `generate_metadata`).

Usage: python3 benches/reference_inspect.py DIR

Reproduces the original's per-path work, in the same order, so the benchmark compares
against what the Python workers really do:
  1. `Path.rglob('*')` collected into a list first (the original needs the total for its
     progress bar);
  2. for every path, the readability check (`is_file()` then `os.access(R_OK)`, or
     `is_dir()` then `os.access(R_OK | X_OK)`);
  3. for files: `is_file()` again, `lstat().st_size`, MD5 with hashlib in 4096-byte reads,
     the relative path, a metadata row kept in memory, the genome-suffix test;
     for directories: `is_dir()` again and a count.
Left out (so this is a lower bound of the original's cost): the `du -sb` subprocess run
before the walk, the per-item progress updates and the HTTP calls that store the rows.

Prints one JSON line like the Rust benchmark driver:
{"op", "seconds", "bytes", "files", "peak_rss_kb", "directories"}.
Standard library only.
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

# The original's default `genome_file_types`, matched against all suffixes of a name.
GENOME_FILE_TYPES = [
    ".cbcl",
    ".bcl",
    ".bcl.gz",
    ".bgzf",
    ".fastq.gz",
    ".bam",
    ".bam.bai",
    ".vcf.gz",
    ".vcf.gz.tbi",
    ".vcf",
]


def checksum(path):
    # As the original: 4096-byte reads, so Python call overhead counts as it does there.
    m = hashlib.md5()
    with open(str(path), "rb") as f:
        for chunk in iter(lambda: f.read(4096), b""):
            m.update(chunk)
    return m.hexdigest()


def is_readable(path):
    if path.is_file() and os.access(str(path), os.R_OK):
        return True
    if path.is_dir() and os.access(str(path), os.R_OK | os.X_OK):
        return True
    return False


def generate_metadata(source):
    num_files, num_directories, size, num_genome_files = 0, 0, 0, 0
    metadata = []
    errors = []
    paths = list(source.rglob("*"))
    for p in paths:
        if is_readable(p):
            if p.is_file():
                num_files += 1
                file_size = p.lstat().st_size
                size += file_size
                hex_digest = checksum(p)
                relpath = p.relative_to(source)
                metadata.append({"path": str(relpath), "md5": hex_digest, "size": file_size})
                if "".join(p.suffixes) in GENOME_FILE_TYPES and not p.is_symlink():
                    num_genome_files += 1
            elif p.is_dir():
                num_directories += 1
        else:
            errors.append(f"{p} is not readable/traversable")
    return num_files, num_directories, size, num_genome_files, metadata, errors


def peak_rss_kb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main():
    if len(sys.argv) != 2:
        print("usage: reference_inspect.py DIR", file=sys.stderr)
        return 2
    source = Path(sys.argv[1]).resolve()
    if not source.is_dir():
        print(f"reference_inspect.py: `{source}` is not a directory", file=sys.stderr)
        return 1
    start = time.perf_counter()
    num_files, num_directories, size, _, metadata, errors = generate_metadata(source)
    seconds = time.perf_counter() - start
    if errors:
        print(f"reference_inspect.py: {len(errors)} unreadable entries, e.g. {errors[0]}", file=sys.stderr)
        return 1
    assert len(metadata) == num_files
    print(
        json.dumps(
            {
                "op": "reference-inspect",
                "seconds": seconds,
                "bytes": size,
                "files": num_files,
                "peak_rss_kb": peak_rss_kb(),
                "directories": num_directories,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
