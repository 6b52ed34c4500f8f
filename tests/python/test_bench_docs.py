"""scripts/bench_docs.py: `make bench-docs` replaces only docs/benchmarks.md's generated part."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_docs.py"
BEGIN = "<!-- make bench-docs writes from here -->"
END = "<!-- make bench-docs writes to here -->"
HEAD = "# Benchmarks\n\nWhat this file holds.\n\n"
HAND = "\n\n## A change measured by hand (2026-12-01)\n\nbefore 10, after 8.\n\n## Another (2026-12-02)\n\n| a | b |\n"


def run(doc, results, flamegraphs):
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--doc", str(doc), "--results", str(results), "--flamegraphs", str(flamegraphs)],
        capture_output=True, text=True,
    )


def setup(tmp_path, doc_text):
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text(doc_text)
    results = tmp_path / "bench-results"
    results.mkdir()
    flamegraphs = doc.parent / "flamegraphs"
    flamegraphs.mkdir()
    return doc, results, flamegraphs


def test_the_generated_part_is_replaced_and_the_hand_written_sections_kept(tmp_path):
    doc, results, flamegraphs = setup(tmp_path, f"{HEAD}{BEGIN}\n\n## Old report\n\nold numbers\n\n{END}{HAND}")
    (results / "report.md").write_text("# Sluice benchmark report\n\nnew numbers\n\n## iris\n\n| x |\n")
    (results / "floor.md").write_text("# Sluice's own path against the floor\n\nfloor numbers\n")
    (flamegraphs / "this-c64.svg").write_text("<svg/>")
    r = run(doc, results, flamegraphs)
    assert r.returncode == 0, r.stderr
    text = doc.read_text()
    assert text.startswith(HEAD + BEGIN)
    assert text.endswith(END + HAND)
    generated = text[len(HEAD + BEGIN):-len(END + HAND)]
    assert "old numbers" not in generated
    # Each report's headings one level down, in the reports' order, then the flamegraphs.
    assert generated.index("## Sluice benchmark report\n\nnew numbers") < generated.index("### iris")
    assert generated.index("### iris") < generated.index("## Sluice's own path against the floor\n\nfloor numbers")
    assert "- this: [flamegraphs/this-c64.svg](flamegraphs/this-c64.svg)" in generated
    assert "before-c64" not in generated
    # Run again on its own output: the same file.
    assert run(doc, results, flamegraphs).returncode == 0
    assert doc.read_text() == text


def test_a_doc_without_both_markers_is_left_unchanged(tmp_path):
    for broken in (f"{HEAD}## Old report\n{HAND}", f"{HEAD}{BEGIN}\n## Old report\n{HAND}",
                   f"{HEAD}{BEGIN}\n{END}\n{BEGIN}\n{END}{HAND}"):
        doc, results, flamegraphs = setup(tmp_path, broken)
        (results / "report.md").write_text("# Sluice benchmark report\n\nnew numbers\n")
        r = run(doc, results, flamegraphs)
        assert r.returncode != 0
        assert "marker line" in r.stderr and "left unchanged" in r.stderr, r.stderr
        assert doc.read_text() == broken
        for p in sorted(tmp_path.rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()


def test_no_reports_is_an_error_and_changes_nothing(tmp_path):
    original = f"{HEAD}{BEGIN}\n\n## Old report\n\n{END}{HAND}"
    doc, results, flamegraphs = setup(tmp_path, original)
    r = run(doc, results, flamegraphs)
    assert r.returncode != 0
    assert "no reports" in r.stderr, r.stderr
    assert doc.read_text() == original
