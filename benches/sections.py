"""Writes one benchmark's section of BENCHMARKS.md: the text between its markers
(`<!-- NAME:begin -->` and `<!-- NAME:end -->`) is replaced, or the section is appended. The
benchmark scripts that each own one section share this; benches/report.py rewrites the rest of
the file around them."""

import os

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "BENCHMARKS.md")


def write_section(name, section):
    """`section` includes its own begin and end markers."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    with open(BENCHMARKS) as f:
        text = f.read()
    if begin in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(BENCHMARKS, "w") as f:
        f.write(text)
