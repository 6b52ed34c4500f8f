//! OpenAPI 3.1 documents of the two HTTP APIs, each served at `GET /openapi.json` on its own
//! port: the Open Inference Protocol frontend on the REST port ([`rest`], committed as
//! `docs/openapi.json`) and the admin API on the admin port ([`admin`],
//! `docs/openapi-admin.json`). `make openapi` (`sluice openapi rest|admin`) rewrites the files;
//! `server/tests/openapi.rs` fails when they drift from what the server serves, or when a
//! route the routers register is missing here.
//!
//! Built with utoipa's builders from the route tables [`REST`] and [`ADMIN`] rather than
//! per-handler macros: several handlers answer on more than one path (a model and one of its
//! versions), which `#[utoipa::path]` cannot say without a wrapper function per path.

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ArrayBuilder, ComponentsBuilder, ContentBuilder, InfoBuilder, ObjectBuilder, OpenApi, OpenApiBuilder,
    PathsBuilder, Ref, Required, ResponseBuilder, Schema, Type,
};

/// A method of an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Put,
    Delete,
}

impl Verb {
    /// The HTTP name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "GET",
            Verb::Post => "POST",
            Verb::Put => "PUT",
            Verb::Delete => "DELETE",
        }
    }

    fn http(self) -> HttpMethod {
        match self {
            Verb::Get => HttpMethod::Get,
            Verb::Post => HttpMethod::Post,
            Verb::Put => HttpMethod::Put,
            Verb::Delete => HttpMethod::Delete,
        }
    }
}

/// A request or response body.
#[derive(Clone, Copy, Debug)]
pub enum Body {
    None,
    /// JSON of the named component schema.
    Json(&'static str),
    /// `text/plain`.
    Text,
    /// `text/html`.
    Html,
    /// A whole config, YAML or JSON.
    Config,
}

/// One operation: method, path (axum's `{param}` syntax is OpenAPI's too), what it does, its
/// bodies and the error statuses it answers besides 200.
#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub verb: Verb,
    pub path: &'static str,
    pub summary: &'static str,
    pub request: Body,
    pub answer: Body,
    pub errors: &'static [u16],
}

const fn op(
    verb: Verb,
    path: &'static str,
    summary: &'static str,
    answer: Body,
    errors: &'static [u16],
) -> Op {
    Op { verb, path, summary, request: Body::None, answer, errors }
}

const fn with_body(mut o: Op, request: Body) -> Op {
    o.request = request;
    o
}

use Body::{Json, Text};
use Verb::{Delete, Get, Post, Put};

/// Every route of the REST frontend ([`crate::rest::router`]).
pub const REST: &[Op] = &[
    op(Get, "/v2", "Server metadata: name, version, protocol extensions", Json("ServerMetadata"), &[]),
    op(Get, "/v2/health/live", "Liveness: the process answers", Json("Live"), &[]),
    op(Get, "/v2/health/ready", "Readiness: 200 when every model is ready, else 503", Json("Ready"), &[503]),
    op(Get, "/v2/models/{model}", "Model metadata (its primary version)", Json("ModelMetadata"), &[404]),
    op(
        Get,
        "/v2/models/{model}/versions/{version}",
        "Metadata of one version",
        Json("ModelMetadata"),
        &[404],
    ),
    op(Get, "/v2/models/{model}/ready", "Whether the model serves", Json("Ready"), &[404, 503]),
    op(
        Get,
        "/v2/models/{model}/versions/{version}/ready",
        "Whether the version serves",
        Json("Ready"),
        &[404, 503],
    ),
    op(Get, "/v2/models/{model}/config", "Model configuration (Triton's shape)", Json("Object"), &[404]),
    op(
        Get,
        "/v2/models/{model}/versions/{version}/config",
        "Configuration of one version",
        Json("Object"),
        &[404],
    ),
    op(
        Post,
        "/v2/repository/index",
        "Repository index: every model version and its state",
        Json("RepositoryIndex"),
        &[400],
    ),
    op(
        Post,
        "/v2/repository/models/{model}/load",
        "Load a repository model (again)",
        Body::None,
        &[400, 401, 403, 404, 409, 503],
    ),
    op(
        Post,
        "/v2/repository/models/{model}/unload",
        "Unload a repository model",
        Body::None,
        &[400, 401, 403, 404],
    ),
    op(Get, "/v2/models/stats", "Inference statistics of every model (Triton's shape)", Json("Object"), &[]),
    op(Get, "/v2/models/{model}/stats", "Inference statistics of one model", Json("Object"), &[404]),
    op(
        Get,
        "/v2/models/{model}/versions/{version}/stats",
        "Inference statistics of one version",
        Json("Object"),
        &[404],
    ),
    op(Get, "/metrics", "Prometheus metrics (text exposition format)", Text, &[]),
    op(Get, "/-/healthz", "Ray Serve proxy health: `success`, 503 while draining", Text, &[503]),
    op(Get, "/-/routes", "Ray Serve proxy routes: {route: application}", Json("Object"), &[503]),
    with_body(
        op(
            Post,
            "/v2/models/{model}/infer",
            "Inference (JSON, or binary tensor data)",
            Json("InferenceResponse"),
            &[400, 404, 408, 413, 415, 500, 501, 503, 504],
        ),
        Json("InferenceRequest"),
    ),
    with_body(
        op(
            Post,
            "/v2/models/{model}/versions/{version}/infer",
            "Inference on one version",
            Json("InferenceResponse"),
            &[400, 404, 408, 413, 415, 500, 501, 503, 504],
        ),
        Json("InferenceRequest"),
    ),
    op(Get, "/openapi.json", "This document", Json("Object"), &[]),
];

