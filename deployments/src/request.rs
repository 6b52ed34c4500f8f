//! The internal request and response both frontends decode into and encode from, and the checks
//! of a request against a model's metadata (shared, so REST and gRPC say the same thing).

use std::collections::HashSet;

use crate::{InferError, ModelMetadata, NamedTensor};

/// One inference request, whatever protocol it came over.
#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    /// Client-chosen id, echoed in the response.
    pub id: Option<String>,
    pub inputs: Vec<NamedTensor>,
    /// Outputs to return, in this order; `None` returns every output in model order.
    pub outputs: Option<Vec<String>>,
    /// The client's own deadline (OIP `timeout` parameter); the deployment's
    /// `request_timeout_s` applies when it is longer or absent.
    pub timeout: Option<std::time::Duration>,
    /// Which of a multiplexed deployment's models serves the request (Ray's
    /// `serve_multiplexed_model_id`).
    pub model_id: Option<String>,
}

/// The answer to an [`InferRequest`].
#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: Option<String>,
    pub outputs: Vec<NamedTensor>,
}

/// Checks inputs against the model (every input known, present once, right datatype, rank and
/// fixed dimensions; with `max_batch_size` > 0, one batch size across inputs within the limit)
/// and resolves the output names to return.
pub fn check_request(
    model: &str,
    meta: &ModelMetadata,
    max_batch_size: usize,
    request: &InferRequest,
) -> Result<Vec<String>, InferError> {
    let mut seen = HashSet::new();
    for input in &request.inputs {
        let Some(spec) = meta.inputs.iter().find(|s| s.name == input.name) else {
            let names: Vec<&str> = meta.inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(InferError::invalid(format!(
                "unknown input `{}` for model `{model}`; its inputs are: {}",
                input.name,
                names.join(", ")
            )));
        };
        if !seen.insert(input.name.as_str()) {
            return Err(InferError::invalid(format!("input `{}` given more than once", input.name)));
        }
        let t = &input.tensor;
        if t.dtype() != spec.dtype {
            return Err(InferError::invalid(format!(
                "input `{}` has datatype {} but model `{model}` expects {}",
                input.name,
                t.dtype(),
                spec.dtype
            )));
        }
        let dims_match = t.shape().len() == spec.shape.len()
            && t.shape().iter().zip(&spec.shape).all(|(&got, &want)| want < 0 || got as i64 == want);
        if !dims_match {
            return Err(InferError::invalid(format!(
                "input `{}` has shape {:?} but model `{model}` expects {:?} (-1: any size)",
                input.name,
                t.shape(),
                spec.shape
            )));
        }
    }
    if let Some(missing) = meta.inputs.iter().find(|s| !seen.contains(s.name.as_str())) {
        return Err(InferError::invalid(format!("missing input `{}` for model `{model}`", missing.name)));
    }
    if max_batch_size > 0 {
        let batch = request.inputs.first().and_then(|i| i.tensor.shape().first().copied());
        if let Some(batch) = batch {
            if let Some(other) = request.inputs.iter().find(|i| i.tensor.shape().first() != Some(&batch)) {
                return Err(InferError::invalid(format!(
                    "inputs disagree on the batch size (dimension 0): `{}` has {batch}, `{}` has {:?}",
                    request.inputs[0].name,
                    other.name,
                    other.tensor.shape().first()
                )));
            }
            if batch > max_batch_size {
                return Err(InferError::invalid(format!(
                    "inference request batch-size must be <= {max_batch_size} for `{model}`, got {batch}"
                )));
            }
        }
    }
    match &request.outputs {
        None => Ok(meta.outputs.iter().map(|s| s.name.clone()).collect()),
        Some(requested) => {
            let mut seen = HashSet::new();
            for name in requested {
                if !meta.outputs.iter().any(|s| &s.name == name) {
                    let names: Vec<&str> = meta.outputs.iter().map(|s| s.name.as_str()).collect();
                    return Err(InferError::invalid(format!(
                        "unknown output `{name}` for model `{model}`; its outputs are: {}",
                        names.join(", ")
                    )));
                }
                if !seen.insert(name.as_str()) {
                    return Err(InferError::invalid(format!("output `{name}` requested more than once")));
                }
            }
            Ok(requested.clone())
        }
    }
}
