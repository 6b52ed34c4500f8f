#!/usr/bin/env python3
"""Writes the generated part of docs/benchmarks.md from the benchmarks' reports, keeping the rest.

docs/benchmarks.md holds two kinds of text: the reports that `make bench-docs` produces
(bench-results/{report,floor,control,pipeline,routing}.md and the flamegraph links), and the
sections measured and written by hand around them (each change's before/after, dated). Only
the text between the two marker lines below is replaced; a file without exactly one of each is
left unchanged and the script fails, naming what is missing.

  python3 scripts/bench_docs.py                       # what `make bench-docs` runs last
  python3 scripts/bench_docs.py --doc OTHER.md --results DIR --flamegraphs DIR
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- make bench-docs writes from here -->"
END = "<!-- make bench-docs writes to here -->"
REPORTS = ["report", "floor", "control", "pipeline", "routing"]


def generated(results: Path, flamegraphs: Path, doc: Path) -> str:
    """The reports found in `results`, each heading one level down, then the flamegraphs."""
    parts = []
    for name in REPORTS:
        report = results / f"{name}.md"
        if report.is_file():
            text = report.read_text()
            parts.append("\n".join("#" + line if line.startswith("#") else line for line in text.splitlines()))
    links = []
    for name in ("before", "this"):
        svg = flamegraphs / f"{name}-c64.svg"
        if svg.is_file():
            rel = os.path.relpath(svg, doc.parent)
            links.append(f"- {name}: [{rel}]({rel})")
    if links:
        parts.append(
            "## Flamegraphs\n\nWhere the server's CPU time goes at 64 connections (tiny MLP, 2 replicas, "
            "REST JSON, wrk), from `scripts/flamegraph.sh` (perf, DWARF stacks, inferno). Open the SVGs "
            "in a browser to zoom.\n\n" + "\n".join(links))
    return "\n\n".join(parts)


def splice(text: str, block: str) -> str:
    """`text` with what lies between its markers replaced by `block`."""
    for marker in (BEGIN, END):
        count = text.count(marker)
        if count != 1:
            raise ValueError(f"the marker line `{marker}` appears {count} times (want exactly once)")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n\n{block.strip()}\n\n{END}{tail}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--results", type=Path, default=ROOT / "bench-results")
    ap.add_argument("--flamegraphs", type=Path, default=ROOT / "docs" / "flamegraphs")
    args = ap.parse_args()
    block = generated(args.results, args.flamegraphs, args.doc)
    if not block:
        sys.exit(f"no reports in {args.results}: run the benchmarks first (make bench-docs)")
    try:
        text = splice(args.doc.read_text(), block)
    except (OSError, ValueError) as e:
        sys.exit(f"{args.doc}: {e}; left unchanged")
    args.doc.write_text(text)
    print(f"{args.doc}: generated part rewritten from {args.results}")


if __name__ == "__main__":
    main()