/// Every route of the admin API ([`crate::admin::router`]).
pub const ADMIN: &[Op] = &[
    with_body(
        op(
            Put,
            "/api/serve/applications",
            "Deploy a whole config (Sluice's, or Ray Serve's ServeDeploySchema, answered with an empty body)",
            Json("Status"),
            &[400, 500, 503],
        ),
        Body::Config,
    ),
    op(
        Get,
        "/api/serve/applications",
        "Ray Serve's ServeInstanceDetails (`?api_type=declarative` or `imperative`)",
        Json("Object"),
        &[400],
    ),
    op(
        Delete,
        "/api/serve/applications",
        "Remove every application (Ray's `serve shutdown`)",
        Body::None,
        &[],
    ),
    with_body(
        op(Put, "/api/serve/applications/", "As without the slash", Json("Status"), &[400, 500, 503]),
        Body::Config,
    ),
    op(Get, "/api/serve/applications/", "As without the slash", Json("Object"), &[400]),
    op(Delete, "/api/serve/applications/", "As without the slash", Body::None, &[]),
    op(Delete, "/api/serve/applications/{app}", "Remove one application", Json("Status"), &[404]),
    op(
        Get,
        "/api/sluice/status",
        "Applications, deployments, versions, replicas, traffic, events",
        Json("Status"),
        &[],
    ),
    op(Get, "/api/ray/version", "Ray's version check", Json("Object"), &[]),
    op(Get, "/api/version", "Ray's version check", Json("Object"), &[]),
    with_body(
        op(
            Post,
            "/api/serve/deployments/{name}/canary",
            "Set the canary's share of unpinned traffic (stops an automatic rollout)",
            Json("Status"),
            &[400, 404, 409],
        ),
        Json("Weight"),
    ),
    op(
        Post,
        "/api/serve/deployments/{name}/promote",
        "Make the canary the primary version",
        Json("Status"),
        &[400, 404, 409],
    ),
    op(
        Post,
        "/api/serve/deployments/{name}/rollback",
        "Send the canary no more traffic",
        Json("Status"),
        &[404, 409],
    ),
    op(Get, "/api/sluice/routes", "The route table, for proxies on other nodes", Json("Object"), &[]),
    op(
        Get,
        "/api/sluice/metrics/targets",
        "Prometheus HTTP service discovery: the Ray replicas and proxies that serve their own /metrics",
        Json("Targets"),
        &[],
    ),
    with_body(
        op(
            Post,
            "/api/sluice/demand",
            "What a proxy on another node holds, counted by the autoscaler",
            Body::None,
            &[400],
        ),
        Json("Object"),
    ),
    op(
        Post,
        "/api/sluice/repository/{model}/notify",
        "Scan the model repository now for new versions of a model",
        Json("Status"),
        &[400, 404, 409, 503],
    ),
    op(Get, "/-/healthz", "Admin API health: `ok`; no token needed", Text, &[]),
    op(Get, "/openapi.json", "This document", Json("Object"), &[]),
    op(
        Get,
        "/",
        "The status page (HTML). With a token configured, `/?token=T` logs in: a cookie the API accepts like the bearer header",
        Body::Html,
        &[303],
    ),
];

