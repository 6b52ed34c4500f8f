//! Every seed and every input a fuzzer ever crashed on (`fuzz/regressions/<target>/`) runs
//! through its target on each `cargo test`, so a crash fixed once stays fixed. Then a short,
//! seeded run of byte-level mutations of the seeds, so the targets themselves are exercised
//! even where libFuzzer is not (scripts/fuzz.sh runs the real thing).

use std::path::PathBuf;

fn regressions(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("regressions").join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    files.into_iter().map(|p| (p.display().to_string(), std::fs::read(&p).unwrap())).collect()
}

#[test]
fn seeds_and_saved_crashes_pass_every_target() {
    for (name, run) in sluice_fuzz::TARGETS {
        let seeds = sluice_fuzz::seeds(name);
        assert!(!seeds.is_empty(), "{name} has no seeds");
        for seed in &seeds {
            run(seed);
        }
        for (path, input) in regressions(name) {
            eprintln!("{path}");
            run(&input);
        }
    }
}

#[test]
fn regression_folders_name_real_targets() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("regressions");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            assert!(sluice_fuzz::target(&name).is_some(), "no target `{name}` for {}", path.display());
        }
    }
}

#[test]
fn mutated_seeds_never_panic() {
    let mut rng = fastrand_like(0x5eed);
    for (name, run) in sluice_fuzz::TARGETS {
        let seeds = sluice_fuzz::seeds(name);
        for i in 0..300 {
            let mut input = seeds[i % seeds.len()].clone();
            for _ in 0..1 + rng() % 4 {
                mutate(&mut input, &mut rng);
            }
            run(&input);
        }
    }
}

/// A small xorshift generator (deterministic: a failure reproduces).
fn fastrand_like(mut state: u64) -> impl FnMut() -> usize {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as usize
    }
}

/// One byte-level change: flip, set to an interesting value, insert, delete or duplicate.
fn mutate(input: &mut Vec<u8>, rng: &mut impl FnMut() -> usize) {
    if input.is_empty() {
        input.push(rng() as u8);
        return;
    }
    let at = rng() % input.len();
    match rng() % 5 {
        0 => input[at] ^= 1 << (rng() % 8),
        1 => input[at] = [0, 1, 0x7f, 0x80, 0xff, b'-', b'9', b'"', b'[', b'{'][rng() % 10],
        2 => input.insert(at, rng() as u8),
        3 => {
            input.remove(at);
        }
        _ => {
            let end = (at + 1 + rng() % 8).min(input.len());
            let chunk = input[at..end].to_vec();
            input.splice(at..at, chunk);
        }
    }
}
