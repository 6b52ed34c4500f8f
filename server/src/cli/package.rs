//! `working_dir` packages for Ray jobs: a folder (hidden files and build output left out) plus
//! any extra files, zipped in memory and named by their content hash, so that Ray keeps one
//! copy however often the same package is submitted. Used by `sluice run --ray` and
//! `sluice job submit --working-dir`.

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Folder names never packaged, at any depth (besides hidden ones): caches and installed
/// packages.
const SKIPPED: [&str; 2] = ["__pycache__", "node_modules"];

/// Folder names never packaged at the top of the folder only: build output (`target` deeper
/// down, a repository model's name say, is packaged unless it holds Cargo's `CACHEDIR.TAG`).
const SKIPPED_AT_TOP: [&str; 1] = ["target"];

/// A zip being built.
pub struct Package {
    zip: zip::ZipWriter<std::io::Cursor<Vec<u8>>>,
}

impl Package {
    pub fn new() -> Self {
        Self { zip: zip::ZipWriter::new(std::io::Cursor::new(Vec::new())) }
    }

    /// Adds every file under `dir` (relative names), less hidden files, build output and the
    /// folder names in `skip`, and with `ignore_files`, what `.gitignore` and `.rayignore`
    /// files leave out (a job's folder, as `ray job submit` sends it; not a served config's,
    /// whose models a `.gitignore` commonly leaves out of git but the job needs).
    pub fn add_dir(&mut self, dir: &Path, skip: &[&str], ignore_files: bool) -> Result<(), String> {
        let mut files = Vec::new();
        let mut seen = std::collections::HashSet::new();
        if let Ok(real) = std::fs::canonicalize(dir) {
            seen.insert(real);
        }
        let mut walk =
            Walk { root: dir, skip, ignore_files, out: &mut files, seen: &mut seen, rules: Vec::new() };
        walk.collect(dir)?;
        for entry in files {
            match entry {
                Entry::File { rel, path, mode } => {
                    let data =
                        std::fs::read(&path).map_err(|e| format!("reading `{}`: {e}", path.display()))?;
                    self.add_with_mode(&rel, &data, mode)?;
                }
                Entry::EmptyDir { rel } => {
                    let options = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
                    self.zip
                        .add_directory(rel.as_str(), options)
                        .map_err(|e| format!("packaging {rel}: {e}"))?;
                }
            }
        }
        Ok(())
    }

    /// Adds one file; `exec` keeps it executable once unpacked.
    pub fn add(&mut self, name: &str, data: &[u8], exec: bool) -> Result<(), String> {
        self.add_with_mode(name, data, if exec { 0o755 } else { 0o644 })
    }

    /// Adds one file with its permission bits (Ray's unpacker sets them back, as it does for
    /// `ray job submit --working-dir`).
    fn add_with_mode(&mut self, name: &str, data: &[u8], mode: u32) -> Result<(), String> {
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(mode)
            .large_file(data.len() as u64 >= u32::MAX as u64);
        self.zip.start_file(name, options).map_err(|e| format!("packaging {name}: {e}"))?;
        self.zip.write_all(data).map_err(|e| format!("packaging {name}: {e}"))
    }

    /// The zip's bytes and its name, `<prefix>-<first 16 hex digits of its SHA-256>.zip`.
    pub fn finish(self, prefix: &str) -> Result<(Vec<u8>, String), String> {
        let bytes = self.zip.finish().map_err(|e| e.to_string())?.into_inner();
        let name = format!("{prefix}-{}.zip", &hex(&Sha256::digest(&bytes))[..16]);
        Ok((bytes, name))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a package holds under its folder.
enum Entry {
    /// A file, with its permission bits (a script's execute bit: `./train.sh` was refused
    /// once unpacked).
    File { rel: String, path: PathBuf, mode: u32 },
    /// A folder with nothing packaged in it (`logs/`, which a job writes into), kept as Ray's
    /// packager keeps it.
    EmptyDir { rel: String },
}

/// The files in a folder that name what is left out below it, as Ray's packager reads them.
const IGNORE_FILES: [&str; 2] = [".gitignore", ".rayignore"];

/// The rules of `dir`'s [`IGNORE_FILES`], if it has any.
fn ignore_rules(dir: &Path) -> Result<Option<ignore::gitignore::Gitignore>, String> {
    let mut builder = ignore::gitignore::GitignoreBuilder::new(dir);
    let mut any = false;
    for name in IGNORE_FILES {
        let file = dir.join(name);
        if file.is_file() {
            any = true;
            if let Some(e) = builder.add(&file) {
                return Err(format!("reading `{}`: {e}", file.display()));
            }
        }
    }
    if !any {
        return Ok(None);
    }
    builder.build().map(Some).map_err(|e| format!("reading the ignore files of `{}`: {e}", dir.display()))
}

/// Whether the rules in force (`rules`, the outermost folder's first) leave `path` out: the
/// innermost that says anything about it decides (a `!name` below undoes an outer rule).
fn ignored(rules: &[ignore::gitignore::Gitignore], path: &Path, is_dir: bool) -> bool {
    rules.iter().rev().map(|r| r.matched(path, is_dir)).find(|m| !m.is_none()).is_some_and(|m| m.is_ignore())
}

/// A walk of a package's folder: files under `root`, skipping hidden ones, build output,
/// `skip` and (`ignore_files`) what the `.gitignore` and `.rayignore` files of the folders walked
/// leave out, as `ray job submit --working-dir` does (a training folder's ignored data was read
/// whole into memory and uploaded), with git's rules (the innermost file naming a path
/// decides); and the folders left empty. A link to nothing is left out
/// with a warning (Ray's packager skips it too); a link to a folder above it is not followed
/// (`seen`: the folders being walked). Errors name the path.
struct Walk<'a> {
    root: &'a Path,
    skip: &'a [&'a str],
    ignore_files: bool,
    out: &'a mut Vec<Entry>,
    seen: &'a mut std::collections::HashSet<PathBuf>,
    /// The ignore rules in force, the outermost folder's first.
    rules: Vec<ignore::gitignore::Gitignore>,
}

