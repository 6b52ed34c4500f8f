"""The KServe Python SDK (unmodified `kserve`) against a real Sluice: the asynchronous
`InferenceRESTClient` with JSON, binary and mixed tensors, the asynchronous `InferenceGRPCClient`
with raw and typed contents, health and readiness calls, model metadata through the SDK's own gRPC
stubs (its REST client has no metadata call), concurrent infers, and the error cases with the
server's message. Every SDK call is a coroutine; each test drives its own event loop.

`kserve` and `tritonclient.grpc` both register the OIP protos as package `inference` in protobuf's
default descriptor pool, so one process cannot import both ("duplicate symbol
'inference.ServerLiveRequest'", kserve/kserve#3099). This file therefore runs itself in its own
Python process: in the pytest process that also holds test_tritonclient.py it is one test,
`test_kserve_sdk_in_its_own_process`, which runs this file again with SLUICE_KSERVE_SDK=1 (a child
pytest with its own Sluice) and fails with the child's report if any SDK test fails. To run or pick
SDK tests directly: `SLUICE_KSERVE_SDK=1 .venv/bin/python -m pytest tests/python/test_kserve.py -k ...`.
"""
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import expected

IN_SDK_PROCESS = os.environ.get("SLUICE_KSERVE_SDK") == "1"

if IN_SDK_PROCESS:
    import httpx
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
    from kserve.protocol.infer_type import RequestedOutput
else:
    # The child runs some thirty tests against two debug servers: longer than one test's
    # default bound (--timeout=300) on a loaded machine.
    @pytest.mark.timeout(900)
    def test_kserve_sdk_in_its_own_process(request, capsys):
        """Every SDK test below, in a child pytest process (see the module docstring)."""
        root = Path(__file__).resolve().parents[2]
        verbose = request.config.getoption("verbose") > 0
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfEs", "-v" if verbose else "-q",
               str(Path(__file__).resolve())]
        child = subprocess.run(cmd, cwd=root, env={**os.environ, "SLUICE_KSERVE_SDK": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=840)
        lines = child.stdout.rstrip().splitlines() or ["(no output)"]
        with capsys.disabled():  # the child's summary (everything with -v) goes to the terminal
            print()
            for line in lines if verbose else lines[-1:]:
                print(f"    [kserve SDK process] {line}")
        code = child.returncode
        assert code == 0, f"the kserve SDK tests failed (exit {code}):\n{child.stdout}"
        assert " passed" in lines[-1] and "failed" not in lines[-1], child.stdout


NP = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
      "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
      "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}


def run(coro):
    return asyncio.run(coro)


def rest_client():
    return InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))


def grpc_client(sluice):
    return InferenceGRPCClient(sluice.grpc, timeout=30)


def base_url(sluice):
    return f"http://{sluice.http}"


def to_numpy(t):
    if t["datatype"] == "BYTES":
        return np.array([s.encode() for s in t["data"]], dtype=np.object_).reshape(t["shape"])
    return np.array(t["data"], dtype=NP[t["datatype"]]).reshape(t["shape"])


def make_input(t, binary):
    i = InferInput(t["name"], t["shape"], t["datatype"])
    i.set_data_from_numpy(to_numpy(t), binary_data=binary)
    return i


def check_outputs(response, outputs, tol):
    for want in outputs:
        out = response.get_output_by_name(want["name"])
        assert out is not None, want["name"]
        assert out.datatype == want["datatype"], want["name"]
        assert list(out.shape) == want["shape"], want["name"]
        got = out.as_numpy()
        ref = to_numpy(want)
        if want["datatype"] in ("FP16", "FP32", "FP64"):
            np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), rtol=max(tol, 1e-6), atol=1e-7)
        elif want["datatype"] == "BYTES":
            # The SDK hands BYTES back as str (JSON, and binary REST, which it re-decodes) or bytes (gRPC raw).
            as_text = np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else v, otypes=[object])
            assert (as_text(got) == as_text(ref)).all(), (want["name"], got, ref)
        else:
            assert got.dtype == ref.dtype, (want["name"], got.dtype, ref.dtype)
            assert (got == ref).all(), (want["name"], got, ref)


