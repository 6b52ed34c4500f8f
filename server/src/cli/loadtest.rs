//! `sluice loadtest`: runs the `sluice-loadtest` binary installed next to this one.

use std::process::ExitCode;

pub fn loadtest(args: &[String]) -> ExitCode {
    let exe = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("sluice-loadtest")));
    let Some(exe) = exe.filter(|p| p.is_file()) else {
        eprintln!(
            "error: sluice-loadtest is not installed next to sluice; build it with `cargo build --release -p sluice-loadtest`"
        );
        return ExitCode::FAILURE;
    };
    match std::process::Command::new(&exe).args(args).status() {
        Ok(status) => ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: cannot run {}: {e}", exe.display());
            ExitCode::FAILURE
        }
    }
}
