//! In-process baseline for the embeddings pipeline: HF tokenizers + one ONNX Runtime session
//! (a replica's options) + mean pooling and L2 normalization, at a fixed batch size.
//!
//! `cargo run --release -p sluice-deployments --example raw_pipeline -- MODEL TOKENIZER BATCH SECONDS TEXT [MODE]`
//!
//! MODE `sequential` (default): the three stages one after another on this thread.
//! MODE `pipelined`: each stage on its own thread, handing batches on through bounded channels,
//! so the three overlap as a Sluice pipeline's three single-replica steps do. Prints one JSON
//! line with sentences per second.

use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_deployments::onnx::{OnnxBackend, OnnxOptions, init_runtime};
use sluice_deployments::{Backend, DataType, NamedTensor, Tensor};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Batches a pipelined run lets through before it starts timing (filling the pipe).
const PIPE_FILL: usize = 3;

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let (model, tokenizer, batch, seconds, text, mode) = match args.as_slice() {
        [_, m, t, b, s, x] => (m, t, b, s, x, "sequential"),
        [_, m, t, b, s, x, mode] => (m, t, b, s, x, mode.as_str()),
        _ => {
            return Err(
                "usage: raw_pipeline MODEL TOKENIZER BATCH SECONDS TEXT [sequential|pipelined]".into()
            );
        }
    };
    let batch: usize = batch.parse()?;
    let seconds: f64 = seconds.parse()?;
    init_runtime(std::env::var("ORT_DYLIB_PATH")?.as_ref())?;
    let mut tok = tokenizers::Tokenizer::from_file(tokenizer).map_err(|e| e.to_string())?;
    let mut padding = tok.get_padding().cloned().unwrap_or_default();
    padding.strategy = tokenizers::PaddingStrategy::BatchLongest;
    tok.with_padding(Some(padding));
    // The session a replica uses (same options), called directly.
    let session = OnnxBackend::load(model.as_ref(), &OnnxOptions::default())?;
    let texts: Vec<String> = vec![text.clone(); batch];
    let (runs, secs) = match mode {
        "sequential" => sequential(&tok, session, &texts, seconds)?,
        "pipelined" => pipelined(tok, session, texts, seconds)?,
        other => return Err(format!("unknown MODE `{other}` (sequential, pipelined)").into()),
    };
    println!(
        "{{\"batch\": {batch}, \"mode\": \"{mode}\", \"runs\": {runs}, \"sentences_per_s\": {:.1}}}",
        (runs * batch) as f64 / secs
    );
    Ok(())
}

/// A tokenized batch: the encoder's inputs and the attention mask the pooling needs.
struct Tokenized {
    inputs: Vec<NamedTensor>,
    mask: Vec<i64>,
    len: usize,
}

fn tokenize(tok: &tokenizers::Tokenizer, texts: &[String]) -> Result<Tokenized, Error> {
    let enc = tok.encode_batch(texts.to_vec(), true).map_err(|e| e.to_string())?;
    let (n, l) = (enc.len(), enc[0].len());
    let col = |f: fn(&tokenizers::Encoding) -> &[u32]| -> Bytes {
        Bytes::from(
            enc.iter().flat_map(|e| f(e).iter().flat_map(|&x| (x as i64).to_le_bytes())).collect::<Vec<u8>>(),
        )
    };
    let t = |name: &str, data: Bytes| -> Result<NamedTensor, Error> {
        Ok(NamedTensor { name: name.into(), tensor: Tensor::new(DataType::Int64, vec![n, l], data)? })
    };
    let mask = enc.iter().flat_map(|e| e.get_attention_mask().iter().map(|&x| x as i64)).collect();
    let inputs = vec![
        t("input_ids", col(|e| e.get_ids()))?,
        t("attention_mask", col(|e| e.get_attention_mask()))?,
        t("token_type_ids", col(|e| e.get_type_ids()))?,
    ];
    Ok(Tokenized { inputs, mask, len: l })
}

/// The encoder's `last_hidden_state` for a tokenized batch.
fn encode(session: &mut OnnxBackend, t: Tokenized) -> Result<(NamedTensor, Vec<i64>, usize), Error> {
    let mut out = session.infer(t.inputs, &["last_hidden_state".to_string()])?;
    Ok((out.remove(0), t.mask, t.len))
}

/// Masked mean and L2 norm of each row.
fn pool(hidden: &NamedTensor, mask: &[i64], l: usize) {
    let h: Vec<f32> =
        hidden.tensor.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let (n, dim) = (hidden.tensor.shape()[0], hidden.tensor.shape()[2]);
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
}

/// The stages one after another: runs and seconds after 5 warm-up runs.
fn sequential(
    tok: &tokenizers::Tokenizer,
    mut session: OnnxBackend,
    texts: &[String],
    seconds: f64,
) -> Result<(usize, f64), Error> {
    let mut once = || -> Result<(), Error> {
        let (hidden, mask, l) = encode(&mut session, tokenize(tok, texts)?)?;
        pool(&hidden, &mask, l);
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
    Ok((runs, start.elapsed().as_secs_f64()))
}

/// One thread per stage, two batches of room between stages. Timed from the completion of the
/// PIPE_FILL-th batch to the last one: the steady rate of the full pipe.
fn pipelined(
    tok: tokenizers::Tokenizer,
    mut session: OnnxBackend,
    texts: Vec<String>,
    seconds: f64,
) -> Result<(usize, f64), Error> {
    let (to_encode, encode_rx) = sync_channel::<Tokenized>(2);
    let (to_pool, pool_rx) = sync_channel::<(NamedTensor, Vec<i64>, usize)>(2);
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let tokenizer = std::thread::spawn(move || -> Result<(), Error> {
        let mut sent = 0;
        while Instant::now() < end || sent < PIPE_FILL + 3 {
            if to_encode.send(tokenize(&tok, &texts)?).is_err() {
                break;
            }
            sent += 1;
        }
        Ok(())
    });
    let encoder = std::thread::spawn(move || -> Result<(), Error> {
        for t in encode_rx {
            if to_pool.send(encode(&mut session, t)?).is_err() {
                break;
            }
        }
        Ok(())
    });
    let mut done = Vec::new();
    for (hidden, mask, l) in pool_rx {
        pool(&hidden, &mask, l);
        done.push(Instant::now());
    }
    tokenizer.join().map_err(|_| "tokenizer thread panicked")??;
    encoder.join().map_err(|_| "encoder thread panicked")??;
    let timed = &done[PIPE_FILL - 1..];
    let secs = (timed[timed.len() - 1] - timed[0]).as_secs_f64();
    Ok((timed.len() - 1, secs))
}