# --- REST ---------------------------------------------------------------------------------------

def test_rest_health_and_model_ready(sluice):
    async def go():
        async with rest_client() as c:
            url = base_url(sluice)
            assert await c.is_server_live(url) is True  # reads {"live": true}
            assert await c.is_server_ready(url) is True  # reads {"ready": true}
            assert await c.is_model_ready(url, "iris") is True
            assert await c.is_model_ready(url, "embeddings") is True
            assert await c.is_model_ready(url, "nope") is False  # 404: the SDK answers False
    run(go())


# Input and output encodings the REST client can ask for:
#   json:   every input in JSON `data`, no `outputs`: everything comes back as JSON;
#   binary: every input binary (`binary_data_size`), every output asked for with `binary_data: true`;
#   binary_default: binary inputs, JSON outputs by the request-level `binary_data_output: true`;
#   mixed:  inputs alternate binary / JSON, outputs alternate binary / JSON (blob order matters).
REST_MODES = ["json", "binary", "binary_default", "mixed"]


def rest_request(model, case, mode, request_id):
    n_in = len(case["inputs"])
    if mode == "json":
        binary_in = [False] * n_in
    elif mode == "mixed":
        binary_in = [k % 2 == 0 for k in range(n_in)]
    else:
        binary_in = [True] * n_in
    # The SDK refuses FP16 in JSON (KServe's own rule), so FP16 always travels binary.
    binary_in = [b or t["datatype"] == "FP16" for b, t in zip(binary_in, case["inputs"])]
    inputs = [make_input(t, b) for t, b in zip(case["inputs"], binary_in)]
    outputs, parameters = None, None
    names = [o["name"] for o in case["outputs"]]
    if mode == "binary":
        outputs = [RequestedOutput(n, {"binary_data": True}) for n in names]
    elif mode == "binary_default":
        parameters = {"binary_data_output": True}
    elif mode == "mixed":
        outputs = [RequestedOutput(n, {"binary_data": k % 2 == 1}) for k, n in enumerate(names)]
    return InferRequest(model, inputs, request_id=request_id, parameters=parameters, request_outputs=outputs)


# The SDK refuses FP16 in JSON, so `dtypes` has no all-JSON case; `mixed` sends its FP16 binary and
# half of the other datatypes as JSON.
@pytest.mark.parametrize("model,mode", [(m, mode) for m in ["iris", "mlp", "dtypes"] for mode in REST_MODES
                                        if (m, mode) != ("dtypes", "json")])
def test_rest_infer_matches_expected(sluice, model, mode):
    doc = expected(model)

    async def go():
        async with rest_client() as c:
            for case in doc["cases"]:
                rid = f"kserve-{model}-{case['name']}-{mode}"
                headers = {}
                response = await c.infer(base_url(sluice), rest_request(model, case, mode, rid), model_name=model,
                                         response_headers=headers)
                check_outputs(response, case["outputs"], doc["tolerance"])
                assert response.id == rid
                assert response.model_name == model
                # (No model_version check: the SDK's InferResponse.from_bytes drops the "1" Sluice sends.)
                assert [o.name for o in response.outputs] == [o["name"] for o in case["outputs"]]
                binary_out = mode in ("binary", "binary_default") or (
                    mode == "mixed" and len(case["outputs"]) > 1)
                assert headers["content-type"] == ("application/octet-stream" if binary_out else "application/json")
                assert ("inference-header-content-length" in headers) == binary_out
    run(go())


