//! Code that only starting ran, handed back once the server is warm (the config's
//! `release_startup_memory`; [`crate::Server::release_startup_memory`] calls this).
//!
//! Loading ONNX Runtime registers every kernel it has, which touches nearly all of its code:
//! about 19 MB of its library stayed resident in an idle server although a request runs a small
//! part of it. Those pages can be dropped and read back from the file when needed.
//! [`page_out_code`] asks the kernel to do that now (`MADV_PAGEOUT`) for the code and read-only
//! data of every program file the process maps (its own binary, ONNX Runtime, the C libraries):
//! the read-only mappings of files that are mapped executable. Other read-only files (a model's
//! weights, should they be mapped) are left alone. Once the warm-ups have read back what a model
//! call runs, [`drop_unmapped_cache`] drops what the kernel's read-ahead brought back with it.
//! Numbers: docs/benchmarks.md, "Idle RSS: start-up memory handed back".

use std::collections::HashSet;
use std::io;

/// What [`page_out_code`] did: resident memory (`VmRSS`, bytes) before and after, how many
/// mappings the kernel took the advice for, and the files they map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagedOut {
    pub before: u64,
    pub after: u64,
    pub mappings: usize,
    pub files: Vec<std::path::PathBuf>,
}

/// Pages out the read-only mappings of the program files the process maps (see the module
/// docs). Safe at any time: paging
/// out drops no data (a file page is read back when touched; a page the process changed, such
/// as relocated read-only data, goes to swap where there is swap and otherwise stays).
///
/// The kernel leaves resident what another process maps too (shared, so not this process's
/// cost) and the pages of files the process neither owns nor may write, unless it runs as root
/// (its rule against side channels); `madvise` succeeds either way, so `after` says what
/// happened. Fails where `/proc/self` cannot be read, where the kernel refused every mapping (no
/// `MADV_PAGEOUT` before Linux 5.4), and, as `Unsupported`, elsewhere than Linux.
pub fn page_out_code() -> io::Result<PagedOut> {
    #[cfg(target_os = "linux")]
    {
        let before = resident_bytes()?;
        let (files, ranges) = program_mappings()?;
        let mappings = page_out(&ranges)?;
        Ok(PagedOut { before, after: resident_bytes()?, mappings, files })
    }
    #[cfg(not(target_os = "linux"))]
    Err(io::Error::new(io::ErrorKind::Unsupported, "paging out code needs Linux"))
}

/// Turns on the release after each later model load: from now on, each ONNX Runtime session
/// build (a model deployed, a version loaded from the repository, a replica added or replaced)
/// runs inside [`around_session_build`]. The server calls it at the end of its start-up
/// release, so only where `release_startup_memory` is on.
pub fn release_after_loads() {
    sluice_deployments::onnx::around_session_builds(around_session_build);
}

/// Notes which pages of the program files the process has mapped now, and returns what pages
/// out, once the session is built, the ones the build added: ONNX Runtime's session-building
/// code, which requests do not run (about 5 MB of its library per deploy, measured). Pages that
/// were mapped before stay, so the code serving requests meanwhile is not paged out with them,
/// except what a request ran for the first time during the build (read back when run again).
/// Does nothing where the pages cannot be read.
fn around_session_build() -> sluice_deployments::onnx::AfterBuild {
    let Ok(before) = CodePages::now() else { return Box::new(|| {}) };
    Box::new(move || match page_out_added(&before) {
        Ok(bytes) => tracing::debug!("paged out {} KiB of code a model load touched", bytes / 1024),
        Err(e) => tracing::debug!("cannot page out what a model load touched: {e}"),
    })
}

/// Which pages of the program files' read-only mappings ([`program_file_ranges`]) are mapped
/// in this process: each range with one flag per page.
pub struct CodePages {
    ranges: Vec<(usize, usize, Vec<bool>)>,
}

