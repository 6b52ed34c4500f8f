#!/usr/bin/env python3
"""Makes Sluice's example and test models from PyPI packages alone, and their expected outputs.

Writes, under examples/models/ (or the folder given as the first argument; with a second
argument `big-mlp`, only the benchmark's 256 -> 3x1024 -> 16 MLP, see `big_mlp`):
  iris/model.onnx     scikit-learn Pipeline(StandardScaler, LogisticRegression) on the iris data
                      bundled with scikit-learn, converted by skl2onnx (zipmap=False: the
                      probabilities are a plain tensor). input [N,4] FP32 -> label [N] INT64,
                      probabilities [N,3] FP32.
  mlp/model.onnx      a small MLP built with onnx.helper (8 -> 16 -> ReLU -> 4), seeded weights:
                      x [N,8] FP32 -> logits [N,4], probabilities [N,4] (softmax).
  dtypes/model.onnx   one Identity per Open Inference Protocol datatype ONNX Runtime takes:
                      in_<DT> [N,2] -> out_<DT>, for BOOL, UINT8..64, INT8..64, FP16, FP32, FP64,
                      BYTES (string).
  reshape/model.onnx  x [N] FP32, shape [2] INT64 -> y = Reshape(x, shape); a shape that does not
                      fit x makes ONNX Runtime fail at run time (tests the 500 path).
  mlp-external/       mlp's model with its weights in weights.bin beside it (ONNX external data;
                      mlp's expected.json): a model whose weights can change while its file does not.
  broken/model.onnx   iris's input, fails on every request at run time (an erroring canary).
  iris-v2/model.onnx  iris's interface, strongly regularized: other probabilities, and other
                      classes for some rows (a shadow or canary that differs).
  tiny-encoder/       a tiny BERT-style tokenizer.json and encoder with MiniLM's interface, and the
                      pooled, normalized embeddings of sample texts (pipeline tests).
  */expected.json     cases in the OIP JSON form: {"inputs": [...]} as a request body and the
                      "outputs" onnxruntime-python computed for it, with a float tolerance.

Deterministic: fixed seeds, single-threaded training.
"""
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")

OIP = {
    np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "UINT8", np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32", np.dtype(np.uint64): "UINT64", np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16", np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
}


def oip_tensor(name, arr):
    arr = np.asarray(arr)
    if arr.dtype == object or arr.dtype.kind in "US":
        dt, data = "BYTES", [str(v) for v in arr.flatten()]
    else:
        dt = OIP[arr.dtype]
        data = arr.flatten().tolist()
    return {"name": name, "datatype": dt, "shape": list(arr.shape), "data": data}


def save(name, model, cases, tolerance=1e-5):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "model.onnx")
    onnx.checker.check_model(model)
    onnx.save(model, path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    doc = {"model": name, "tolerance": tolerance, "cases": []}
    for case_name, feeds in cases:
        outs = sess.run(out_names, feeds)
        doc["cases"].append({
            "name": case_name,
            "inputs": [oip_tensor(k, v) for k, v in feeds.items()],
            "outputs": [oip_tensor(k, v) for k, v in zip(out_names, outs)],
        })
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes) and {len(cases)} cases", file=sys.stderr)


def iris(name="iris", regularization=1.0):
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    clf = LogisticRegression(C=regularization, max_iter=500, random_state=0)
    pipe = Pipeline([("scale", StandardScaler()), ("clf", clf)])
    pipe.fit(x, y)
    model = to_onnx(pipe, x[:1], options={id(pipe.steps[-1][1]): {"zipmap": False}},
                    target_opset={"": 13, "ai.onnx.ml": 1})
    # Name the input `input` like the shared benchmark model, and make the batch dynamic.
    old = model.graph.input[0].name
    for node in model.graph.node:
        node.input[:] = ["input" if i == old else i for i in node.input]
    model.graph.input[0].name = "input"
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.doc_string = f"{name}: scikit-learn StandardScaler + LogisticRegression(C={regularization}) via skl2onnx"
    rows = np.array([[5.1, 3.5, 1.4, 0.2], [6.4, 3.2, 4.5, 1.5], [6.3, 3.3, 6.0, 2.5]], np.float32)
    cases = [(f"row{i}", {"input": rows[i:i + 1]}) for i in range(3)]
    cases.append(("batch8", {"input": x[::19][:8]}))
    save(name, model, cases)
    if name == "iris":
        with open(os.path.join(OUT, "iris", "labels.txt"), "w") as f:
            f.write("setosa\nversicolor\nvirginica\n")


