"""TLS and compression with the real clients: curl --cacert (HTTP/2 by ALPN), tritonclient HTTP
(ssl=True) and gRPC (ssl=True, root_certificates) against a Sluice serving certificates made
here; and tritonclient's request/response compression (gzip, deflate) on both protocols."""
import datetime
import ipaddress
import shutil
import ssl
import subprocess

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import Sluice

TLS_CONFIG = """
http_options: {{host: 127.0.0.1, port: {http}, tls: {{cert_file: server.pem, key_file: server.key}}}}
grpc_options: {{host: 127.0.0.1, port: {grpc}, tls: {{cert_file: server.pem, key_file: server.key}}}}
admin_options: {{port: 0}}
applications:
  - name: tls
    deployments:
      - {{name: iris, model: {models}/iris/model.onnx, max_batch_size: 8}}
"""

IRIS = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_pki(folder):
    """A CA, and a server certificate it signs for localhost and 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("sluice test CA")).issuer_name(name("sluice test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(pem_key(key))
    return folder / "ca.pem"


@pytest.fixture(scope="module")
def tls_sluice(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    ca = make_pki(folder)
    s = Sluice(folder, config=TLS_CONFIG, ssl_context=ssl.create_default_context(cafile=str(ca)))
    s.ca = str(ca)
    yield s
    assert s.stop() == 0, "".join(s.log)


def iris_inputs(mod):
    x = mod.InferInput("input", [1, 4], "FP32")
    x.set_data_from_numpy(IRIS)
    return [x]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_cacert_gets_http2(tls_sluice):
    out = subprocess.run(
        ["curl", "-sS", "--cacert", tls_sluice.ca, "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
         f"https://{tls_sluice.http}/v2/health/ready"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert out == "200 2", out
    plain = subprocess.run(["curl", "-sS", f"http://{tls_sluice.http}/v2/health/ready"], capture_output=True, timeout=30)
    assert plain.returncode != 0, "plain HTTP is not served on a TLS port"


def test_tritonclient_http_over_tls(tls_sluice):
    c = httpclient.InferenceServerClient(tls_sluice.http, ssl=True, ssl_options={"ca_certs": tls_sluice.ca})
    assert c.is_server_ready()
    out = c.infer("iris", iris_inputs(httpclient))
    assert out.as_numpy("label").tolist() == [0]
    c.close()


def test_tritonclient_grpc_over_tls(tls_sluice):
    c = grpcclient.InferenceServerClient(tls_sluice.grpc, ssl=True, root_certificates=tls_sluice.ca)
    assert c.is_server_ready()
    out = c.infer("iris", iris_inputs(grpcclient))
    assert out.as_numpy("label").tolist() == [0]
    c.close()


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_http_compression(sluice, algorithm):
    c = httpclient.InferenceServerClient(sluice.http)
    out = c.infer("iris", iris_inputs(httpclient), request_compression_algorithm=algorithm,
                  response_compression_algorithm=algorithm)
    assert out.as_numpy("label").tolist() == [0]
    np.testing.assert_allclose(out.as_numpy("probabilities")[0, 0], 0.9847031, rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_grpc_compression(sluice, algorithm):
    c = grpcclient.InferenceServerClient(sluice.grpc)
    out = c.infer("iris", iris_inputs(grpcclient), compression_algorithm=algorithm)
    assert out.as_numpy("label").tolist() == [0]