def test_rest_plain_dict_request(sluice):
    """`infer` also takes a plain OIP request dict (sent as JSON, nested data here)."""
    case = expected("iris")["cases"][3]
    rows = to_numpy(case["inputs"][0]).tolist()

    async def go():
        async with rest_client() as c:
            body = {"id": "dict-1", "inputs": [{"name": "input", "shape": [8, 4], "datatype": "FP32", "data": rows}],
                    "outputs": [{"name": "probabilities"}]}
            response = await c.infer(base_url(sluice), body, model_name="iris")
            assert response.id == "dict-1"
            assert [o.name for o in response.outputs] == ["probabilities"]
            check_outputs(response, case["outputs"][1:], 1e-5)
    run(go())


def test_rest_pipeline_with_bytes(sluice):
    """The tokenizer → encoder → pool pipeline as a model: BYTES in, as JSON strings and as binary."""
    case = expected("tiny-encoder")["cases"][1]
    texts = np.array([t.encode() for t in case["texts"]], dtype=np.object_)
    want = np.array(case["embeddings"], dtype=np.float32)

    async def go():
        async with rest_client() as c:
            for binary in (False, True):
                i = InferInput("text", [len(texts)], "BYTES")
                i.set_data_from_numpy(texts, binary_data=binary)
                outputs = [RequestedOutput("embedding", {"binary_data": binary})]
                response = await c.infer(base_url(sluice), InferRequest("embeddings", [i], request_outputs=outputs),
                                         model_name="embeddings")
                got = response.get_output_by_name("embedding").as_numpy()
                assert got.shape == want.shape
                cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
                assert (cos >= 0.9999).all(), cos
    run(go())


def iris_input(shape, dtype="FP32", name="input", binary=True):
    i = InferInput(name, shape, dtype)
    i.set_data_from_numpy(np.ones(shape, dtype=NP[dtype]), binary_data=binary)
    return i


# (model, inputs, server message, HTTP status, gRPC status); inputs is a function of `binary`.
ERRORS = [
    ("nope", lambda b: [iris_input([1, 4], binary=b)], "unknown model `nope`", 404, grpc.StatusCode.NOT_FOUND),
    ("iris", lambda b: [iris_input([1, 3], binary=b)], "input `input` has shape [1, 3] but model `iris` expects [-1, 4]",
     400, grpc.StatusCode.INVALID_ARGUMENT),
    ("iris", lambda b: [iris_input([1, 4], "FP64", binary=b)], "input `input` has datatype FP64 but model `iris` expects FP32",
     400, grpc.StatusCode.INVALID_ARGUMENT),
    ("iris", lambda b: [iris_input([1, 4], name="wrong", binary=b)], "unknown input `wrong` for model `iris`", 400,
     grpc.StatusCode.INVALID_ARGUMENT),
    ("iris", lambda b: [], "missing input `input` for model `iris`", 400, grpc.StatusCode.INVALID_ARGUMENT),
    ("iris", lambda b: [iris_input([9, 4], binary=b)], "inference request batch-size must be <= 8 for `iris`", 400,
     grpc.StatusCode.INVALID_ARGUMENT),
]

REASONS = {400: "Bad Request", 404: "Not Found"}


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_rest_errors_raise_with_the_server_message(sluice, binary):
    async def go():
        async with rest_client() as c:
            url = base_url(sluice)
            for model, inputs, message, status, _ in ERRORS:
                with pytest.raises(httpx.HTTPStatusError) as e:
                    await c.infer(url, InferRequest(model, inputs(binary)), model_name=model)
                assert e.value.response.status_code == status
                assert e.value.response.headers["content-type"] == "application/json"
                server_error = e.value.response.json()["error"]
                assert message in server_error, server_error
                # The SDK puts the server's `error` first in its own message.
                assert str(e.value) == (f"{server_error}, '{status} {REASONS[status]}' for url "
                                        f"'{url}/v2/models/{model}/infer'")
                # The server still serves.
                ok = await c.infer(url, InferRequest("iris", [iris_input([1, 4], binary=binary)]), model_name="iris")
                assert ok.get_output_by_name("label").as_numpy().shape == (1,)
    run(go())