def iris_v2():
    """iris's interface, trained with strong regularization: other probabilities, and other
    classes for some rows (a shadow or canary that differs)."""
    iris("iris-v2", regularization=0.02)


def mlp():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32) * 0.5
    b1 = rng.standard_normal(16).astype(np.float32) * 0.1
    w2 = rng.standard_normal((16, 4)).astype(np.float32) * 0.5
    b2 = rng.standard_normal(4).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.doc_string = "mlp: 8 -> 16 -> ReLU -> 4, softmax; seeded weights"
    xs = rng.standard_normal((5, 8)).astype(np.float32)
    save("mlp", model, [("row0", {"x": xs[:1]}), ("batch5", {"x": xs})])


DTYPES = [
    ("BOOL", TensorProto.BOOL, np.array([[True, False], [False, True]])),
    ("UINT8", TensorProto.UINT8, np.array([[0, 255], [7, 128]], np.uint8)),
    ("UINT16", TensorProto.UINT16, np.array([[0, 65535], [7, 300]], np.uint16)),
    ("UINT32", TensorProto.UINT32, np.array([[0, 4294967295], [7, 70000]], np.uint32)),
    ("UINT64", TensorProto.UINT64, np.array([[0, 18446744073709551615], [7, 2**40]], np.uint64)),
    ("INT8", TensorProto.INT8, np.array([[-128, 127], [0, -1]], np.int8)),
    ("INT16", TensorProto.INT16, np.array([[-32768, 32767], [0, -1]], np.int16)),
    ("INT32", TensorProto.INT32, np.array([[-2**31, 2**31 - 1], [0, -1]], np.int32)),
    ("INT64", TensorProto.INT64, np.array([[-2**63, 2**63 - 1], [0, -1]], np.int64)),
    ("FP16", TensorProto.FLOAT16, np.array([[0.5, -2.0], [65504.0, 0.000061035156]], np.float16)),
    ("FP32", TensorProto.FLOAT, np.array([[0.1, -2.5], [3.4028235e38, 1e-7]], np.float32)),
    ("FP64", TensorProto.DOUBLE, np.array([[0.1, -2.5], [1.7976931348623157e308, 1e-300]], np.float64)),
    ("BYTES", TensorProto.STRING, np.array([["héllo", ""], ["a b", "z"]], object)),
]


