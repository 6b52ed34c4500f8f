#!/usr/bin/env python3
"""The MiniLM embeddings pipeline (examples/embeddings.yaml) on a release `sluice`:

1. Embeddings equal the references in ../shared/models/minilm/samples.json (cosine).
2. Sentences/s at concurrency 64 through the pipeline (sluice-loadtest, OIP BYTES input) as a
   ratio of in-process tokenizers + raw ONNX Runtime + pooling (deployments/examples/raw_pipeline.rs)
   at the encoder's mean batch size in that run. The server runs the three steps on three
   replica threads that overlap, so the baseline the ratio is taken against does too
   (`pipelined`: one thread per stage, bounded hand-over); the one-thread baseline
   (`sequential`) is reported beside it. Repeated --repeat times (default 3), each repetition an
   unmeasured warm-up run, the served run between two /stats reads (warm-up excluded), then both
   baselines; medians with [min-max].

  python3 scripts/bench_pipeline.py        # after the release builds; needs the MiniLM files
  python3 scripts/bench_pipeline.py --duration 1 --raw-duration 1 --warmup 0.5   # quick check
Writes bench-results/pipeline.md. Everything targets 127.0.0.1 and stops by itself.
"""
import argparse
import json
import math
import os
import statistics
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
    """Model calls by batch size so far (Triton's batch_stats)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{HTTP}/v2/models/{model}/stats") as r:
        s = json.load(r)["model_stats"][0]
    return {b["batch_size"]: b["compute_infer"]["count"] for b in s["batch_stats"]}


def spread(values, fmt="{:.0f}"):
    """`median [min-max]` of the repetitions."""
    med = fmt.format(statistics.median(values))
    return med if len(values) == 1 else f"{med} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def loadtest(sample, duration, out):
    subprocess.run([str(REL / "sluice-loadtest"), "--url", f"127.0.0.1:{HTTP}", "-m", "embeddings", "-p", "rest-binary",
                    "--input-data", str(sample), "--concurrency", "64", "--duration", f"{duration:g}s",
                    "--warmup", "0s", "--quiet", "--output-dir", out], check=True, capture_output=True)
    return json.loads((Path(out) / "report.json").read_text())["steps"][0]


def raw_pipeline(batch, seconds, sentence, mode):
    return json.loads(subprocess.run(
        [str(REL / "examples" / "raw_pipeline"), str(MINILM / "model.onnx"), str(MINILM / "tokenizer.json"), str(batch),
         str(seconds), sentence, mode],
        check=True, capture_output=True, text=True, env={**os.environ, "ORT_DYLIB_PATH": str(ROOT / ".ort" / "libonnxruntime.so")},
    ).stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10, help="seconds of each served run")
    ap.add_argument("--raw-duration", type=float, default=5, help="seconds of each baseline run")
    ap.add_argument("--warmup", type=float, default=2, help="seconds of the unmeasured run before each")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--binary", default=str(REL / "sluice"),
                    help="the sluice binary to measure (default: the release build), e.g. a build of another commit")
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    args = ap.parse_args()
    if not (MINILM / "model.onnx").is_file() or not (MINILM / "samples.json").is_file():
        print(f"skipped: no MiniLM model.onnx and samples.json at {MINILM} (set SLUICE_MINILM_DIR)", file=sys.stderr)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = json.loads((MINILM / "samples.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        text = (ROOT / "examples" / "embeddings.yaml").read_text()
        text = text.replace("../../shared/models/minilm", str(MINILM)).replace("port: 8000", f"port: {HTTP}")
        cfg = Path(tmp) / "embeddings.yaml"
        cfg.write_text(text + "grpc_options: {enabled: false}\nadmin_options: {enabled: false}\n")
        proc = subprocess.Popen([str(Path(args.binary).resolve()), "run", str(cfg)], stderr=subprocess.DEVNULL,
                                env={**os.environ, "RUST_LOG": "warn"})
        try:
            for _ in range(600):
                # Exited (its port taken, say): a server answering there is another one.
                if proc.poll() is not None:
                    sys.exit(f"sluice exited with {proc.returncode}")
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{HTTP}/v2/health/ready", timeout=1).status == 200:
                        break
                except OSError:
                    time.sleep(0.1)
            else:
                sys.exit("sluice did not become ready within 60 s")
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
            reps = []
            for _ in range(args.repeat):
                loadtest(sample, args.warmup, tmp)
                before = stats("minilm")
                step = loadtest(sample, args.duration, tmp)
                after = stats("minilm")
                mix = {b: after[b] - before.get(b, 0) for b in after if after[b] > before.get(b, 0)}
                calls = sum(mix.values())
                batch = sum(b * c for b, c in mix.items()) / calls if calls else 1.0
                b = max(1, round(batch))
                pipelined = raw_pipeline(b, args.raw_duration, sentence, "pipelined")
                sequential = raw_pipeline(b, args.raw_duration, sentence, "sequential")
                reps.append(dict(step=step, mix=mix, batch=batch, b=b, pipelined=pipelined, sequential=sequential,
                                 ratio=step["inferences_per_second"] / pipelined["sentences_per_s"],
                                 ratio_sequential=step["inferences_per_second"] / sequential["sentences_per_s"]))
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        col = lambda f: [f(r) for r in reps]
        sizes = sorted({size for r in reps for size in r["mix"]}) or [0]
        errors = {}
        for r in reps:
            for k, v in r["step"]["errors"].items():
                errors[k] = errors.get(k, 0) + v
        lines.append(
            f"2. Concurrency 64 through the pipeline (\"{sentence}\", REST binary BYTES input), {args.repeat} repetitions "
            f"of an unmeasured {args.warmup:g} s warm-up, {args.duration:g} s served, then the baselines for "
            f"{args.raw_duration:g} s each; medians [min–max]: **{spread(col(lambda r: r['step']['throughput']))} "
            f"sentences/s**, p50 {spread(col(lambda r: r['step']['latency_us']['p50'] / 1000), '{:.1f}')} ms, p99 "
            f"{spread(col(lambda r: r['step']['latency_us']['p99'] / 1000), '{:.1f}')} ms, errors {errors}. The encoder "
            f"ran batches of {spread(col(lambda r: r['batch']), '{:.1f}')} rows on average (sizes {sizes[0]}–{sizes[-1]} "
            f"seen; warm-up excluded), and the baselines ran at that mean, rounded: batch "
            f"{spread(col(lambda r: r['b']))}.")
        lines.append(
            f"   - Against tokenizer, encoder and pooling on three threads that overlap, as the server's three "
            f"single-replica steps do (`raw_pipeline ... pipelined`): "
            f"{spread(col(lambda r: r['pipelined']['sentences_per_s']))} sentences/s, ratio "
            f"**{spread(col(lambda r: r['ratio']), '{:.2f}')}**.")
        lines.append(
            f"   - Against the same three stages one after another on one thread (`sequential`, less parallel than the "
            f"server): {spread(col(lambda r: r['sequential']['sentences_per_s']))} sentences/s, ratio "
            f"{spread(col(lambda r: r['ratio_sequential']), '{:.2f}')}.")
    text = "\n".join(lines) + "\n"
    (out / "pipeline.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
