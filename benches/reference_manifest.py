#!/usr/bin/env python3
"""Reference timing of the original Python BLAKE3 manifest check (Bioloop
`workers/upload.py`, `_compute_manifest_hash`, spec C.5.3), for benches/manifest.sh.

Usage: python3 benches/reference_manifest.py DIR

Does the original's per-file work, in the same order, so the benchmark compares against what
the Python verifier really does:
  1. `Path.rglob('*')` filtered with `is_file()`, collected and sorted (as `Path` objects, the
     original's order: on the benchmark's plain ASCII names it is also the UI's);
  2. per file: `stat()` for the progress line, BLAKE3 (the `blake3` package) in 16 MiB reads,
     the relative path, `stat()` again for the manifest line;
  3. the manifest text joined by '\\n' and its BLAKE3.
Left out (so this is a lower bound of the original's cost): the two lines it prints per file,
the interpreter start-up and the HTTP calls around the check.

Prints one JSON line: {"op", "seconds", "hash", "files", "bytes", "peak_rss_kb"}.
Needs the `blake3` package (pip install blake3).
"""

import json
import resource
import sys
import time
from pathlib import Path

import blake3

CHUNK_SIZE = 16 * 1024 * 1024


def manifest_hash(origin):
    files = sorted(f for f in origin.rglob("*") if f.is_file())
    if not files:
        raise SystemExit(f"no files found at {origin}")
    lines = ["blake3-manifest-v1"]
    total = 0
    for path in files:
        path.stat()  # the original's progress line shows the size
        hasher = blake3.blake3()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                hasher.update(chunk)
        rel = str(path.relative_to(origin)).replace("\\", "/")
        size = path.stat().st_size
        total += size
        lines.append(f"{rel}\t{size}\t{hasher.hexdigest()}")
    text = "\n".join(lines)
    return blake3.blake3(text.encode("utf-8")).hexdigest(), len(files), total


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    start = time.perf_counter()
    digest, files, total = manifest_hash(Path(sys.argv[1]))
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "op": "python-manifest",
                "seconds": round(seconds, 6),
                "hash": digest,
                "files": files,
                "bytes": total,
                "peak_rss_kb": rss,
            }
        )
    )


if __name__ == "__main__":
    main()