def test_rest_concurrent_infers(sluice):
    """100 infers in flight at once on one client (asyncio.gather), each answered with its own rows."""
    doc = expected("mlp")
    rows = to_numpy(doc["cases"][1]["inputs"][0])
    want = to_numpy(doc["cases"][1]["outputs"][1])

    async def one(c, k):
        i = InferInput("x", [1, 8], "FP32")
        i.set_data_from_numpy(rows[k % 5: k % 5 + 1], binary_data=k % 2 == 0)
        req = InferRequest("mlp", [i], request_id=f"r{k}",
                           request_outputs=[RequestedOutput("probabilities", {"binary_data": k % 3 == 0})])
        return k, await c.infer(base_url(sluice), req, model_name="mlp")

    async def go():
        async with rest_client() as c:
            return await asyncio.gather(*(one(c, k) for k in range(100)))

    results = run(go())
    assert len(results) == 100
    for k, r in results:
        assert r.id == f"r{k}"
        np.testing.assert_allclose(r.get_output_by_name("probabilities").as_numpy(), want[k % 5: k % 5 + 1], rtol=1e-5)


# --- gRPC ---------------------------------------------------------------------------------------

def test_grpc_health_and_model_ready(sluice):
    async def go():
        async with grpc_client(sluice) as c:
            assert await c.is_server_live() is True
            assert await c.is_server_ready() is True
            assert await c.is_model_ready("iris") is True
            assert await c.is_model_ready("embeddings") is True
            # Unknown: not ready, as Triton answers (no error).
            assert await c.is_model_ready("nope") is False
    run(go())


def test_grpc_metadata_through_the_sdk_stubs(sluice):
    """InferenceGRPCClient has no metadata calls; the SDK's generated GRPCInferenceServiceStub does."""
    async def go():
        async with grpc.aio.insecure_channel(sluice.grpc) as channel:
            stub = GRPCInferenceServiceStub(channel)
            server = await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30)
            assert server.name == "sluice"
            assert "binary_tensor_data" in server.extensions
            model = await stub.ModelMetadata(pb.ModelMetadataRequest(name="iris"), timeout=30)
            assert model.name == "iris"
            assert list(model.versions) == ["1"]
            assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("input", "FP32", [-1, 4])]
            assert [t.name for t in model.outputs] == ["label", "probabilities"]
            assert [(t.datatype, list(t.shape)) for t in model.outputs] == [("INT64", [-1]), ("FP32", [-1, 3])]
            versioned = await stub.ModelMetadata(pb.ModelMetadataRequest(name="iris", version="1"), timeout=30)
            assert versioned == model
            pipeline = await stub.ModelMetadata(pb.ModelMetadataRequest(name="embeddings"), timeout=30)
            assert pipeline.platform == "ensemble"
            assert [(t.name, t.datatype, list(t.shape)) for t in pipeline.inputs] == [("text", "BYTES", [-1])]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=30)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert "unknown model `nope`" in e.value.details(), e.value.details()
    run(go())


# raw: set_data_from_numpy(binary_data=True) → raw_input_contents; typed: binary_data=False →
# fp32_contents / int64_contents / ... (the SDK has no typed field for FP16, so `dtypes` is raw only).
@pytest.mark.parametrize("model,contents", [("iris", "raw"), ("iris", "typed"), ("mlp", "raw"), ("mlp", "typed"),
                                            ("dtypes", "raw")])