/// The REST frontend's document.
pub fn rest() -> OpenApi {
    document(
        "Sluice: Open Inference Protocol (REST)",
        "KServe's Open Inference Protocol v2 with Triton's extensions (model configuration, \
         repository, statistics, binary tensor data). Errors answer `{\"error\": message}`. \
         Besides these routes, each pipeline with a JSON route answers `POST {route_prefix}`.",
        REST,
        false,
    )
}

/// The admin API's document.
pub fn admin() -> OpenApi {
    document(
        "Sluice: admin API",
        "Sluice's admin API and the part of Ray's dashboard API that Ray Serve's CLI and KubeRay \
         call. With `admin_options.token_env` set, every call but `GET /-/healthz` must carry \
         `Authorization: Bearer TOKEN` (or `X-Ray-Authorization`, or the status page's \
         `sluice_admin_token` cookie); otherwise none. Errors answer `{\"error\": message}`, \
         but those of Ray's routes (`/api/serve/...`), which answer plain text as Ray's \
         dashboard does. Every call may get 403 (a call from a page of another origin, or a \
         host name that is not loopback's when no token is set) and, with a body, 408 and 413.",
        ADMIN,
        true,
    )
}

fn document(title: &str, description: &str, ops: &[Op], bearer: bool) -> OpenApi {
    let mut paths = PathsBuilder::new();
    for o in ops {
        paths = paths.path(o.path, PathItem::new(o.verb.http(), operation(o, bearer)));
    }
    let mut components = ComponentsBuilder::new();
    for (name, schema) in schemas() {
        components = components.schema(name, schema);
    }
    let mut doc = OpenApiBuilder::new().info(
        InfoBuilder::new()
            .title(title)
            .version(env!("CARGO_PKG_VERSION"))
            .description(Some(description))
            .build(),
    );
    if bearer {
        components = components.security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // Optional: only a server with a token configured asks for one.
        doc = doc.security(Some([
            SecurityRequirement::default(),
            SecurityRequirement::new("bearer", Vec::<String>::new()),
        ]));
    }
    doc.paths(paths.build()).components(Some(components.build())).build()
}

fn operation(o: &Op, bearer: bool) -> utoipa::openapi::path::Operation {
    let mut b = OperationBuilder::new().summary(Some(o.summary)).operation_id(Some(format!(
        "{} {}",
        o.verb.as_str(),
        o.path
    )));
    for param in o.path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')) {
        b = b.parameter(
            ParameterBuilder::new()
                .name(param)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(Some(string())),
        );
    }
    if let Some((mime, content)) = content(o.request) {
        b = b.request_body(Some(
            RequestBodyBuilder::new().content(mime, content).required(Some(Required::True)).build(),
        ));
    }
    let mut ok = ResponseBuilder::new().description("OK");
    if let Some((mime, content)) = content(o.answer) {
        ok = ok.content(mime, content);
    }
    b = b.response("200", ok.build());
    let mut errors = o.errors.to_vec();
    // On the admin API: the token (but for its health check, which needs none), the browser
    // guard, and the body reader in front of every route.
    let open = o.path == "/-/healthz";
    if bearer {
        if open {
            b = b.securities(Some([SecurityRequirement::default()]));
        } else {
            errors.push(401);
        }
        errors.push(403);
        if !matches!(o.request, Body::None) {
            errors.extend([408, 413]);
        }
    }
    errors.sort_unstable();
    errors.dedup();
    for code in errors {
        let mut answer = ResponseBuilder::new().description(reason(code));
        if code >= 400 {
            let error = ContentBuilder::new().schema(Some(Ref::from_schema_name("Error"))).build();
            answer = answer.content("application/json", error);
        }
        b = b.response(code.to_string(), answer.build());
    }
    b.build()
}

fn content(body: Body) -> Option<(&'static str, utoipa::openapi::Content)> {
    let any = || ContentBuilder::new().schema(Some(string())).build();
    match body {
        Body::None => None,
        Body::Json(name) => Some((
            "application/json",
            ContentBuilder::new().schema(Some(Ref::from_schema_name(name))).build(),
        )),
        Body::Text => Some(("text/plain", any())),
        Body::Html => Some(("text/html", any())),
        Body::Config => Some(("application/yaml", any())),
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        303 => "`?token=` was right: the cookie is set, on to `/`",
        400 => "The request is invalid; the message says what is wrong",
        401 => "Missing or wrong bearer token",
        403 => {
            "Refused: a repository change without the admin token, or (admin API) a call from another origin or host"
        }
        404 => "No such model, version, application or deployment",
        409 => "Conflicts with the state: no canary, no model_repository, or no complete version",
        413 => "The body is larger than http_options.max_body_bytes",
        408 => "The request body stopped arriving (http_options.body_read_timeout_s, body_total_timeout_s)",
        415 => "A Content-Encoding the server does not decode",
        500 => "The model failed (ONNX Runtime's error, a panic) or the server did",
        501 => "A protocol extension Sluice does not implement (shared memory, classification)",
        503 => "Not ready, draining, or the deployment's queue is full (max_queued_requests)",
        504 => "The request's deadline passed",
        _ => "Error",
    }
}

