"""The OpenAPI documents the server serves at `GET /openapi.json` (REST port and admin port)
are valid OpenAPI, checked with openapi-spec-validator."""
import json
import urllib.request

from openapi_spec_validator import validate


def served(base):
    with urllib.request.urlopen(f"{base}/openapi.json", timeout=10) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("application/json")
        return json.load(r)


def test_rest_document_is_valid_openapi(sluice):
    doc = served(f"http://{sluice.http}")
    validate(doc)
    assert doc["openapi"].startswith("3.")
    assert "/v2/models/{model}/infer" in doc["paths"]
    assert "post" in doc["paths"]["/v2/models/{model}/infer"]


def test_admin_document_is_valid_openapi(sluice):
    doc = served(sluice.admin)
    validate(doc)
    assert "/api/sluice/status" in doc["paths"]
    assert "bearer" in doc["components"]["securitySchemes"]
