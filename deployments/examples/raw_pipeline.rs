//! In-process baseline for the embeddings pipeline: HF tokenizers + one ONNX Runtime session +
//! mean pooling and L2 normalization, in a loop on this thread, at a fixed batch size.
//!
//! `cargo run --release -p sluice-deployments --example raw_pipeline -- MODEL TOKENIZER BATCH SECONDS TEXT`
//! Prints one JSON line with sentences per second.

use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_deployments::onnx::{OnnxBackend, OnnxOptions, init_runtime};
use sluice_deployments::{Backend, DataType, NamedTensor, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, tokenizer, batch, seconds, text] = args.as_slice() else {
        return Err("usage: raw_pipeline MODEL TOKENIZER BATCH SECONDS TEXT".into());
    };
    let batch: usize = batch.parse()?;
    let seconds: f64 = seconds.parse()?;
    init_runtime(std::env::var("ORT_DYLIB_PATH")?.as_ref())?;
    let mut tok = tokenizers::Tokenizer::from_file(tokenizer).map_err(|e| e.to_string())?;
    let mut padding = tok.get_padding().cloned().unwrap_or_default();
    padding.strategy = tokenizers::PaddingStrategy::BatchLongest;
    tok.with_padding(Some(padding));
    // The session a replica uses (same options), called directly.
    let mut session = OnnxBackend::load(model.as_ref(), &OnnxOptions { intra_op_threads: 1 })?;
    let texts: Vec<String> = vec![text.clone(); batch];
    let mut once = || -> Result<(), Box<dyn std::error::Error>> {
        let enc = tok.encode_batch(texts.clone(), true).map_err(|e| e.to_string())?;
        let (n, l) = (enc.len(), enc[0].len());
        let col = |f: fn(&tokenizers::Encoding) -> &[u32]| -> Bytes {
            Bytes::from(
                enc.iter()
                    .flat_map(|e| f(e).iter().flat_map(|&x| (x as i64).to_le_bytes()))
                    .collect::<Vec<u8>>(),
            )
        };
        let t = |name: &str, data: Bytes| NamedTensor {
            name: name.into(),
            tensor: Tensor::new(DataType::Int64, vec![n, l], data).unwrap(),
        };
        let mask: Vec<i64> =
            enc.iter().flat_map(|e| e.get_attention_mask().iter().map(|&x| x as i64)).collect();
        let inputs = vec![
            t("input_ids", col(|e| e.get_ids())),
            t("attention_mask", col(|e| e.get_attention_mask())),
            t("token_type_ids", col(|e| e.get_type_ids())),
        ];
        let out = session.infer(inputs, &["last_hidden_state".to_string()])?;
        let h: Vec<f32> =
            out[0].tensor.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let dim = out[0].tensor.shape()[2];
        for b in 0..n {
            let mut e = vec![0f32; dim];
            let mut count = 0.0;
            for s in 0..l {
                if mask[b * l + s] != 0 {
                    count += 1.0;
                    for (x, y) in e.iter_mut().zip(&h[(b * l + s) * dim..(b * l + s + 1) * dim]) {
                        *x += y;
                    }
                }
            }
            let norm = e.iter().map(|x| (x / count) * (x / count)).sum::<f32>().sqrt();
            std::hint::black_box(norm);
        }
        Ok(())
    };
    for _ in 0..5 {
        once()?;
    }
    let start = Instant::now();
    let mut runs = 0;
    while start.elapsed() < Duration::from_secs_f64(seconds) {
        once()?;
        runs += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"batch\": {batch}, \"runs\": {runs}, \"sentences_per_s\": {:.1}}}",
        (runs * batch) as f64 / secs
    );
    Ok(())
}