fn string() -> Schema {
    ObjectBuilder::new().schema_type(Type::String).into()
}

fn typed(t: Type, description: &str) -> Schema {
    ObjectBuilder::new().schema_type(t).description(Some(description)).into()
}

fn array(items: Schema) -> Schema {
    ArrayBuilder::new().items(utoipa::openapi::schema::ArrayItems::RefOrSchema(Box::new(items.into()))).into()
}

/// The component schemas: the Open Inference Protocol's bodies, in the detail clients need.
fn schemas() -> Vec<(&'static str, Schema)> {
    let object = |description: &str| typed(Type::Object, description);
    let tensor_meta = || -> Schema {
        ObjectBuilder::new()
            .property("name", string())
            .property(
                "datatype",
                typed(Type::String, "BOOL, UINT8..UINT64, INT8..INT64, FP16, BF16, FP32, FP64, BYTES"),
            )
            .property("shape", array(typed(Type::Integer, "-1: any size")))
            .required("name")
            .required("datatype")
            .required("shape")
            .into()
    };
    let tensor = |what: &str| -> Schema {
        ObjectBuilder::new()
            .description(Some(what))
            .property("name", string())
            .property("datatype", string())
            .property("shape", array(typed(Type::Integer, "dimension")))
            .property("parameters", object("binary_data_size, ..."))
            .property("data", typed(Type::Array, "row-major values, or nested arrays"))
            .required("name")
            .into()
    };
    vec![
        ("Error", ObjectBuilder::new().property("error", string()).required("error").into()),
        ("Object", object("A JSON object")),
        (
            "Targets",
            array(
                ObjectBuilder::new()
                    .property("targets", array(typed(Type::String, "HOST:PORT serving GET /metrics")))
                    .property("labels", object("sluice_role (replica, proxy), sluice_actor, sluice_node_ip"))
                    .required("targets")
                    .required("labels")
                    .into(),
            ),
        ),
        ("Live", ObjectBuilder::new().property("live", typed(Type::Boolean, "always true")).into()),
        ("Ready", ObjectBuilder::new().property("ready", typed(Type::Boolean, "ready or not")).into()),
        (
            "ServerMetadata",
            ObjectBuilder::new()
                .property("name", string())
                .property("version", string())
                .property("extensions", array(string()))
                .into(),
        ),
        (
            "ModelMetadata",
            ObjectBuilder::new()
                .property("name", string())
                .property("versions", array(string()))
                .property("platform", string())
                .property("inputs", array(tensor_meta()))
                .property("outputs", array(tensor_meta()))
                .into(),
        ),
        (
            "RepositoryIndex",
            array(
                ObjectBuilder::new()
                    .property("name", string())
                    .property("version", string())
                    .property("state", typed(Type::String, "READY or UNAVAILABLE"))
                    .property("reason", string())
                    .into(),
            ),
        ),
        (
            "InferenceRequest",
            ObjectBuilder::new()
                .property("id", string())
                .property("parameters", object("binary_data_output, ..."))
                .property("inputs", array(tensor("An input tensor")))
                .property("outputs", array(object("A requested output: {name, parameters}")))
                .required("inputs")
                .into(),
        ),
        (
            "InferenceResponse",
            ObjectBuilder::new()
                .property("model_name", string())
                .property("model_version", string())
                .property("id", string())
                .property("outputs", array(tensor("An output tensor")))
                .into(),
        ),
        (
            "Weight",
            ObjectBuilder::new()
                .property("weight", typed(Type::Integer, "percent, 0..100"))
                .required("weight")
                .into(),
        ),
        (
            "Status",
            object(
                "applications (status, deployments with versions, weights, replicas, recent traffic), \
                 events, proxies, repository: controller/src/status.rs",
            ),
        ),
    ]
}

/// `GET /openapi.json` on the REST port.
pub async fn serve_rest() -> axum::Json<OpenApi> {
    axum::Json(rest())
}

/// `GET /openapi.json` on the admin port.
pub async fn serve_admin() -> axum::Json<OpenApi> {
    axum::Json(admin())
}