def dtypes():
    inputs, outputs, nodes, feeds = [], [], [], {}
    for dt, proto, sample in DTYPES:
        inputs.append(helper.make_tensor_value_info(f"in_{dt}", proto, ["N", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{dt}", proto, ["N", 2]))
        nodes.append(helper.make_node("Identity", [f"in_{dt}"], [f"out_{dt}"]))
        feeds[f"in_{dt}"] = sample
    graph = helper.make_graph(nodes, "dtypes", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.doc_string = "dtypes: Identity for each OIP datatype"
    save("dtypes", model, [("all", feeds)], tolerance=0)


def reshape():
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["A", "B"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.doc_string = "reshape: fails at run time when `shape` does not fit `x`"
    save("reshape", model, [("fits", {"x": np.arange(6, dtype=np.float32), "shape": np.array([2, 3], np.int64)})])


def broken():
    """Same input as iris, fails on every request at run time (a canary that errors)."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "bad_shape"], ["label"])], "broken",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("label", TensorProto.FLOAT, ["M"])],
        [numpy_helper.from_array(np.array([7], np.int64), "bad_shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.doc_string = "broken: iris's input, fails at run time on every batch (Reshape to 7 elements)"
    d = os.path.join(OUT, "broken")
    os.makedirs(d, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(d, "model.onnx"))


def tiny_encoder():
    """A tiny BERT-style tokenizer and encoder, the CI stand-in for MiniLM: tokenizer.json
    (WordPiece over a 40-word vocabulary, padding to the longest, truncation at 16) and an
    encoder with MiniLM's inputs and output (last_hidden_state [N, L, 8]), with the pooled,
    normalized embeddings computed in Python as expected outputs."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = ("the quick brown fox jumps over lazy dog a man is eating food hello world onnx runtime serves "
             "models from rust with low latency sluice pipeline text tokens embed sentence fast small").split()
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + ["##s", "##ing"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=16)
    d = os.path.join(OUT, "tiny-encoder")
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))

    rng = np.random.default_rng(1)
    emb = rng.standard_normal((len(vocab), 8)).astype(np.float32)
    types = rng.standard_normal((2, 8)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("Gather", ["types", "token_type_ids"], ["t"]),
        helper.make_node("Add", ["e", "t"], ["s"]),
        helper.make_node("Tanh", ["s"], ["h"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "L"]) for n in ("input_ids", "attention_mask", "token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["N", "L", 8])],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(types, "types"),
         numpy_helper.from_array(np.array([2], np.int64), "axis")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.doc_string = "tiny_encoder: MiniLM's interface with an 8-wide embedding, for pipeline tests"
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(d, "model.onnx"))

    texts = ["hello world", "The quick brown fox jumps over the lazy dog", "sluice serves small models fast"]
    sess = ort.InferenceSession(os.path.join(d, "model.onnx"), providers=["CPUExecutionProvider"])
    cases = []
    for batch in ([texts[0]], texts):
        enc = tok.encode_batch(batch)
        feeds = {"input_ids": np.array([e.ids for e in enc], np.int64),
                 "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
                 "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}
        (hidden,) = sess.run(["last_hidden_state"], feeds)
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        cases.append({"texts": batch, "input_ids": feeds["input_ids"].tolist(), "embeddings": pooled.tolist()})
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump({"model": "tiny-encoder", "tolerance": 1e-5, "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {d}: tokenizer.json, model.onnx, expected.json", file=sys.stderr)


def big_mlp():
    """The benchmark's larger model (issue 14): 256 -> 3 x (1024, ReLU) -> 16, seeded weights
    (~9.5 MB, not committed: `scripts/bench.py` makes it under bench-results/ on demand).
    x [N,256] FP32 -> y [N,16]."""
    rng = np.random.default_rng(1)
    sizes = [256, 1024, 1024, 1024, 16]
    nodes, inits, h = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        last = i == len(sizes) - 2
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], ["y" if last else f"a{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i}"]))
        h = f"h{i}"
    graph = helper.make_graph(
        nodes, "big_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.doc_string = "big-mlp: 256 -> 3 x (1024, ReLU) -> 16; seeded weights"
    xs = rng.standard_normal((1, 256)).astype(np.float32)
    save("big-mlp", model, [("row0", {"x": xs})], tolerance=1e-4)


def mlp_external():
    d = os.path.join(OUT, "mlp-external")
    os.makedirs(d, exist_ok=True)
    model = onnx.load(os.path.join(OUT, "mlp", "model.onnx"))
    onnx.save_model(model, os.path.join(d, "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    with open(os.path.join(OUT, "mlp", "expected.json")) as f:
        doc = json.load(f)
    doc["model"] = "mlp-external"
    sess = ort.InferenceSession(os.path.join(d, "model.onnx"), providers=["CPUExecutionProvider"])
    for case in doc["cases"]:
        x = np.array(case["inputs"][0]["data"], np.float32).reshape(case["inputs"][0]["shape"])
        for out, got in zip(case["outputs"], sess.run([o["name"] for o in case["outputs"]], {"x": x})):
            assert np.allclose(np.array(out["data"]).reshape(out["shape"]), got, atol=doc["tolerance"])
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {d} (model.onnx + weights.bin)", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "big-mlp":
        big_mlp()  # make_models.py OUT big-mlp: the benchmark model alone
        sys.exit(0)
    if len(sys.argv) > 2 and sys.argv[2] == "mlp-external":
        mlp_external()  # make_models.py OUT mlp-external: from OUT/mlp alone
        sys.exit(0)
    iris()
    iris_v2()
    mlp()
    mlp_external()
    dtypes()
    reshape()
    broken()
    tiny_encoder()
