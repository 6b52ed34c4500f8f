//! Writes each fuzz target's seed inputs to `DIR/<target>/seed-N` (scripts/fuzz.sh starts
//! libFuzzer's corpus from them).

fn main() -> std::io::Result<()> {
    let dir =
        std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/libfuzzer/corpus".into()));
    for (name, _) in sluice_fuzz::TARGETS {
        let folder = dir.join(name);
        std::fs::create_dir_all(&folder)?;
        for (i, seed) in sluice_fuzz::seeds(name).iter().enumerate() {
            std::fs::write(folder.join(format!("seed-{i}")), seed)?;
        }
    }
    Ok(())
}
