"""Triton's perf_analyzer, the load tool Triton's users measure with, against the real server:
over REST and gRPC, a batching model and a pipeline (whose config it reads as an ensemble's and
walks). scripts/install-perf-analyzer.sh installs it into .tools/perf_analyzer/; without it these
tests skip, unless SLUICE_REQUIRE_PERF_ANALYZER=1 (as scripts/test.sh sets)."""
import csv
import os
import subprocess
import urllib.request

import pytest

from conftest import ROOT

TOOL = ROOT / ".tools" / "perf_analyzer"


def perf_analyzer(sluice, tmp_path, protocol, model, *extra):
    """Runs perf_analyzer at concurrency 1 and 2, windows of 30 requests; its CSV rows."""
    binary = TOOL / "perf_analyzer"
    if not binary.exists():
        if os.environ.get("SLUICE_REQUIRE_PERF_ANALYZER") == "1":
            pytest.fail("perf_analyzer is not installed (scripts/install-perf-analyzer.sh)")
        pytest.skip("perf_analyzer is not installed (scripts/install-perf-analyzer.sh)")
    report = tmp_path / f"{protocol}-{model}.csv"
    url = sluice.http if protocol == "http" else sluice.grpc
    cmd = [str(binary), "-m", model, "-u", url, "-i", protocol, "--concurrency-range", "1:2",
           "--measurement-mode", "count_windows", "--measurement-request-count", "30",
           "--max-trials", "5", "-s", "1000", "-f", str(report), *extra]
    env = {**os.environ, "LD_LIBRARY_PATH": str(TOOL / "lib")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, f"perf_analyzer exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    assert "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    with open(report) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model,extra", [
    # A batching model, batches of 4 (its config's max_batch_size is 8).
    ("iris", ["-b", "4"]),
    # A pipeline: `platform: ensemble`, its steps walked from `ensemble_scheduling` (it crashed
    # without them); random text for its BYTES input.
    ("embeddings", ["--shape", "text:2"]),
])
def test_perf_analyzer_measures_the_server(sluice, tmp_path, protocol, model, extra):
    """Every request answered (perf_analyzer stops at the first failure: over gRPC each failed
    while its client's `triton_enable_empty_final_response` was refused), both concurrencies
    measured, and the server ready after."""
    rows = perf_analyzer(sluice, tmp_path, protocol, model, *extra)
    assert [row["Concurrency"] for row in rows] == ["1", "2"], rows
    assert all(float(row["Inferences/Second"]) > 0 for row in rows), rows
    assert urllib.request.urlopen(f"http://{sluice.http}/v2/health/ready", timeout=5).status == 200
