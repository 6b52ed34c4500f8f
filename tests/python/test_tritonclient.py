"""tritonclient (HTTP and gRPC, unmodified) against a real Sluice: every call the clients make,
JSON and binary tensors for every datatype of the example models, requested-output subsets,
200 concurrent async infers, and the error cases with the server's message."""
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import expected

NP = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
      "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
      "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}

PROTOCOLS = ["http", "grpc"]


def client_for(protocol, sluice, **kw):
    if protocol == "http":
        return httpclient.InferenceServerClient(sluice.http, **kw)
    return grpcclient.InferenceServerClient(sluice.grpc)


def module(protocol):
    return httpclient if protocol == "http" else grpcclient


def to_numpy(t):
    dt = NP[t["datatype"]]
    if t["datatype"] == "BYTES":
        return np.array([s.encode() for s in t["data"]], dtype=np.object_).reshape(t["shape"])
    return np.array(t["data"], dtype=dt).reshape(t["shape"])


def make_inputs(protocol, tensors, binary=True):
    mod = module(protocol)
    inputs = []
    for t in tensors:
        i = mod.InferInput(t["name"], t["shape"], t["datatype"])
        if protocol == "http":
            i.set_data_from_numpy(to_numpy(t), binary_data=binary)
        else:
            i.set_data_from_numpy(to_numpy(t))
        inputs.append(i)
    return inputs


def check_outputs(result, outputs, tol):
    for want in outputs:
        got = result.as_numpy(want["name"])
        assert got is not None, want["name"]
        ref = to_numpy(want)
        assert list(got.shape) == want["shape"], want["name"]
        if want["datatype"] in ("FP16", "FP32", "FP64"):
            np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), rtol=max(tol, 1e-6), atol=1e-7)
        elif want["datatype"] == "BYTES":
            # Binary outputs come back as bytes, JSON outputs as str.
            as_text = np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else v, otypes=[object])
            assert (as_text(got) == as_text(ref)).all(), (want["name"], got, ref)
        else:
            assert got.dtype == ref.dtype, (want["name"], got.dtype, ref.dtype)
            assert (got == ref).all(), (want["name"], got, ref)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_and_metadata(sluice, protocol):
    c = client_for(protocol, sluice)
    assert c.is_server_live()
    assert c.is_server_ready()
    assert c.is_model_ready("iris")
    assert c.is_model_ready("iris", "1")
    if protocol == "http":
        meta = c.get_server_metadata()
        model = c.get_model_metadata("iris")
        config = c.get_model_config("iris")
        index = c.get_model_repository_index()
    else:
        meta = c.get_server_metadata(as_json=True)
        model = c.get_model_metadata("iris", as_json=True)
        config = c.get_model_config("iris", as_json=True)["config"]
        index = c.get_model_repository_index(as_json=True)["models"]
    assert meta["name"] == "sluice"
    assert "binary_tensor_data" in meta["extensions"]
    assert "statistics" in meta["extensions"]
    assert model["name"] == "iris"
    assert model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4] if protocol == "http" else ["-1", "4"]}]
    assert [o["name"] for o in model["outputs"]] == ["label", "probabilities"]
    assert int(config["max_batch_size"]) == 8
    assert config["input"][0]["name"] == "input"
    assert [int(d) for d in config["input"][0]["dims"]] == [4]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert {(m["name"], m["version"], m["state"]) for m in index} >= {("iris", "1", "READY"), ("dtypes", "1", "READY")}


