//! Raw ONNX Runtime per-call time, the baseline server numbers are compared with: one session,
//! inputs built once, `Session::run` timed in a loop on this thread.
//!
//! `cargo run --release -p sluice-deployments --example raw_ort -- MODEL [BATCH] [SECONDS] [SEQ]`
//! Dynamic dimensions become BATCH for the first and SEQ (default 1) for the others; data is
//! zeros. Prints one JSON line.

use std::time::{Duration, Instant};

use ort::memory::Allocator;
use ort::session::Session;
use ort::value::{DynTensor, ValueType};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).ok_or("usage: raw_ort MODEL [BATCH] [SECONDS]")?;
    let batch: i64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let seconds: f64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(3.0);
    let seq: i64 = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let lib = std::env::var("ORT_DYLIB_PATH").map_err(|_| "set ORT_DYLIB_PATH")?;
    sluice_deployments::onnx::init_runtime(lib.as_ref())?;
    let env = sluice_deployments::onnx::environment()?;
    let mut session = Session::builder(env)?
        // The same session options as a Sluice replica (onnx.rs).
        .with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)?
        .with_intra_threads(1)?
        .with_inter_threads(1)?
        .commit_from_file(model)?;
    let mut inputs = Vec::new();
    for input in session.inputs() {
        let ValueType::Tensor { ty, shape, .. } = input.dtype() else {
            return Err("non-tensor input".into());
        };
        let dims: Vec<i64> = shape
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                if d >= 0 {
                    d
                } else if i == 0 {
                    batch
                } else {
                    seq
                }
            })
            .collect();
        let t = DynTensor::new(&Allocator::default(), *ty, dims)?;
        inputs.push((input.name().to_string(), t));
    }
    let run = |session: &mut Session| -> Result<(), ort::Error> {
        let values: Vec<(&str, &DynTensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
        session.run(values).map(|_| ())
    };
    for _ in 0..200 {
        run(&mut session)?;
    }
    let mut times = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let t = Instant::now();
        run(&mut session)?;
        times.push(t.elapsed());
    }
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)].as_secs_f64() * 1e6;
    let mean = times.iter().sum::<Duration>().as_secs_f64() * 1e6 / times.len() as f64;
    println!(
        "{{\"model\": {model:?}, \"batch\": {batch}, \"seq\": {seq}, \"runs\": {}, \"p50_us\": {:.2}, \"p99_us\": {:.2}, \"mean_us\": {:.2}, \"runs_per_s\": {:.1}}}",
        times.len(),
        pct(0.5),
        pct(0.99),
        mean,
        1e6 / mean
    );
    Ok(())
}
