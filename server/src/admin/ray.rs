//! Ray's dashboard endpoints on the admin API: thin adapters over [`crate::ray_serve`] and the
//! controller. Errors are answered as Ray answers them: plain text, which Ray's CLI prints.

use std::collections::BTreeMap;
use std::path::Path;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AdminState;
use crate::error::RayApiError;
use crate::ray_serve::details::{ApiType, InstanceDetails, instance_details};
use crate::ray_serve::{RAY_VERSION, convert};

/// `GET /api/ray/version` (the serve CLI's version check) and `GET /api/version`.
pub(super) async fn version() -> Json<Value> {
    Json(json!({
        "version": "4",
        "ray_version": RAY_VERSION,
        "ray_commit": concat!("sluice-", env!("CARGO_PKG_VERSION")),
        "session_name": "sluice",
    }))
}

/// `GET /api/serve/applications/[?api_type=declarative|imperative]`: `ServeInstanceDetails`.
pub(super) async fn details(
    State(s): State<AdminState>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<InstanceDetails>, RayApiError> {
    let api_type =
        ApiType::parse(query.get("api_type").map(String::as_str)).map_err(RayApiError::bad_request)?;
    let status = s.status();
    let draining = *s.phase.borrow() == crate::readiness::Phase::Stopping;
    Ok(Json(instance_details(&status, &s.submitted().apps, &s.node, &s.frontends, api_type, draining)))
}

/// `PUT /api/serve/applications/` with a `ServeDeploySchema`: checked now (400 with every
/// error), deployed in the background (status says how it goes), answered 200 with no body.
pub(super) fn deploy(s: &AdminState, body: &Value, base: &Path) -> Response {
    let desired = s.controller.desired();
    match convert::convert(body, base, desired.as_ref()) {
        Ok(converted) => {
            // Under the lock: entries and generation go together.
            let mut submitted = s.submitted();
            let generation = s.controller.deploy(converted.config);
            submitted.replace(converted.submitted, generation);
            StatusCode::OK.into_response()
        }
        Err(errors) => RayApiError::from(errors).into_response(),
    }
}

/// `DELETE /api/serve/applications/`: every application goes (Ray's `serve shutdown`).
pub(super) async fn delete_all(State(s): State<AdminState>) -> Result<StatusCode, RayApiError> {
    let state = s.clone();
    sluice_controller::to_the_end(async move {
        let kept = state.controller.delete(None).await?;
        state.submitted().forget(None, kept);
        Ok::<_, sluice_controller::ControlError>(())
    })
    .await?;
    Ok(StatusCode::OK)
}
