"""The UI's BLAKE3 upload manifest (ui/src/services/upload/checksum.js), written again from its
rules alone, with the `blake3` package from PyPI: the reference the Rust manifest is compared
with.

Rules: every regular file below ROOT (links are neither listed nor followed), its path relative
to ROOT with '/' (backslashes rewritten, as the UI does), sorted as JavaScript's `<` sorts
strings, that is by UTF-16 code units; the text is `blake3-manifest-v1` then one line
`<path>\\t<size>\\t<blake3 hex of the content>` per file, joined by '\\n' with no trailing
newline; the manifest hash is the BLAKE3 hex of the UTF-8 text.

Usage: upload_manifest.py ROOT
Prints one JSON document: {"hash", "text", "files", "bytes"}.
"""

import json
import os
import stat
import sys

import blake3


def regular_files(root):
    for directory, subdirs, names in os.walk(root, followlinks=False):
        # os.walk lists links to directories among the subdirectories but does not enter
        # them; as names they are not regular files either.
        for name in names + subdirs:
            full = os.path.join(directory, name)
            if stat.S_ISREG(os.lstat(full).st_mode):
                yield full


def content_hash(path):
    hasher = blake3.blake3()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            hasher.update(chunk)
    return hasher.hexdigest(), os.path.getsize(path)


def main():
    root = sys.argv[1]
    lines = []
    total = 0
    for full in regular_files(root):
        rel = os.path.relpath(full, root).replace(os.sep, "/").replace("\\", "/")
        digest, size = content_hash(full)
        total += size
        lines.append((rel, size, digest))
    # JavaScript compares strings by UTF-16 code units; big-endian UTF-16 bytes compare alike.
    lines.sort(key=lambda line: line[0].encode("utf-16-be"))
    text = "\n".join(
        ["blake3-manifest-v1"] + [f"{rel}\t{size}\t{digest}" for rel, size, digest in lines]
    )
    print(
        json.dumps(
            {
                "hash": blake3.blake3(text.encode("utf-8")).hexdigest(),
                "text": text,
                "files": len(lines),
                "bytes": total,
            }
        )
    )


if __name__ == "__main__":
    main()
