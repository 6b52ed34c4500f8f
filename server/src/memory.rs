//! Memory that only starting needed, handed back once the server is warm
//! (the config's `release_startup_memory`).
//!
//! Loading ONNX Runtime registers every kernel it has, which touches nearly all of its code:
//! about 19 MB of its library stay resident in an idle server although a request runs a small
//! part of it. Those are clean pages of a file: the kernel can drop them and read back any it
//! needs later. [`release_startup_memory`] asks it to do that now (`MADV_PAGEOUT`) for every
//! read-only file mapping of the process (its own binary's too), and returns to the system the
//! heap that loading freed (mimalloc's purge; glibc's `malloc_trim` where glibc serves C). The
//! first requests after it read back the code they run (measured in docs/benchmarks.md, "Idle
//! RSS: start-up memory handed back").

use std::io;

/// Resident memory (`VmRSS`) around [`release_startup_memory`], in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub before: u64,
    pub after: u64,
}

/// Pages out the process's read-only file mappings and trims the heaps; see the module docs.
/// Safe to call at any time: paging out drops no data (a page is read back from its file when
/// touched). Fails only where `/proc/self` cannot be read or the kernel pages nothing out (no
/// `MADV_PAGEOUT` before Linux 5.4); elsewhere than Linux it releases nothing. Pages that
/// another process maps too stay, and so do those of a file the process neither owns nor may
/// write, unless it runs as root (the kernel's rule against side channels).
pub fn release_startup_memory() -> io::Result<Released> {
    let before = resident_bytes()?;
    crate::alloc::purge_freed_memory();
    trim_c_heap();
    page_out_file_mappings()?;
    Ok(Released { before, after: resident_bytes()? })
}

/// The process's resident set (`VmRSS` of `/proc/self/status`) in bytes; 0 where there is none.
pub fn resident_bytes() -> io::Result<u64> {
    #[cfg(target_os = "linux")]
    {
        let status = std::fs::read_to_string("/proc/self/status")?;
        Ok(status_kib(&status, "VmRSS:").unwrap_or(0) * 1024)
    }
    #[cfg(not(target_os = "linux"))]
    Ok(0)
}

/// A `Key:   N kB` line's N.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// A mapping of `/proc/self/maps` worth paging out: backed by a file, and not writable (code and
/// read-only data; the kernel keeps any page another process maps too).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn read_only_file_range(line: &str) -> Option<(usize, usize)> {
    let mut fields = line.split_ascii_whitespace();
    let range = fields.next()?;
    let perms = fields.next()?.as_bytes();
    let path = fields.nth(3)?;
    if !path.starts_with('/') || perms.len() < 2 || perms[1] == b'w' || perms[0] != b'r' {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    let (start, end) = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
    (end > start).then_some((start, end))
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn page_out_file_mappings() -> io::Result<()> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let (mut done, mut failed) = (0, None);
    for (start, end) in maps.lines().filter_map(read_only_file_range) {
        // SAFETY: MADV_PAGEOUT only reclaims pages; contents stay as they were (a file page is
        // read back, an anonymous one swapped in, when next touched). A range unmapped since the
        // read fails (ENOMEM) and is skipped, as is a locked one (EINVAL).
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) };
        if rc == 0 {
            done += 1;
        } else {
            failed = Some(io::Error::last_os_error());
        }
    }
    match failed {
        // Every call refused: a kernel without MADV_PAGEOUT (before Linux 5.4) says EINVAL.
        Some(e) if done == 0 => Err(io::Error::new(e.kind(), format!("madvise(MADV_PAGEOUT): {e}"))),
        _ => Ok(()),
    }
}

#[cfg(not(target_os = "linux"))]
fn page_out_file_mappings() -> io::Result<()> {
    Ok(())
}

/// Returns glibc's free heap to the system where glibc's malloc serves ONNX Runtime (the
/// `malloc-override` feature off); with it on, mimalloc serves both and its purge covers it.
#[allow(unsafe_code)]
fn trim_c_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "malloc-override")))]
    // SAFETY: malloc_trim takes no pointers and may be called from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_read_only_file_mappings_are_paged_out() {
        let code = "7f1c2a000000-7f1c2b000000 r-xp 00001000 fd:01 1234   /opt/ort/libonnxruntime.so.1.32.0";
        assert_eq!(read_only_file_range(code), Some((0x7f1c2a000000, 0x7f1c2b000000)));
        let rodata = "55d0a0000000-55d0a0100000 r--p 00000000 fd:01 99 /usr/bin/sluice";
        assert_eq!(read_only_file_range(rodata), Some((0x55d0a0000000, 0x55d0a0100000)));
        for kept in [
            "55d0a0100000-55d0a0200000 rw-p 00100000 fd:01 99 /usr/bin/sluice",
            "7ffd1000-7ffd2000 rw-p 00000000 00:00 0 [stack]",
            "7ffd3000-7ffd4000 r-xp 00000000 00:00 0 [vdso]",
            "7f0000000000-7f0000100000 r--p 00000000 00:00 0 ",
            "7f0000100000-7f0000200000 ---p 00000000 fd:01 5 /lib/libc.so.6",
            "not a line",
        ] {
            assert_eq!(read_only_file_range(kept), None, "{kept}");
        }
    }

    #[test]
    fn status_lines_are_read_in_kib() {
        let status = "Name:\tsluice\nVmHWM:\t   50000 kB\nVmRSS:\t   41248 kB\nRssAnon:\t 11608 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(41248));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    /// Paging out the test binary's own code and reading it back: the process goes on, and where
    /// the kernel pages out, the resident set shrinks. Nothing here is timed.
    #[cfg(target_os = "linux")]
    #[test]
    fn releasing_pages_out_this_binary_and_keeps_it_working() {
        let file_kib =
            || status_kib(&std::fs::read_to_string("/proc/self/status").unwrap(), "RssFile:").unwrap();
        let before = file_kib();
        let released = release_startup_memory().expect("this kernel pages out");
        let after = file_kib();
        assert!(released.before > 0 && released.after > 0, "{released:?}");
        // The test binary's own code (megabytes, mapped by this process alone) was resident.
        assert!(after < before, "resident file pages {before} kB before, {after} kB after");
        // The code paged out comes back when it runs.
        let v: Vec<u64> = (0..1000).collect();
        assert_eq!(v.iter().sum::<u64>(), 499_500);
    }
}
