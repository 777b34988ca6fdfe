#!/usr/bin/env bash
# Builds the data_path benchmark driver (release, `cargo bench --no-run`) and prints the path of
# its binary: the benchmark scripts call it directly, so that no timing includes cargo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo bench --locked --bench data_path --no-run --message-format=json-render-diagnostics |
    python3 -c '
import json, sys
exe = ""
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "data_path" and msg.get("executable"):
        exe = msg["executable"]
print(exe)
'