impl CodePages {
    /// The mapped pages now (`/proc/self/pagemap`'s present bit).
    pub fn now() -> io::Result<Self> {
        #[cfg(target_os = "linux")]
        {
            let pagemap = std::fs::File::open("/proc/self/pagemap")?;
            let ranges = program_mappings()?
                .1
                .into_iter()
                .map(|(start, end)| Ok((start, end, present_pages(&pagemap, start, end)?)))
                .collect::<io::Result<_>>()?;
            Ok(Self { ranges })
        }
        #[cfg(not(target_os = "linux"))]
        Err(io::Error::new(io::ErrorKind::Unsupported, "reading mapped pages needs Linux"))
    }

    /// Whether the page at `at` was mapped (false where no range of these holds it).
    fn mapped_at(&self, at: usize, page: usize) -> bool {
        self.ranges
            .iter()
            .find(|(start, end, _)| (*start..*end).contains(&at))
            .is_some_and(|(start, _, mapped)| mapped.get((at - start) / page).copied().unwrap_or(false))
    }

    /// Pages mapped in total (for tests and logs).
    pub fn mapped(&self) -> usize {
        self.ranges.iter().map(|(_, _, p)| p.iter().filter(|&&p| p).count()).sum()
    }
}

/// Pages out the pages of the program files' read-only mappings that are mapped now and were
/// not in `before`; the bytes advised.
pub fn page_out_added(before: &CodePages) -> io::Result<usize> {
    let now = CodePages::now()?;
    let page = page_size();
    let mut runs = Vec::new();
    for (start, end, mapped) in &now.ranges {
        // Looked up by address, so that a mapping split, merged or resized since is compared
        // page by page too.
        let was: Vec<bool> = (*start..*end).step_by(page).map(|at| before.mapped_at(at, page)).collect();
        runs.extend(added_runs(*start, page, mapped, &was));
    }
    let bytes = runs.iter().map(|(s, e)| e - s).sum();
    #[cfg(target_os = "linux")]
    if !runs.is_empty() {
        page_out(&runs)?;
    }
    Ok(bytes)
}

/// The address ranges of the pages mapped in `now` and not in `was`, pages of `page` bytes
/// from `start`, adjacent pages joined.
fn added_runs(start: usize, page: usize, now: &[bool], was: &[bool]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut from = None;
    for (i, &mapped) in now.iter().enumerate() {
        let added = mapped && !was.get(i).copied().unwrap_or(false);
        match (added, from) {
            (true, None) => from = Some(i),
            (false, Some(f)) => {
                runs.push((start + f * page, start + i * page));
                from = None;
            }
            _ => {}
        }
    }
    if let Some(f) = from {
        runs.push((start + f * page, start + now.len() * page));
    }
    runs
}

fn page_size() -> usize {
    #[cfg(unix)]
    #[allow(unsafe_code)]
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    #[cfg(not(unix))]
    let size = 4096;
    usize::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// One flag per page of `[start, end)`: mapped in this process (the present bit of its
/// `/proc/self/pagemap` entry).
#[cfg(target_os = "linux")]
fn present_pages(pagemap: &std::fs::File, start: usize, end: usize) -> io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    let page = page_size();
    let mut entries = vec![0u8; (end - start) / page * 8];
    pagemap.read_exact_at(&mut entries, (start / page * 8) as u64)?;
    // Entries are 64-bit words in the machine's byte order; bit 63 is "present".
    Ok(entries
        .chunks_exact(8)
        .map(|e| u64::from_ne_bytes(e.try_into().unwrap_or_default()) >> 63 == 1)
        .collect())
}

/// The process's resident set (`VmRSS` of `/proc/self/status`) in bytes; an error where there
/// is no `/proc` (elsewhere than Linux).
pub fn resident_bytes() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status_kib(&status, "VmRSS:")
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no VmRSS in /proc/self/status"))
}

/// A `Key:   N kB` line's N (`/proc/PID/status`, `/proc/PID/smaps`).
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// One line of `/proc/self/maps`: its range, permissions and path (None for anonymous memory).
struct Mapping<'a> {
    start: usize,
    end: usize,
    perms: &'a [u8],
    path: Option<&'a str>,
}