# tritonclient.grpc always sends raw (binary) contents; HTTP sends binary or JSON.
@pytest.mark.parametrize("protocol,binary", [("http", True), ("http", False), ("grpc", True)])
@pytest.mark.parametrize("model", ["iris", "mlp", "dtypes"])
def test_infer_matches_expected(sluice, protocol, binary, model):
    c = client_for(protocol, sluice)
    doc = expected(model)
    mod = module(protocol)
    for case in doc["cases"]:
        names = [o["name"] for o in case["outputs"]]
        if protocol == "http":
            outputs = [mod.InferRequestedOutput(n, binary_data=binary) for n in names]
        else:
            outputs = [mod.InferRequestedOutput(n) for n in names]
        result = c.infer(model, make_inputs(protocol, case["inputs"], binary), outputs=outputs,
                         request_id=f"{model}-{case['name']}")
        check_outputs(result, case["outputs"], doc["tolerance"])
        response = result.get_response() if protocol == "http" else result.get_response(as_json=True)
        assert response["id"] == f"{model}-{case['name']}"
        assert response["model_version"] == "1"


def test_nan_and_infinities_round_trip_as_json(sluice):
    """NaN and infinities in JSON data, as tritonclient writes them (bare NaN / Infinity, as
    Triton reads them), come back as themselves: the request was refused as malformed JSON, and
    such values in a JSON answer were written as null, read back as NaN."""
    c = client_for("http", sluice)
    case = expected("dtypes")["cases"][0]
    special = {}
    for t in case["inputs"]:
        if t["datatype"] in ("FP16", "FP32", "FP64"):
            x = np.full(t["shape"], 1.5, dtype=NP[t["datatype"]]).reshape(-1)
            x[:3] = [np.nan, np.inf, -np.inf]
            t = dict(t, data=x.tolist())
            special[t["datatype"]] = x.reshape(t["shape"])
    inputs = []
    for t in case["inputs"]:
        x = special.get(t["datatype"]) if t["datatype"] in special else to_numpy(t)
        i = httpclient.InferInput(t["name"], t["shape"], t["datatype"])
        i.set_data_from_numpy(x, binary_data=False)
        inputs.append(i)
    outputs = [httpclient.InferRequestedOutput(f"out_{d}", binary_data=False) for d in special]
    result = c.infer("dtypes", inputs, outputs=outputs)
    assert set(special) == {"FP16", "FP32", "FP64"}
    for d, x in special.items():
        got = result.as_numpy(f"out_{d}").reshape(-1)
        assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf and (got[3:] == 1.5).all(), (d, got)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_default_outputs_and_subsets(sluice, protocol):
    c = client_for(protocol, sluice)
    case = expected("iris")["cases"][3]
    mod = module(protocol)
    result = c.infer("iris", make_inputs(protocol, case["inputs"]))  # no outputs: all of them
    check_outputs(result, case["outputs"], 1e-5)
    only = [mod.InferRequestedOutput("probabilities")]
    result = c.infer("iris", make_inputs(protocol, case["inputs"]), outputs=only)
    assert result.as_numpy("label") is None
    check_outputs(result, case["outputs"][1:], 1e-5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_200_concurrent_async_infers(sluice, protocol):
    doc = expected("mlp")
    rows = to_numpy(doc["cases"][1]["inputs"][0])
    want = to_numpy(doc["cases"][1]["outputs"][1])
    mod = module(protocol)
    n = 200
    if protocol == "http":
        c = httpclient.InferenceServerClient(sluice.http, concurrency=16)
        pending = []
        for k in range(n):
            i = mod.InferInput("x", [1, 8], "FP32")
            i.set_data_from_numpy(rows[k % 5: k % 5 + 1])
            pending.append((k, c.async_infer("mlp", [i], request_id=str(k),
                                             outputs=[mod.InferRequestedOutput("probabilities")])))
        results = [(k, p.get_result()) for k, p in pending]
    else:
        c = grpcclient.InferenceServerClient(sluice.grpc)
        done = threading.Semaphore(0)
        results = []
        lock = threading.Lock()

        def callback(k):
            def cb(result, error):
                with lock:
                    results.append((k, error if error else result))
                done.release()
            return cb

        for k in range(n):
            i = mod.InferInput("x", [1, 8], "FP32")
            i.set_data_from_numpy(rows[k % 5: k % 5 + 1])
            c.async_infer("mlp", [i], callback(k), request_id=str(k),
                          outputs=[mod.InferRequestedOutput("probabilities")])
        for _ in range(n):
            assert done.acquire(timeout=60)
    assert len(results) == n
    for k, r in results:
        assert not isinstance(r, Exception), r
        np.testing.assert_allclose(r.as_numpy("probabilities"), want[k % 5: k % 5 + 1], rtol=1e-5)
        rid = r.get_response()["id"] if protocol == "http" else r.get_response().id
        assert rid == str(k)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_errors_raise_with_the_server_message(sluice, protocol):
    c = client_for(protocol, sluice)
    mod = module(protocol)

    def iris_input(shape, dtype="FP32", name="input"):
        i = mod.InferInput(name, shape, dtype)
        i.set_data_from_numpy(np.ones(shape, dtype=NP[dtype]))
        return i

    cases = [
        ("nope", [iris_input([1, 4])], "unknown model `nope`", "404", "StatusCode.NOT_FOUND"),
        ("iris", [iris_input([1, 3])], "has shape [1, 3] but model `iris` expects [-1, 4]", "400",
         "StatusCode.INVALID_ARGUMENT"),
        ("iris", [iris_input([1, 4], "FP64")], "has datatype FP64 but model `iris` expects FP32", "400",
         "StatusCode.INVALID_ARGUMENT"),
        ("iris", [], "missing input `input` for model `iris`", "400", "StatusCode.INVALID_ARGUMENT"),
        ("iris", [iris_input([9, 4])], "batch-size must be <= 8", "400", "StatusCode.INVALID_ARGUMENT"),
    ]
    for model, inputs, message, http_status, grpc_status in cases:
        with pytest.raises(InferenceServerException) as e:
            c.infer(model, inputs)
        assert message in e.value.message(), e.value.message()
        assert e.value.status() == (http_status if protocol == "http" else grpc_status)
        # The server still serves.
        assert c.infer("iris", [iris_input([1, 4])]).as_numpy("label").shape == (1,)
    # The classification extension, asked for as tritonclient asks: not implemented (Triton's
    # UNSUPPORTED), not the client's mistake.
    with pytest.raises(InferenceServerException) as e:
        c.infer("iris", [iris_input([1, 4])], outputs=[mod.InferRequestedOutput("probabilities", class_count=2)])
    assert "classification extension is not supported" in e.value.message(), e.value.message()
    assert e.value.status() == ("501" if protocol == "http" else "StatusCode.UNIMPLEMENTED")
    # An unknown model or version is not ready, over both protocols (Triton's gRPC answers
    # `ready: false` too, so tritonclient returns False rather than raising).
    assert not c.is_model_ready("nope")
    assert not c.is_model_ready("iris", "77")


def test_one_port_for_both_protocols(shared_port_sluice):
    s = shared_port_sluice
    assert s.http == s.grpc
    case = expected("iris")["cases"][0]
    for protocol in PROTOCOLS:
        c = client_for(protocol, s)
        result = c.infer("iris", make_inputs(protocol, case["inputs"]))
        check_outputs(result, case["outputs"], 1e-5)
    # A stream through the port REST shares, with a pause between its requests.
    c = grpcclient.InferenceServerClient(s.grpc)
    answers = []
    done = threading.Semaphore(0)
    c.start_stream(callback=lambda result, error: (answers.append(error or result), done.release()))
    for k in range(2):
        c.async_stream_infer("iris", make_inputs("grpc", case["inputs"]), request_id=str(k))
        assert done.acquire(timeout=60)
    c.stop_stream()
    for r in answers:
        assert not isinstance(r, Exception), r
        check_outputs(r, case["outputs"], 1e-5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pipeline_with_bytes_input(sluice, protocol):
    """The tokenizer → encoder → pool pipeline as a model: text in (BYTES), embeddings out."""
    doc = expected("tiny-encoder")
    case = doc["cases"][1]
    c = client_for(protocol, sluice)
    mod = module(protocol)
    texts = np.array([t.encode() for t in case["texts"]], dtype=np.object_)
    i = mod.InferInput("text", [len(texts)], "BYTES")
    i.set_data_from_numpy(texts)
    result = c.infer("embeddings", [i])
    got = result.as_numpy("embedding")
    want = np.array(case["embeddings"], dtype=np.float32)
    assert got.shape == want.shape
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert (cos >= 0.9999).all(), cos
    meta = c.get_model_metadata("embeddings") if protocol == "http" else c.get_model_metadata("embeddings", as_json=True)
    assert meta["platform"] == "ensemble"
    # Its config names its steps as Triton's ensembles do (perf_analyzer walks them).
    if protocol == "http":
        config = c.get_model_config("embeddings")
    else:
        config = c.get_model_config("embeddings", as_json=True)["config"]
    steps = config["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["tok", "encoder", "pool"]
    assert steps[1]["output_map"] == {"last_hidden_state": "hidden"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_inference_statistics(sluice, protocol):
    """Triton's statistics extension on both protocols (gRPC answered UNIMPLEMENTED)."""
    c = client_for(protocol, sluice)
    mod = module(protocol)
    i = mod.InferInput("input", [1, 4], "FP32")
    i.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
    c.infer("iris", [i])
    if protocol == "http":
        stats = c.get_inference_statistics("iris")
    else:
        stats = c.get_inference_statistics("iris", as_json=True)
    (m,) = stats["model_stats"]
    assert m["name"] == "iris"
    assert int(m["inference_count"]) >= 1
    assert int(m["inference_stats"]["success"]["count"]) >= 1


def test_stream_infer_answers_every_request_and_keeps_the_stream_after_a_failure(sluice):
    """tritonclient's streaming API (`start_stream`, `async_stream_infer`: Triton's
    ModelStreamInfer): each request answered once, matched by id; a failing request gets its
    error through the callback and the stream goes on; `enable_empty_final_response` flags the
    answer final, as Triton flags a non-decoupled model's one response."""
    doc = expected("mlp")
    rows = to_numpy(doc["cases"][1]["inputs"][0])
    want = to_numpy(doc["cases"][1]["outputs"][1])
    c = grpcclient.InferenceServerClient(sluice.grpc)
    answers = {}
    errors = []
    done = threading.Semaphore(0)
    lock = threading.Lock()

    def callback(result, error):
        with lock:
            if error is not None:
                errors.append(error)
            else:
                answers[result.get_response().id] = result
        done.release()

    c.start_stream(callback=callback)
    n = 50
    for k in range(n):
        i = grpcclient.InferInput("x", [1, 8], "FP32")
        i.set_data_from_numpy(rows[k % 5: k % 5 + 1])
        c.async_stream_infer("mlp", [i], request_id=str(k), enable_empty_final_response=(k == 7),
                             outputs=[grpcclient.InferRequestedOutput("probabilities")])
        if k == 20:
            bad = grpcclient.InferInput("x", [1, 3], "FP32")
            bad.set_data_from_numpy(np.ones([1, 3], dtype=np.float32))
            c.async_stream_infer("mlp", [bad], request_id="bad")
    for _ in range(n + 1):
        assert done.acquire(timeout=60)
    c.stop_stream()
    assert len(errors) == 1, errors
    assert "has shape [1, 3] but model `mlp` expects" in errors[0].message(), errors[0].message()
    assert sorted(answers, key=int) == [str(k) for k in range(n)]
    for k, r in answers.items():
        np.testing.assert_allclose(r.as_numpy("probabilities"), want[int(k) % 5: int(k) % 5 + 1], rtol=1e-5)
        final = r.get_response().parameters.get("triton_final_response")
        assert (final is not None and final.bool_param) == (k == "7"), (k, final)
    # A new stream on the same client works after the last one stopped.
    c.start_stream(callback=callback)
    i = grpcclient.InferInput("x", [1, 8], "FP32")
    i.set_data_from_numpy(rows[:1])
    c.async_stream_infer("mlp", [i], request_id="again")
    assert done.acquire(timeout=60)
    c.stop_stream()
    assert "again" in answers
