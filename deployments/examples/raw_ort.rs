//! Raw ONNX Runtime, the baseline server numbers are compared with: one session (a replica's
//! options), inputs built once per batch size, `Session::run` timed in a loop on this thread.
//!
//! `cargo run --release -p sluice-deployments --example raw_ort -- MODEL [MIX] [SECONDS] [SEQ]`
//!
//! MIX is one batch size (`8`) or the batch sizes a server ran with how many model calls of
//! each (`1:120,2:40,3:7`, from `/v2/models/{m}/stats` `batch_stats`). Calls draw their batch
//! size at random in proportion to those counts, so every size runs under the same
//! conditions; each size runs at least twice. The answer is the throughput raw ONNX Runtime
//! would have running exactly that mix back to back: samples / Σ count × mean call time of
//! its size. Dynamic dimensions become the batch size for the first and SEQ (default 1) for
//! the others; data is zeros. Prints one JSON line.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ort::memory::Allocator;
use ort::session::Session;
use ort::value::{DynTensor, ValueType};

type Inputs = Vec<(String, DynTensor)>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).ok_or("usage: raw_ort MODEL [MIX] [SECONDS] [SEQ]")?;
    let mix = parse_mix(args.get(2).map_or("1", String::as_str))?;
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
        .with_memory_pattern(false)?
        .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(false).build()])?
        .commit_from_file(model)?;
    let mut inputs: BTreeMap<u64, Inputs> = BTreeMap::new();
    for &batch in mix.keys() {
        inputs.insert(batch, make_inputs(&session, batch as i64, seq)?);
    }
    let run = |session: &mut Session, inputs: &Inputs| -> Result<Duration, ort::Error> {
        let values: Vec<(&str, &DynTensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let t = Instant::now();
        session.run(values)?;
        Ok(t.elapsed())
    };
    // Warm-up: each size once, then random draws for a tenth of the time (at most 1 s).
    let mut rng = fastrand::Rng::with_seed(42);
    let total: u64 = mix.values().sum();
    let draw = |rng: &mut fastrand::Rng| {
        let mut r = rng.u64(..total);
        for (&b, &c) in &mix {
            if r < c {
                return b;
            }
            r -= c;
        }
        1
    };
    for b in inputs.values() {
        run(&mut session, b)?;
    }
    let warm_until = Instant::now() + Duration::from_secs_f64((seconds / 10.0).min(1.0));
    while Instant::now() < warm_until {
        let b = draw(&mut rng);
        run(&mut session, &inputs[&b])?;
    }
    // Measured: each size twice, then random draws until the time is up.
    let mut times: BTreeMap<u64, Vec<Duration>> = mix.keys().map(|&b| (b, Vec::new())).collect();
    for (b, x) in &inputs {
        for _ in 0..2 {
            times.entry(*b).or_default().push(run(&mut session, x)?);
        }
    }
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let b = draw(&mut rng);
        times.entry(b).or_default().push(run(&mut session, &inputs[&b])?);
    }
    let mean_us = |ts: &[Duration]| ts.iter().sum::<Duration>().as_secs_f64() * 1e6 / ts.len().max(1) as f64;
    let samples: u64 = mix.iter().map(|(b, c)| b * c).sum();
    let busy_us: f64 = mix.iter().map(|(b, &c)| c as f64 * mean_us(&times[b])).sum();
    let per_size: Vec<String> = times.iter().map(|(b, ts)| format!("\"{b}\": {:.2}", mean_us(ts))).collect();
    let calls: usize = times.values().map(Vec::len).sum();
    let mut all: Vec<Duration> = times.values().flatten().copied().collect();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1e6;
    let mix_text: Vec<String> = mix.iter().map(|(b, c)| format!("{b}:{c}")).collect();
    // p50/p99 describe single calls; with more than one size they mix sizes.
    println!(
        "{{\"model\": {model:?}, \"mix\": {:?}, \"seq\": {seq}, \"calls\": {calls}, \"samples_per_s\": {:.1}, \"mean_call_us\": {:.2}, \"p50_us\": {:.2}, \"p99_us\": {:.2}, \"mean_us_by_size\": {{{}}}}}",
        mix_text.join(","),
        samples as f64 / busy_us * 1e6,
        busy_us / total as f64,
        pct(0.5),
        pct(0.99),
        per_size.join(", ")
    );
    Ok(())
}

/// `8` or `1:120,2:40`: batch size → model calls (a lone size counts 1).
fn parse_mix(text: &str) -> Result<BTreeMap<u64, u64>, String> {
    let mut mix = BTreeMap::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (b, c) = part.split_once(':').unwrap_or((part, "1"));
        let bad = || format!("bad MIX entry `{part}` (want SIZE or SIZE:CALLS, sizes above 0)");
        let (b, c): (u64, u64) = (b.parse().map_err(|_| bad())?, c.parse().map_err(|_| bad())?);
        if b == 0 {
            return Err(bad());
        }
        if c > 0 {
            *mix.entry(b).or_default() += c;
        }
    }
    if mix.is_empty() { Err(format!("MIX `{text}` names no model call")) } else { Ok(mix) }
}

fn make_inputs(session: &Session, batch: i64, seq: i64) -> Result<Inputs, Box<dyn std::error::Error>> {
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
        inputs.push((input.name().to_string(), DynTensor::new(&Allocator::default(), *ty, dims)?));
    }
    Ok(inputs)
}