def test_grpc_infer_matches_expected(sluice, model, contents):
    doc = expected(model)

    async def go():
        async with grpc_client(sluice) as c:
            for case in doc["cases"]:
                rid = f"kserve-grpc-{model}-{case['name']}-{contents}"
                inputs = [make_input(t, contents == "raw") for t in case["inputs"]]
                wire = InferRequest(model, inputs, request_id=rid).to_grpc()
                assert len(wire.raw_input_contents) == (len(inputs) if contents == "raw" else 0)
                inputs = [make_input(t, contents == "raw") for t in case["inputs"]]
                response = await c.infer(InferRequest(model, inputs, request_id=rid))
                check_outputs(response, case["outputs"], doc["tolerance"])
                assert response.id == rid
                assert response.model_name == model
                assert response.model_version == "1"
                # The server always answers in raw_output_contents.
                assert all(o._raw_data is not None for o in response.outputs)
            # A subset of outputs, by name.
            case = doc["cases"][0]
            last = case["outputs"][-1]
            inputs = [make_input(t, True) for t in case["inputs"]]
            response = await c.infer(InferRequest(model, inputs, request_outputs=[RequestedOutput(last["name"])]))
            assert [o.name for o in response.outputs] == [last["name"]]
            check_outputs(response, [last], doc["tolerance"])
    run(go())


def test_grpc_pipeline_with_bytes(sluice):
    case = expected("tiny-encoder")["cases"][1]
    texts = np.array([t.encode() for t in case["texts"]], dtype=np.object_)
    want = np.array(case["embeddings"], dtype=np.float32)

    async def go():
        async with grpc_client(sluice) as c:
            for raw in (True, False):  # raw_input_contents, then bytes_contents
                i = InferInput("text", [len(texts)], "BYTES")
                i.set_data_from_numpy(texts, binary_data=raw)
                response = await c.infer(InferRequest("embeddings", [i]))
                got = response.get_output_by_name("embedding").as_numpy()
                assert got.shape == want.shape
                cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
                assert (cos >= 0.9999).all(), cos
    run(go())


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_grpc_errors_raise_with_the_server_message(sluice, raw):
    async def go():
        async with grpc_client(sluice) as c:
            for model, inputs, message, _, status in ERRORS:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await c.infer(InferRequest(model, inputs(raw)))
                assert e.value.code() == status, (model, e.value.code(), e.value.details())
                assert message in e.value.details(), e.value.details()
                ok = await c.infer(InferRequest("iris", [iris_input([1, 4], binary=raw)]))
                assert ok.get_output_by_name("label").as_numpy().shape == (1,)
    run(go())


def test_grpc_concurrent_infers(sluice):
    doc = expected("mlp")
    rows = to_numpy(doc["cases"][1]["inputs"][0])
    want = to_numpy(doc["cases"][1]["outputs"][1])

    async def one(c, k):
        i = InferInput("x", [1, 8], "FP32")
        i.set_data_from_numpy(rows[k % 5: k % 5 + 1], binary_data=k % 2 == 0)
        req = InferRequest("mlp", [i], request_id=f"g{k}", request_outputs=[RequestedOutput("probabilities")])
        return k, await c.infer(req)

    async def go():
        async with grpc_client(sluice) as c:
            return await asyncio.gather(*(one(c, k) for k in range(100)))

    results = run(go())
    assert len(results) == 100
    for k, r in results:
        assert r.id == f"g{k}"
        np.testing.assert_allclose(r.get_output_by_name("probabilities").as_numpy(), want[k % 5: k % 5 + 1], rtol=1e-5)


def test_one_port_for_both_sdk_clients(shared_port_sluice):
    s = shared_port_sluice
    assert s.http == s.grpc
    case = expected("iris")["cases"][0]

    async def go():
        async with rest_client() as c:
            r = await c.infer(base_url(s), InferRequest("iris", [make_input(t, True) for t in case["inputs"]]),
                              model_name="iris")
            check_outputs(r, case["outputs"], 1e-5)
        async with grpc_client(s) as c:
            r = await c.infer(InferRequest("iris", [make_input(t, True) for t in case["inputs"]]))
            check_outputs(r, case["outputs"], 1e-5)
    run(go())


if not IN_SDK_PROCESS:
    # The pytest process without kserve collects only test_kserve_sdk_in_its_own_process.
    for _name, _test in list(globals().items()):
        if _name.startswith("test_") and _name != "test_kserve_sdk_in_its_own_process":
            _test.__test__ = False
