#!/usr/bin/env python3
"""The MiniLM embeddings pipeline (examples/embeddings.yaml) on a release `sluice`:

1. Embeddings equal the references in ../shared/models/minilm/samples.json (cosine).
2. Sentences/s at concurrency 64 through the pipeline (sluice-loadtest, OIP BYTES input) as a
   ratio of in-process tokenizers + raw ONNX Runtime + pooling at the same batch size
   (deployments/examples/raw_pipeline.rs), same run.

  python3 scripts/bench_pipeline.py [--duration 10]   (after the release builds; needs the MiniLM files)
Writes bench-results/pipeline.md. Everything targets 127.0.0.1 and stops by itself.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REL = ROOT / "target" / "release"
MINILM = Path(os.environ.get("SLUICE_MINILM_DIR", ROOT.parent / "shared" / "models" / "minilm"))
HTTP = 18300


def post(path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{HTTP}{path}", data=json.dumps(body).encode())
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def stats(model):
    with urllib.request.urlopen(f"http://127.0.0.1:{HTTP}/v2/models/{model}/stats") as r:
        s = json.load(r)["model_stats"][0]
    return s["inference_count"], s["execution_count"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    args = ap.parse_args()
    if not (MINILM / "model.onnx").is_file():
        print(f"skipped: no MiniLM at {MINILM} (set SLUICE_MINILM_DIR)", file=sys.stderr)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = json.loads((MINILM / "samples.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        text = (ROOT / "examples" / "embeddings.yaml").read_text()
        text = text.replace("../../shared/models/minilm", str(MINILM)).replace("port: 8000", f"port: {HTTP}")
        cfg = Path(tmp) / "embeddings.yaml"
        cfg.write_text(text + "grpc_options: {enabled: false}\nadmin_options: {enabled: false}\n")
        proc = subprocess.Popen([str(REL / "sluice"), "run", str(cfg)], stderr=subprocess.DEVNULL,
                                env={**os.environ, "RUST_LOG": "warn"})
        try:
            for _ in range(600):
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{HTTP}/v2/health/ready", timeout=1).status == 200:
                        break
                except OSError:
                    time.sleep(0.1)
            lines = ["# MiniLM-L6 embeddings pipeline", ""]
            cosines = []
            for case in samples["cases"]:
                got = post("/embed", {"text": case["texts"]})["embeddings"]
                t = case["sentence_embedding"]
                dim = t["shape"][-1]
                want = [t["data"][i:i + dim] for i in range(0, len(t["data"]), dim)]
                for g, w in zip(got, want):
                    dot = sum(a * b for a, b in zip(g, w))
                    cosines.append(dot / math.sqrt(sum(a * a for a in g) * sum(b * b for b in w)))
            lines.append(f"1. Cosine to the reference embeddings of samples.json ({len(cosines)} sentences, one request per "
                         f"case): min **{min(cosines):.7f}** ({', '.join(f'{c:.7f}' for c in cosines)}).")
            sentence = samples["cases"][0]["texts"][0]
            sample = Path(tmp) / "sentence.json"
            sample.write_text(json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [sentence]}]}))
            before = stats("minilm")
            subprocess.run([str(REL / "sluice-loadtest"), "--url", f"127.0.0.1:{HTTP}", "-m", "embeddings", "-p", "rest-binary",
                            "--input-data", str(sample), "--concurrency", "64", "--duration", f"{args.duration}s",
                            "--warmup", "2s", "--quiet", "--output-dir", tmp], check=True, capture_output=True)
            after = stats("minilm")
            step = json.loads((Path(tmp) / "report.json").read_text())["steps"][0]
            batch = (after[0] - before[0]) / max(1, after[1] - before[1])
        finally:
            proc.terminate()
            proc.wait(30)
        b = max(1, round(batch))
        raw = json.loads(subprocess.run(
            [str(REL / "examples" / "raw_pipeline"), str(MINILM / "model.onnx"), str(MINILM / "tokenizer.json"), str(b), "5", sentence],
            check=True, capture_output=True, text=True, env={**os.environ, "ORT_DYLIB_PATH": str(ROOT / ".ort" / "libonnxruntime.so")},
        ).stdout.strip().splitlines()[-1])
        ratio = step["inferences_per_second"] / raw["sentences_per_s"]
        lines.append(
            f"2. Concurrency 64 through the pipeline (\"{sentence}\", REST binary BYTES input, {args.duration} s): "
            f"**{step['throughput']:.0f} sentences/s**, p50 {step['latency_us']['p50'] / 1000:.1f} ms, p99 "
            f"{step['latency_us']['p99'] / 1000:.1f} ms, errors {step['errors']}; the encoder ran batches of {batch:.1f} on average. "
            f"In-process tokenizers + ONNX Runtime + pooling at batch {b}: {raw['sentences_per_s']:.0f} sentences/s. "
            f"Ratio **{ratio:.2f}**.")
    text = "\n".join(lines) + "\n"
    (out / "pipeline.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