fn parse_mapping(line: &str) -> Option<Mapping<'_>> {
    // Range, permissions, offset, device, inode, then the path (after padding; it may hold
    // spaces), absent for anonymous memory.
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?.as_bytes();
    let path = fields.nth(3).map(str::trim).filter(|p| p.starts_with('/'));
    let (start, end) = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
    (end > start && perms.len() >= 3).then_some(Mapping { start, end, perms, path })
}

/// An address range, start and end.
#[cfg(target_os = "linux")]
type Range = (usize, usize);

/// The program files the process maps ([`program_files`]) and the ranges of their read-only
/// mappings ([`program_file_ranges`]), from one reading of `/proc/self/maps`.
#[cfg(target_os = "linux")]
fn program_mappings() -> io::Result<(Vec<std::path::PathBuf>, Vec<Range>)> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let programs = program_files(&maps);
    let ranges = program_file_ranges(&maps, &programs);
    Ok((programs.into_iter().map(Into::into).collect(), ranges))
}

/// The files some mapping of the process executes: its binary and shared libraries.
fn program_files(maps: &str) -> HashSet<&str> {
    maps.lines().filter_map(parse_mapping).filter(|m| m.perms[2] == b'x').filter_map(|m| m.path).collect()
}

/// The ranges to page out: read-only mappings (not writable) of `programs` ([`program_files`]),
/// that is, program code and its read-only data.
fn program_file_ranges(maps: &str, programs: &HashSet<&str>) -> Vec<(usize, usize)> {
    maps.lines()
        .filter_map(parse_mapping)
        .filter(|m| m.perms[1] != b'w' && (m.perms[0] == b'r' || m.perms[2] == b'x'))
        .filter(|m| m.path.is_some_and(|p| programs.contains(p)))
        .map(|m| (m.start, m.end))
        .collect()
}

/// Advises `MADV_PAGEOUT` on each range; how many took it.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn page_out(ranges: &[(usize, usize)]) -> io::Result<usize> {
    let (mut done, mut failed) = (0, None);
    for &(start, end) in ranges {
        // SAFETY: MADV_PAGEOUT only reclaims pages; their contents stay as they were (read
        // back from the file, or swapped in, when next touched). A range unmapped since the maps
        // were read fails (ENOMEM), or, if something else was mapped there meanwhile, gets the
        // same harmless advice; a locked range fails (EINVAL). Failures are counted, not fatal.
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) };
        if rc == 0 {
            done += 1;
        } else {
            failed = Some(io::Error::last_os_error());
        }
    }
    match failed {
        Some(e) if done == 0 => Err(io::Error::new(e.kind(), format!("madvise(MADV_PAGEOUT): {e}"))),
        _ => Ok(done),
    }
}