impl Walk<'_> {
    fn collect(&mut self, dir: &Path) -> Result<(), String> {
        let own = if self.ignore_files { ignore_rules(dir)? } else { None };
        let pushed = own.is_some();
        self.rules.extend(own);
        let walked = self.collect_in(dir);
        if pushed {
            self.rules.pop();
        }
        walked
    }

    fn collect_in(&mut self, dir: &Path) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let reading = |path: &Path, e: std::io::Error| format!("reading `{}`: {e}", path.display());
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .and_then(|entries| entries.collect::<Result<_, _>>())
            .map_err(|e| reading(dir, e))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().to_string();
            let name = name.as_str();
            if name.starts_with('.')
                || SKIPPED.contains(&name)
                || (dir == self.root && SKIPPED_AT_TOP.contains(&name))
                || self.skip.contains(&name)
            {
                continue;
            }
            let path = e.path();
            let meta = match std::fs::metadata(&path) {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.is_symlink() => {
                    eprintln!("warning: not packaged: `{}` is a link to nothing", path.display());
                    continue;
                }
                Err(e) => return Err(reading(&path, e)),
            };
            if ignored(&self.rules, &path, meta.is_dir()) {
                continue;
            }
            if meta.is_dir() {
                // Build output and caches mark themselves so (Cargo's `target` anywhere below).
                if path.join("CACHEDIR.TAG").is_file() {
                    continue;
                }
                // A link to a folder it is inside would loop; a folder reached twice otherwise (a
                // `current` link beside the version it names) is packaged under both names.
                let real = std::fs::canonicalize(&path).map_err(|e| reading(&path, e))?;
                if self.seen.insert(real.clone()) {
                    let before = self.out.len();
                    let walked = self.collect(&path);
                    self.seen.remove(&real);
                    walked?;
                    if self.out.len() == before {
                        self.out.push(Entry::EmptyDir { rel: format!("{}/", relative(self.root, &path)) });
                    }
                }
            } else if meta.is_file() {
                let mode = meta.permissions().mode() & 0o777;
                self.out.push(Entry::File { rel: relative(self.root, &path), path, mode });
            }
        }
        Ok(())
    }
}

