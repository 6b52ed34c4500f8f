#!/usr/bin/env python3
"""Train an iris classifier on the Ray cluster and publish it as the next version of a Sluice
model repository, then tell Sluice (optional) so the new version rolls out at once.

    sluice job submit --working-dir examples/train -- \
        python train.py --repository s3://models/repo --model iris --notify http://HEAD:8266

What it does, in a few seconds:
1. a small hyperparameter search as Ray tasks: Pipeline(StandardScaler, LogisticRegression) for
   a few values of C, each scored by 5-fold cross-validation on the iris data that ships inside
   scikit-learn (no download);
2. the best pipeline refit on all the data and converted to ONNX by skl2onnx, with Sluice's
   iris interface: input [N,4] FP32 -> label [N] INT64, probabilities [N,3] FP32;
3. the next version number (one more than the greatest in the repository) written as
   `<repo>/<model>/<version>/model.onnx`, then the ready marker `READY` last, so Sluice never
   loads a half-written version;
4. with --notify, `POST <admin>/api/sluice/repository/<model>/notify` (bearer token from
   SLUICE_ADMIN_TOKEN), so Sluice scans now instead of at its next poll.

The repository is a folder (on a cluster: one every node sees) or `s3://bucket/prefix` (boto3,
credentials and endpoint from the standard AWS_* variables, e.g. AWS_ENDPOINT_URL).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request

import numpy as np

MODEL_FILE = "model.onnx"
MARKER = "READY"


def score(c: float) -> tuple:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_iris(return_X_y=True)
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(C=c, max_iter=500, random_state=0))])
    return c, float(cross_val_score(pipe, x.astype(np.float32), y, cv=5).mean())


def search(grid: list) -> tuple:
    """Scores every C as a Ray task when Ray is there (a Ray job), else in this process."""
    try:
        import ray
    except ImportError:
        ray = None
    if ray is not None:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
        remote = ray.remote(num_cpus=0.25)(score)
        results = ray.get([remote.remote(c) for c in grid])
    else:
        results = [score(c) for c in grid]
    for c, s in sorted(results):
        print("C=%-6g cv accuracy %.4f" % (c, s), flush=True)
    return max(results, key=lambda r: (r[1], -r[0]))


def export(c: float) -> bytes:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(C=c, max_iter=500, random_state=0))])
    pipe.fit(x, y)
    model = to_onnx(pipe, x[:1], options={id(pipe.steps[-1][1]): {"zipmap": False}},
                    target_opset={"": 13, "ai.onnx.ml": 1})
    old = model.graph.input[0].name
    for node in model.graph.node:
        node.input[:] = ["input" if i == old else i for i in node.input]
    model.graph.input[0].name = "input"
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.doc_string = "iris: StandardScaler + LogisticRegression(C=%g), trained by examples/train/train.py" % c
    return model.SerializeToString()


class Folder:
    def __init__(self, root: str):
        self.root = root

    def versions(self, model: str) -> list:
        d = os.path.join(self.root, model)
        return [int(v) for v in os.listdir(d) if v.isdigit()] if os.path.isdir(d) else []

    def put(self, key: str, data: bytes) -> None:
        path = os.path.join(self.root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".part"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class S3:
    def __init__(self, url: str):
        import boto3

        bucket, _, prefix = url[len("s3://"):].partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.s3 = boto3.client("s3")

    def _key(self, key: str) -> str:
        return "%s/%s" % (self.prefix, key) if self.prefix else key

    def versions(self, model: str) -> list:
        out = set()
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(model + "/"))
        for page in pages:
            for obj in page.get("Contents", []):
                part = obj["Key"][len(self._key(model + "/")):].split("/")[0]
                if part.isdigit():
                    out.add(int(part))
        return sorted(out)

    def put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)


def notify(admin: str, model: str) -> None:
    req = urllib.request.Request("%s/api/sluice/repository/%s/notify" % (admin.rstrip("/"), model), data=b"",
                                 method="POST", headers={"User-Agent": "sluice-train/1"})
    token = os.environ.get("SLUICE_ADMIN_TOKEN")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    with urllib.request.urlopen(req, timeout=120) as r:
        status = json.loads(r.read())
    dep = status.get("applications", {}).get("repository", {}).get("deployments", {}).get(model, {})
    print("sluice: %s" % ", ".join("version %s at %s%%" % (v["version"], v["weight"])
                                   for v in dep.get("versions", [])), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", required=True, help="a folder or s3://bucket/prefix")
    p.add_argument("--model", default="iris")
    p.add_argument("--grid", default="0.01,0.1,1,10", help="values of C to try")
    p.add_argument("--notify", help="Sluice's admin API, to scan the repository now")
    args = p.parse_args(argv)
    started = time.time()
    c, accuracy = search([float(v) for v in args.grid.split(",")])
    print("best: C=%g (cv accuracy %.4f)" % (c, accuracy), flush=True)
    onnx_bytes = export(c)
    repo = S3(args.repository) if args.repository.startswith("s3://") else Folder(args.repository)
    version = max(repo.versions(args.model), default=0) + 1
    repo.put("%s/%d/%s" % (args.model, version, MODEL_FILE), onnx_bytes)
    repo.put("%s/%d/%s" % (args.model, version, MARKER), b"")
    print("wrote %s version %d (%d bytes) to %s in %.1f s" % (args.model, version, len(onnx_bytes),
                                                               args.repository, time.time() - started), flush=True)
    if args.notify:
        notify(args.notify, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