/// Drops from the page cache the pages of `paged`'s files that no process maps now
/// (`POSIX_FADV_DONTNEED`; mapped pages stay). Run after the warm-ups: each page fault on code
/// reads ahead around it, megabytes at a time (`read_ahead_kb`; the kernel does it for
/// executable mappings whatever `madvise` says), so reading back what a model call runs brings
/// most of a library back into the cache, unmapped. Those pages are the kernel's to drop under
/// memory pressure anyway; dropping them now frees that memory at once. Another process that
/// later needs them reads them from the file again. Files that cannot be opened are skipped.
pub fn drop_unmapped_cache(paged: &PagedOut) {
    #[cfg(target_os = "linux")]
    for path in &paged.files {
        if let Ok(file) = std::fs::File::open(path) {
            use std::os::fd::AsRawFd;
            #[allow(unsafe_code)]
            // SAFETY: the descriptor is open for the call's duration; the advice only drops clean
            // cached pages that nothing maps, which are read from the file again when needed.
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = paged;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pages_mapped_since_a_snapshot_are_the_ones_paged_out() {
        let page = 4096;
        let now = [true, true, false, true, true, true, false];
        let was = [true, false, false, false, true, false, false];
        let at = |i: usize| 0x10_0000 + i * page;
        assert_eq!(
            added_runs(at(0), page, &now, &was),
            vec![(at(1), at(2)), (at(3), at(4)), (at(5), at(6))],
            "pages mapped before stay"
        );
        // Nothing mapped before: every mapped page, adjacent ones as one range.
        assert_eq!(added_runs(at(0), page, &now, &[false; 7]), vec![(at(0), at(2)), (at(3), at(6))]);
        // A run at the end of the range ends with it.
        assert_eq!(added_runs(at(0), page, &[false, true], &[false, false]), vec![(at(1), at(2))]);
        assert_eq!(added_runs(at(0), page, &[true, false], &[true, false]), vec![]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_mapped_code_of_this_process_is_read_and_compared_page_by_page() {
        let before = CodePages::now().unwrap();
        assert!(before.mapped() > 0, "this test's own code runs");
        let page = page_size();
        let (start, _, mapped) = before.ranges.iter().find(|(_, _, m)| m.contains(&true)).unwrap();
        let i = mapped.iter().position(|&m| m).unwrap();
        assert!(before.mapped_at(start + i * page, page));
        assert!(before.mapped_at(start + i * page + page / 2, page), "any address in the page");
        assert!(!before.mapped_at(0, page), "no mapping there");
        // What other tests' threads map meanwhile may be paged out; that is all.
        page_out_added(&before).unwrap();
    }

    #[test]
    fn the_read_only_mappings_of_program_files_are_paged_out() {
        let maps = "\
55d0a0000000-55d0a0100000 r--p 00000000 fd:01 99 /usr/bin/sluice
55d0a0100000-55d0a0900000 r-xp 00100000 fd:01 99 /usr/bin/sluice
55d0a0900000-55d0a0a00000 r--p 00900000 fd:01 99 /usr/bin/sluice
55d0a0a00000-55d0a0b00000 rw-p 00a00000 fd:01 99 /usr/bin/sluice
7f1c2a000000-7f1c2b000000 r-xp 00001000 fd:01 1234   /opt/my ort/libonnxruntime.so.1.32.0
7f1c2b000000-7f1c2b100000 ---p 00000000 fd:01 1234   /opt/my ort/libonnxruntime.so.1.32.0
7f1c2c000000-7f1c2d000000 r--p 00000000 fd:01 77 /models/big/model.onnx.data
7f1c2e000000-7f1c2e100000 rw-s 00000000 00:01 5 /memfd:buffer (deleted)
7ffd1000-7ffd2000 rw-p 00000000 00:00 0 [stack]
7ffd3000-7ffd4000 r-xp 00000000 00:00 0 [vdso]
7f0000000000-7f0000100000 r--p 00000000 00:00 0
not a line
";
        assert_eq!(
            program_file_ranges(maps, &program_files(maps)),
            [
                (0x55d0a0000000, 0x55d0a0100000),
                (0x55d0a0100000, 0x55d0a0900000),
                (0x55d0a0900000, 0x55d0a0a00000),
                (0x7f1c2a000000, 0x7f1c2b000000),
            ],
            "the binary's and the library's read-only mappings; not a data file, memory or a guard"
        );
    }

    #[test]
    fn status_lines_are_read_in_kib() {
        let status = "Name:\tsluice\nVmHWM:\t   50000 kB\nVmRSS:\t   41248 kB\nRssAnon:\t 11608 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(41248));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    /// On this process: the kernel takes the advice for its mappings, and the process goes on
    /// (the code paged out comes back when it runs). Whether pages actually leave depends on
    /// whether another process maps the test binary too, so the shrinking itself is checked
    /// with a server of its own (server/tests/cli.rs).
    #[cfg(target_os = "linux")]
    #[test]
    fn paging_out_this_process_keeps_it_working() {
        let paged = page_out_code().expect("this kernel pages out");
        assert!(paged.mappings > 0 && paged.before > 0 && paged.after > 0, "{paged:?}");
        let exe = std::env::current_exe().unwrap();
        assert!(paged.files.contains(&exe), "the test binary is among {:?}", paged.files);
        drop_unmapped_cache(&paged);
        let v: Vec<u64> = (0..1000).collect();
        assert_eq!(v.iter().sum::<u64>(), 499_500);
    }
}
