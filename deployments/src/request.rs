//! The internal request and response both frontends decode into and encode from, and the checks
//! of a request against a model's metadata (shared, so REST and gRPC say the same thing).

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

/// The one `triton_` request parameter Triton takes (a bool: whether a decoupled stream ends
/// with an empty final answer). Triton's C++ client and perf_analyzer send it with every
/// request, unary ones too, where it changes nothing.
pub const ENABLE_EMPTY_FINAL_RESPONSE: &str = "triton_enable_empty_final_response";

/// Refuses a request parameter named like Triton's own (`triton_…`, but for
/// [`ENABLE_EMPTY_FINAL_RESPONSE`], whose value the frontend checks): reserved, as Triton
/// refuses it, rather than read by no one.
pub fn check_parameter_name(name: &str) -> Result<(), InferError> {
    match name.starts_with("triton_") && name != ENABLE_EMPTY_FINAL_RESPONSE {
        true => Err(InferError::invalid(format!(
            "parameter `{name}` is reserved: names beginning `triton_` are Triton's own, but for \
             `{ENABLE_EMPTY_FINAL_RESPONSE}`"
        ))),
        false => Ok(()),
    }
}

/// Refuses shared memory for an input or output (`what`: ``input `x` ``): not implemented.
pub fn refuse_shared_memory(what: &str) -> InferError {
    InferError::unimplemented(format!(
        "{what}: shared memory is not supported; the data goes inline, in the request and the answer"
    ))
}

/// Refuses the classification extension for an output: not implemented.
pub fn refuse_classification(output: &str) -> InferError {
    InferError::unimplemented(format!("output `{output}`: the classification extension is not supported"))
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
    validate_request(model, meta, max_batch_size, request)?;
    Ok(match &request.outputs {
        None => meta.outputs.iter().map(|s| s.name.clone()).collect(),
        Some(requested) => requested.clone(),
    })
}

/// [`check_request`]'s checks (the requested outputs too) without building the list of outputs:
/// for a caller that has the model's output names at hand already.
pub fn validate_request(
    model: &str,
    meta: &ModelMetadata,
    max_batch_size: usize,
    request: &InferRequest,
) -> Result<(), InferError> {
    // Duplicates and missing inputs are found by scanning, not with a hash set: a model has a
    // handful of inputs, and every input is checked to be one of them before the next is read,
    // so a request cannot make this quadratic in more than the model's input count.
    for (i, input) in request.inputs.iter().enumerate() {
        let Some(spec) = meta.inputs.iter().find(|s| s.name == input.name) else {
            let names: Vec<&str> = meta.inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(InferError::invalid(format!(
                "unknown input `{}` for model `{model}`; its inputs are: {}",
                input.name,
                names.join(", ")
            )));
        };
        if request.inputs[..i].iter().any(|earlier| earlier.name == input.name) {
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
    // Every input is known and none repeats, so fewer inputs than the model's means one is missing.
    if request.inputs.len() < meta.inputs.len()
        && let Some(missing) =
            meta.inputs.iter().find(|s| !request.inputs.iter().any(|input| input.name == s.name))
    {
        return Err(InferError::invalid(format!("missing input `{}` for model `{model}`", missing.name)));
    }
    if max_batch_size > 0 {
        let batch = request.inputs.first().and_then(|i| i.tensor.shape().first().copied());
        if let Some(batch) = batch {
            if let Some(other) = request.inputs.iter().find(|i| i.tensor.shape().first() != Some(&batch)) {
                let theirs =
                    other.tensor.shape().first().map_or("no dimension 0".to_string(), |n| n.to_string());
                return Err(InferError::invalid(format!(
                    "inputs disagree on the batch size (dimension 0): `{}` has {batch}, `{}` has {theirs}",
                    request.inputs[0].name, other.name,
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
        None => Ok(()),
        Some(requested) => {
            for (i, name) in requested.iter().enumerate() {
                if !meta.outputs.iter().any(|s| &s.name == name) {
                    let names: Vec<&str> = meta.outputs.iter().map(|s| s.name.as_str()).collect();
                    return Err(InferError::invalid(format!(
                        "unknown output `{name}` for model `{model}`; its outputs are: {}",
                        names.join(", ")
                    )));
                }
                if requested[..i].contains(name) {
                    return Err(InferError::invalid(format!("output `{name}` requested more than once")));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{DataType, Tensor, TensorSpec};

    fn meta() -> ModelMetadata {
        let spec = |name: &str| TensorSpec { name: name.into(), dtype: DataType::Fp32, shape: vec![-1, 2] };
        ModelMetadata {
            platform: "test".into(),
            inputs: vec![spec("a"), spec("b")],
            outputs: vec![spec("y"), spec("z")],
        }
    }

    fn input(name: &str) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            tensor: Tensor::new(DataType::Fp32, vec![1, 2], Bytes::from(vec![0u8; 8])).unwrap(),
        }
    }

    fn check(inputs: &[&str], outputs: Option<&[&str]>) -> Result<Vec<String>, String> {
        let request = InferRequest {
            inputs: inputs.iter().map(|n| input(n)).collect(),
            outputs: outputs.map(|o| o.iter().map(|n| n.to_string()).collect()),
            ..Default::default()
        };
        check_request("m", &meta(), 4, &request).map_err(|e| e.message)
    }

    #[test]
    fn resolves_outputs_in_model_or_requested_order() {
        assert_eq!(check(&["b", "a"], None).unwrap(), ["y", "z"]);
        assert_eq!(check(&["a", "b"], Some(&["z", "y"])).unwrap(), ["z", "y"]);
    }

    #[test]
    fn names_the_repeated_missing_or_unknown_tensor() {
        assert_eq!(check(&["a", "a"], None).unwrap_err(), "input `a` given more than once");
        assert_eq!(check(&["a", "b", "a"], None).unwrap_err(), "input `a` given more than once");
        assert_eq!(check(&["b"], None).unwrap_err(), "missing input `a` for model `m`");
        assert_eq!(check(&[], None).unwrap_err(), "missing input `a` for model `m`");
        assert_eq!(
            check(&["a", "c"], None).unwrap_err(),
            "unknown input `c` for model `m`; its inputs are: a, b"
        );
        assert_eq!(check(&["a", "b"], Some(&["z", "z"])).unwrap_err(), "output `z` requested more than once");
        assert_eq!(
            check(&["a", "b"], Some(&["y", "x"])).unwrap_err(),
            "unknown output `x` for model `m`; its outputs are: y, z"
        );
    }
}