/// `path`'s name under `root`.
fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).to_string_lossy().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_packaged_without_hidden_files_and_named_by_its_content() {
        let dir = std::env::temp_dir().join(format!("sluice-pkg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::create_dir_all(dir.join(".git")).unwrap();
        std::fs::write(dir.join("train.py"), b"print(1)").unwrap();
        std::fs::write(dir.join("sub/data.csv"), b"1,2").unwrap();
        std::fs::write(dir.join(".git/HEAD"), b"x").unwrap();
        let pack = || {
            let mut p = Package::new();
            p.add_dir(&dir, &[], true).unwrap();
            p.finish("job").unwrap()
        };
        let (bytes, name) = pack();
        assert_eq!(pack().1, name, "same content, same name");
        assert!(name.starts_with("job-") && name.ends_with(".zip"), "{name}");
        let zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        let mut names: Vec<String> = zip.file_names().map(|n| n.unwrap().to_string()).collect();
        names.sort();
        assert_eq!(names, ["sub/data.csv", "train.py"]);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// What `.gitignore` and `.rayignore` leave out is not packaged (a job's folder), below their folder, as
    /// Ray's packager does (a training folder's ignored data and checkpoints were read whole into
    /// memory and uploaded); an inner `!` rule keeps a file an outer one leaves out.
    #[test]
    fn what_gitignore_and_rayignore_leave_out_is_not_packaged() {
        let dir = std::env::temp_dir().join(format!("sluice-pkg-ignore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["data", "src/checkpoints", "src/keep"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join(".gitignore"), "data/\n*.ckpt\n").unwrap();
        std::fs::write(dir.join("src/.rayignore"), "checkpoints/\n!best.ckpt\n").unwrap();
        for f in [
            "train.py",
            "data/big.bin",
            "src/model.py",
            "src/checkpoints/1.pt",
            "src/last.ckpt",
            "src/best.ckpt",
        ] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        std::fs::write(dir.join("src/keep/a.ckpt"), b"x").unwrap();
        let mut p = Package::new();
        p.add_dir(&dir, &[], true).unwrap();
        let zip = zip::ZipArchive::new(std::io::Cursor::new(p.finish("job").unwrap().0)).unwrap();
        let mut names: Vec<String> = zip.file_names().map(|n| n.unwrap().to_string()).collect();
        names.sort();
        // `src/keep` held only an ignored file: kept, empty.
        assert_eq!(names, ["src/best.ckpt", "src/keep/", "src/model.py", "train.py"]);
        // A served config's folder takes no ignore files: its models are often left out of git.
        let mut p = Package::new();
        p.add_dir(&dir, &[], false).unwrap();
        let zip = zip::ZipArchive::new(std::io::Cursor::new(p.finish("job").unwrap().0)).unwrap();
        assert_eq!(zip.len(), 7, "{:?}", zip.file_names().collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A script keeps its execute bit (`./train.sh` was refused once unpacked: every file was
    /// packaged 0644), and an empty folder is kept (a job writing into `logs/` found none), as
    /// `ray job submit --working-dir` sends them.
    #[test]
    fn modes_and_empty_folders_are_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sluice-pkg-modes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        std::fs::create_dir_all(dir.join("out/.cache")).unwrap();
        std::fs::write(dir.join("train.sh"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(dir.join("train.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
        std::fs::write(dir.join("data.csv"), b"1").unwrap();
        std::fs::set_permissions(dir.join("data.csv"), std::fs::Permissions::from_mode(0o640)).unwrap();
        let mut p = Package::new();
        p.add_dir(&dir, &[], true).unwrap();
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(p.finish("job").unwrap().0)).unwrap();
        let mut names: Vec<String> = zip.file_names().map(|n| n.unwrap().to_string()).collect();
        names.sort();
        assert_eq!(names, ["data.csv", "logs/", "out/", "train.sh"]);
        assert_eq!(zip.by_name("train.sh").unwrap().unix_mode().unwrap() & 0o777, 0o750);
        assert_eq!(zip.by_name("data.csv").unwrap().unix_mode().unwrap() & 0o777, 0o640);
        assert!(zip.by_name("logs/").unwrap().is_dir());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A link to nothing (a `latest` whose run was deleted) failed the whole package with an
    /// error naming the folder; a link back up looped; `target` below the top (a repository
    /// model of that name) was left out, as build output is at the top, and build output below
    /// is known by its `CACHEDIR.TAG`; a folder and a link to it are both packaged.
    #[test]
    fn dangling_links_are_left_out_loops_end_and_only_the_top_target_is_skipped() {
        let dir = std::env::temp_dir().join(format!("sluice-pkg-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("models/target/1")).unwrap();
        std::fs::create_dir_all(dir.join("target/release")).unwrap();
        std::fs::write(dir.join("models/target/1/model.onnx"), b"onnx").unwrap();
        std::fs::write(dir.join("target/release/big"), b"build output").unwrap();
        std::fs::create_dir_all(dir.join("tools/x/target")).unwrap();
        std::fs::write(
            dir.join("tools/x/target/CACHEDIR.TAG"),
            b"Signature: 8a477f597d28d172789f06886806bc55",
        )
        .unwrap();
        std::fs::write(dir.join("tools/x/target/big"), b"build output").unwrap();
        std::os::unix::fs::symlink(dir.join("run-42"), dir.join("latest")).unwrap();
        std::os::unix::fs::symlink(&dir, dir.join("models/up")).unwrap();
        std::os::unix::fs::symlink(dir.join("models/target"), dir.join("models/current")).unwrap();
        let mut p = Package::new();
        p.add_dir(&dir, &[], true).unwrap();
        let zip = zip::ZipArchive::new(std::io::Cursor::new(p.finish("job").unwrap().0)).unwrap();
        let mut names: Vec<String> = zip.file_names().map(|n| n.unwrap().to_string()).collect();
        names.sort();
        // `tools/x` held only build output: kept, empty (a folder with nothing packaged in it).
        assert_eq!(names, ["models/current/1/model.onnx", "models/target/1/model.onnx", "tools/x/"]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
