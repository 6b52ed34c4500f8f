//! Ray Serve's dashboard API, so that Ray's own tools drive Sluice unchanged: `serve deploy`,
//! `serve status`, `serve config`, `serve shutdown` and KubeRay's RayService.
//!
//! - [`schema`]: the deploy schema they PUT (`ServeDeploySchema`), typed.
//! - [`convert`]: its mapping onto Sluice's config (`import_path: sluice.onnx:PATH`, `args` and
//!   `user_config` carrying Sluice's deployment fields), checked by Sluice's own parser.
//!   It is written as a Sluice config whose every line knows its Ray field (`written`), so that
//!   Sluice's own errors name the field the user wrote.
//! - [`details`]: the instance details they GET back (`ServeInstanceDetails`).
//!
//! The admin API's handlers (`admin::ray`) are thin adapters over these and the controller.

pub mod convert;
pub mod details;
pub mod schema;
mod written;

use std::fmt;

/// The Ray version whose API Sluice answers (the serve CLI needs at least 1.12).
pub const RAY_VERSION: &str = "2.60.0";

/// One refused field: where (`applications.0.import_path`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub loc: String,
    pub msg: String,
}

/// Why a Ray config was refused, printed the way pydantic prints a `ValidationError` (which is
/// what Ray's dashboard answers and Ray's CLI shows):
///
/// ```text
/// 1 validation error for ServeDeploySchema
/// applications.0.import_path
///   `main:app` is not a Sluice model reference; use ... [type=value_error]
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} validation error{} for ServeDeploySchema", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            let msg = e.msg.replace('\n', "\n  ");
            write!(f, "\n{}\n  {msg} [type=value_error]", if e.loc.is_empty() { "body" } else { &e.loc })?;
        }
        Ok(())
    }
}

impl std::error::Error for ValidationErrors {}
