//! The local disk cache of object-storage models, one per node: a version's files land in
//! `<cache_dir>/<hash of the repository URL>/<model>/<version>/<contents>/`, where `<contents>`
//! is a digest of the version's file names, sizes and entity tags, each file beside a small
//! record of the size and tag it was fetched at. A version rewritten in place in the store
//! lands in a folder of its own: the files the running copy was loaded from stay as they were,
//! for the replicas that start later (a scale-up, a restart), until the new contents load and
//! the old folder is pruned ([`Cache::prune`]). A file with the same size and tag cached for any
//! version of the model is linked, not downloaded again; each file is fetched into a temporary
//! name and renamed into place only once every file of the version is here, so a reader
//! (another replica on the node) never sees half a file and a failed fetch leaves nothing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::store::{Store, StoreError, StoredFile};

/// What fetching one version did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fetched {
    /// The folder holding the version's files.
    pub dir: PathBuf,
    /// Bytes downloaded now (0 when every file was cached).
    pub downloaded: u64,
    /// Files downloaded now.
    pub files_downloaded: usize,
    /// Files taken from another cached version of the model (same size and tag).
    pub reused: usize,
}

/// The cache under one folder.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

/// The record kept beside each cached file.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
struct Record {
    size: u64,
    etag: Option<String>,
}

const RECORD_SUFFIX: &str = ".sluice-record";

/// How long a cached version's folder nobody marks used ([`Cache::touch`]) stays before a prune
/// removes it.
pub const UNUSED_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

/// How long ago a folder in use may have been marked used before a server marks it again
/// between its polls (polling off, or an interval above [`UNUSED_FOR`]).
pub const MARK_USED_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl Cache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Where `store`'s version `model/version` is (or will be) cached: the folder above its
    /// contents' folders (a local repository's own folder, read in place).
    pub fn version_dir(&self, store: &Store, model: &str, version: &str) -> PathBuf {
        if let Some(root) = store.local_root() {
            return root.join(model).join(version);
        }
        self.dir.join(hex(&Sha256::digest(store.url().as_bytes()))).join(model).join(version)
    }

    /// The folder `files` (one version's, as listed) are cached in: one per contents, so that
    /// contents rewritten in place never replace those a running copy was loaded from.
    pub fn files_dir(&self, store: &Store, model: &str, version: &str, files: &[StoredFile]) -> PathBuf {
        let dir = self.version_dir(store, model, version);
        if store.local_root().is_some() {
            return dir;
        }
        let mut digest = Sha256::new();
        let mut sorted: Vec<&StoredFile> = files.iter().collect();
        sorted.sort_by(|a, b| a.key.cmp(&b.key));
        for f in sorted {
            let name = f.key.rsplit('/').next().unwrap_or_default();
            let etag = f.etag.as_deref().unwrap_or_default();
            digest.update(format!("{name}\0{}\0{etag}\0", f.size).as_bytes());
        }
        dir.join(hex(&digest.finalize()))
    }

    /// Removes the contents' folders of `store`'s repository in this cache that `in_use` does
    /// not hold and no one has used for [`UNUSED_FOR`] (contents superseded, versions no longer
    /// served, models gone from the store: every version a training job wrote stayed on disk),
    /// the version and model folders that leaves empty, and the files of fetches that were
    /// killed in the folders kept; returns how many contents' folders went. The folders in use
    /// are marked used now ([`Cache::touch`]); another server sharing `cache_dir` marks its own
    /// at each of its polls, so what it serves is never taken for unused.
    pub async fn prune(&self, store: &Store, in_use: &std::collections::BTreeSet<PathBuf>) -> usize {
        self.touch(in_use).await;
        let mut removed = 0;
        let root = self.dir.join(hex(&Sha256::digest(store.url().as_bytes())));
        let abandoned = abandoned_after(store);
        for model in subdirs(&root).await {
            for version in subdirs(&model).await {
                for contents in subdirs(&version).await {
                    if in_use.contains(&contents) {
                        sweep_abandoned(&contents, abandoned).await;
                        continue;
                    }
                    let idle = tokio::fs::metadata(&contents).await.ok().and_then(|m| m.modified().ok());
                    let unused = idle.and_then(|t| t.elapsed().ok()).is_some_and(|idle| idle >= UNUSED_FOR);
                    if unused
                        && !FetchLock::held_in(&contents)
                        && contents.file_name().and_then(|n| n.to_str()).is_some_and(is_contents_name)
                        && tokio::fs::remove_dir_all(&contents).await.is_ok()
                    {
                        removed += 1;
                    }
                }
                // Only when empty.
                let _ = tokio::fs::remove_dir(&version).await;
            }
            let _ = tokio::fs::remove_dir(&model).await;
        }
        removed
    }

    /// Marks the contents' folders in `in_use` used now (their modification time), so that no
    /// prune, this server's or another's sharing the cache, takes them for unused.
    pub async fn touch(&self, in_use: &std::collections::BTreeSet<PathBuf>) {
        let now = std::time::SystemTime::now();
        for dir in in_use.iter().filter(|d| d.starts_with(&self.dir)) {
            if let Ok(f) = std::fs::File::open(dir) {
                let _ = f.set_modified(now);
            }
        }
    }

    /// Marks used again the folders of `in_use` last marked [`MARK_USED_AFTER`] ago or more:
    /// a server that polls rarely or never keeps what it serves from another's prune.
    pub async fn touch_stale(&self, in_use: &std::collections::BTreeSet<PathBuf>) {
        let stale = in_use
            .iter()
            .filter(|dir| {
                let marked = std::fs::metadata(dir).and_then(|m| m.modified()).ok();
                marked.and_then(|t| t.elapsed().ok()).is_some_and(|ago| ago >= MARK_USED_AFTER)
            })
            .cloned()
            .collect();
        self.touch(&stale).await;
    }

    /// Makes `files` (one version's, keys `model/version/name`) present in the cache; a local
    /// repository is read in place and nothing is copied. Fails naming the repository and the
    /// file when one cannot be fetched, or when the version is above `max_bytes` in all.
    pub async fn fetch(
        &self,
        store: &Store,
        model: &str,
        version: &str,
        files: &[StoredFile],
        max_bytes: u64,
    ) -> Result<Fetched, StoreError> {
        let dir = self.files_dir(store, model, version, files);
        let mut out = Fetched { dir: dir.clone(), ..Fetched::default() };
        if store.local_root().is_some() {
            return Ok(out);
        }
        let total: u64 = files.iter().map(|f| f.size).sum();
        if total > max_bytes {
            return Err(StoreError::TooBig {
                url: store.url().to_string(),
                file: format!("{model}/{version}"),
                bytes: total,
                max: max_bytes,
            });
        }
        let io = |file: &str, e: std::io::Error| StoreError::File {
            url: store.url().to_string(),
            file: file.to_string(),
            message: format!("cache `{}`: {e}", dir.display()),
        };
        tokio::fs::create_dir_all(&dir).await.map_err(|e| io(&format!("{model}/{version}"), e))?;
        // This fetch's files are named by its token and held by its lock while it runs (another
        // fetch into the folder, in this process or another on the node, sees it alive).
        let (token, lock) = FetchLock::take(&dir).map_err(|e| io(&format!("{model}/{version}"), e))?;
        // A fetch into this folder that was killed (a replica past its start timeout, a crash)
        // left its temporary files: each try started again beside them.
        sweep_abandoned(&dir, abandoned_after(store)).await;
        // Every file not cached yet is fetched under a temporary name first; only when all of
        // them are here are they renamed into place. A fetch that fails part-way leaves nothing
        // (a multi-file version is never half there on disk).
        let mut staged = Staged { files: Vec::new(), lock: Some(lock) };
        for f in files {
            let Some(name) = f.key.rsplit('/').next().filter(|n| !n.is_empty()) else { continue };
            let dest = dir.join(name);
            let want = Record { size: f.size, etag: f.etag.clone() };
            if cached(&dest, &want).await {
                continue;
            }
            let temp = dir.join(format!(".{name}.part-{token}"));
            // The same file (size and tag) cached for another version of the model: linked,
            // not downloaded.
            if let Some(same) = same_elsewhere(&dir, name, &want).await
                && (tokio::fs::hard_link(&same, &temp).await.is_ok()
                    || tokio::fs::copy(&same, &temp).await.is_ok())
            {
                out.reused += 1;
            } else {
                let got = store.download(f, &temp, max_bytes).await;
                let got = match got {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tokio::fs::remove_file(&temp).await;
                        staged.discard(&dir).await;
                        return Err(e);
                    }
                };
                out.downloaded += got;
                out.files_downloaded += 1;
                crate::repository::metrics::downloaded(got);
            }
            let record = serde_json::to_vec(&want).unwrap_or_default();
            let record_temp = dir.join(format!(".{name}.record-{token}"));
            staged.files.push((temp, dest.clone(), f.key.clone()));
            if let Err(e) = tokio::fs::write(&record_temp, record).await {
                let _ = tokio::fs::remove_file(&record_temp).await;
                staged.discard(&dir).await;
                return Err(io(&f.key, e));
            }
            staged.files.push((record_temp, record_path(&dest), f.key.clone()));
        }
        // Each file before its record: a record never vouches for a file not yet in place.
        let mut moves = std::mem::take(&mut staged.files).into_iter();
        while let Some((temp, dest, key)) = moves.next() {
            if let Err(e) = tokio::fs::rename(&temp, &dest).await {
                staged.files.push((temp, dest, key.clone()));
                staged.files.extend(moves);
                staged.discard(&dir).await;
                return Err(io(&key, e));
            }
        }
        drop(staged.lock.take());
        Ok(out)
    }
}

/// A running fetch's lock, `.fetch-TOKEN.lock` in its folder, held (`flock`) until it ends and
/// removed then. A fetch whose process was killed leaves it unheld: its files are abandoned.
struct FetchLock {
    path: Option<PathBuf>,
    _file: Option<std::fs::File>,
}

impl FetchLock {
    /// A new fetch's token (its process, a count and the time: a process that is PID 1 in each
    /// container, or again after a restart, is another fetch) and its lock. The lock file is
    /// made and locked under a name no sweep reads, then named: one named before it was locked
    /// could be taken for a killed fetch's and removed. Where the filesystem has no `flock`,
    /// the fetch goes on without a lock (its files then go by the time rule).
    fn take(dir: &Path) -> std::io::Result<(String, Self)> {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let token = format!("{}-{seq}-{nanos:x}", std::process::id());
        let making = dir.join(format!(".fetching-{token}"));
        let file = std::fs::File::options().write(true).create_new(true).open(&making)?;
        if file.lock().is_err() {
            let _ = std::fs::remove_file(&making);
            return Ok((token, Self { path: None, _file: None }));
        }
        let path = dir.join(format!(".fetch-{token}.lock"));
        std::fs::rename(&making, &path)?;
        Ok((token, Self { path: Some(path), _file: Some(file) }))
    }

    /// Whether a running fetch holds a lock in `dir` (its folder is not unused, whatever its
    /// time says: a large file being written does not change the folder's).
    fn held_in(dir: &Path) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else { return false };
        entries.flatten().any(|e| {
            let name = e.file_name();
            let token = name.to_str().and_then(|n| n.strip_prefix(".fetch-")?.strip_suffix(".lock"));
            token.is_some_and(|t| fetch_gone(dir, t) == Some(false))
        })
    }
}

impl Drop for FetchLock {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Files fetched under temporary names: (temporary, final, the store's key); and the fetch's
/// lock.
struct Staged {
    files: Vec<(PathBuf, PathBuf, String)>,
    lock: Option<FetchLock>,
}

impl Staged {
    /// Removes what was fetched (the fetch failed part-way) and its lock, and `dir` when that
    /// leaves it empty (contents never fetched whole).
    async fn discard(&mut self, dir: &Path) {
        for (temp, _, _) in self.files.drain(..) {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        drop(self.lock.take());
        let _ = tokio::fs::remove_dir(dir).await;
    }
}

/// How long a fetch's temporary file, with no lock file of its fetch beside it, goes unwritten
/// before it is taken for a killed fetch's: 10 minutes, or twice the store's timeout (a fetch
/// that goes that long without a byte has failed).
fn abandoned_after(store: &Store) -> std::time::Duration {
    std::time::Duration::from_secs(600).max(store.timeout().saturating_mul(2))
}

/// The fetch token of a fetch's file: `.NAME.part-TOKEN`, `.NAME.record-TOKEN`,
/// `.fetch-TOKEN.lock`; None for any other name.
fn fetch_token(name: &str) -> Option<&str> {
    if !name.starts_with('.') {
        return None;
    }
    if let Some(lock) = name.strip_prefix(".fetch-") {
        return lock.strip_suffix(".lock");
    }
    [".part-", ".record-"].iter().find_map(|mark| name.rfind(mark).map(|i| &name[i + mark.len()..]))
}

/// Whether the fetch of `token` in `dir` has ended without cleaning up: its lock file is there
/// and no one holds it. None when it has no lock file (a file of an older Sluice's).
fn fetch_gone(dir: &Path, token: &str) -> Option<bool> {
    let file = std::fs::File::options().write(true).open(dir.join(format!(".fetch-{token}.lock"))).ok()?;
    Some(match file.try_lock() {
        Ok(()) => true,
        Err(std::fs::TryLockError::WouldBlock) => false,
        Err(std::fs::TryLockError::Error(_)) => false,
    })
}

/// Removes the files in `dir` of fetches that ended without cleaning up: those whose lock no
/// one holds (their process was killed), and, without a lock file, those not written for
/// `after`; returns how many. A running fetch's files (its lock held, in this process or
/// another on the node) stay, however long ago they were written (a file linked from another
/// version has that version's time, and a file fetched waits for the version's others).
async fn sweep_abandoned(dir: &Path, after: std::time::Duration) -> usize {
    let mut removed = 0;
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else { return 0 };
    let mut gone_locks = Vec::new();
    while let Ok(Some(e)) = entries.next_entry().await {
        let name = e.file_name();
        let Some(token) = name.to_str().and_then(fetch_token) else { continue };
        let abandoned = match fetch_gone(dir, token) {
            Some(gone) => gone,
            None => {
                let idle =
                    e.metadata().await.ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
                idle.is_some_and(|idle| idle >= after)
            }
        };
        if !abandoned {
            continue;
        }
        if name.to_str().is_some_and(|n| n.starts_with(".fetch-")) {
            gone_locks.push(e.path());
        } else if tokio::fs::remove_file(e.path()).await.is_ok() {
            removed += 1;
        }
    }
    // Last: a lock file removed first would leave its fetch's files to the time rule.
    for lock in gone_locks {
        let _ = tokio::fs::remove_file(lock).await;
    }
    removed
}

/// The folders in `dir`.
async fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else { return out };
    while let Ok(Some(e)) = entries.next_entry().await {
        if e.file_type().await.is_ok_and(|t| t.is_dir()) {
            out.push(e.path());
        }
    }
    out
}

fn record_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(RECORD_SUFFIX);
    file.with_file_name(name)
}

/// A file named `name` with the size and tag of `want` in another contents' folder of the
/// model than `files_dir` (an entity tag identifies content: S3's is the MD5 of a single-part
/// upload).
async fn same_elsewhere(files_dir: &Path, name: &str, want: &Record) -> Option<PathBuf> {
    want.etag.as_ref()?;
    let model_dir = files_dir.parent()?.parent()?;
    let mut versions = tokio::fs::read_dir(model_dir).await.ok()?;
    while let Ok(Some(version)) = versions.next_entry().await {
        let Ok(mut contents) = tokio::fs::read_dir(version.path()).await else { continue };
        while let Ok(Some(e)) = contents.next_entry().await {
            let candidate = e.path().join(name);
            if e.path() != files_dir && cached(&candidate, want).await {
                return Some(candidate);
            }
        }
    }
    None
}

/// Lower-case hex of a digest's first eight bytes.
fn hex(digest: &[u8]) -> String {
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Whether `name` is a contents' folder name ([`hex`]'s sixteen digits).
fn is_contents_name(name: &str) -> bool {
    name.len() == 16 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `dest` is there with the size and tag of `want`.
async fn cached(dest: &Path, want: &Record) -> bool {
    let Ok(meta) = tokio::fs::metadata(dest).await else { return false };
    if meta.len() != want.size {
        return false;
    }
    let Ok(text) = tokio::fs::read(record_path(dest)).await else { return false };
    serde_json::from_slice::<Record>(&text).is_ok_and(|r| &r == want)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sluice_config::RepositoryLocation;

    use super::*;
    use crate::repository::store::StoreEnv;

    /// A local folder behind the object-store interface, fetched like a remote store.
    fn remote_store(dir: &Path) -> Store {
        Store::for_tests_remote(dir)
    }

    #[tokio::test]
    async fn unchanged_files_are_not_downloaded_again_and_a_changed_one_is() {
        let base = std::env::temp_dir().join(format!("sluice-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let repo = base.join("repo");
        std::fs::create_dir_all(repo.join("m/1")).unwrap();
        std::fs::write(repo.join("m/1/model.onnx"), vec![7u8; 1000]).unwrap();
        std::fs::write(repo.join("m/1/vocab.txt"), b"a b c").unwrap();
        let store = remote_store(&repo);
        let cache = Cache::new(base.join("cache"));
        let files = store.list("m/1").await.unwrap();
        let first = cache.fetch(&store, "m", "1", &files, 1 << 20).await.unwrap();
        assert_eq!((first.downloaded, first.files_downloaded), (1005, 2));
        assert_eq!(std::fs::read(first.dir.join("model.onnx")).unwrap().len(), 1000);
        let again = cache.fetch(&store, "m", "1", &files, 1 << 20).await.unwrap();
        assert_eq!((again.downloaded, again.files_downloaded), (0, 0), "nothing changed");
        // One file changes (size and tag): only it is fetched.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(repo.join("m/1/vocab.txt"), b"a b c d").unwrap();
        let files = store.list("m/1").await.unwrap();
        let changed = cache.fetch(&store, "m", "1", &files, 1 << 20).await.unwrap();
        assert_eq!((changed.downloaded, changed.files_downloaded, changed.reused), (7, 1, 1));
        assert_eq!(std::fs::read(changed.dir.join("vocab.txt")).unwrap(), b"a b c d");
        // In a folder of its own: the files the version was loaded from before stay as they
        // were (a replica started later from them loads what the running copy loaded) until
        // they are pruned, when nothing runs from them.
        assert_ne!(changed.dir, first.dir);
        assert_eq!(changed.dir.parent(), first.dir.parent());
        assert_eq!(std::fs::read(first.dir.join("vocab.txt")).unwrap(), b"a b c");
        assert_eq!(std::fs::read(changed.dir.join("model.onnx")).unwrap().len(), 1000);
        let other = cache.fetch(&store, "other", "1", &store.list("m/1").await.unwrap(), 1 << 20).await;
        let other = other.unwrap().dir;
        let running = [changed.dir.clone(), other.clone()].into_iter().collect();
        assert_eq!(cache.prune(&store, &running).await, 0, "nothing unused for an hour yet");
        assert!(first.dir.exists(), "another server sharing the cache may have used it just now");
        unused_for_an_hour(&first.dir);
        unused_for_an_hour(&changed.dir);
        assert_eq!(cache.prune(&store, &running).await, 1);
        assert!(!first.dir.exists() && changed.dir.join("vocab.txt").exists(), "in use: marked used again");
        assert!(other.exists(), "another model's version in use is left alone");
        // A version no longer served goes once unused for an hour, and its model's folder with
        // its last version (every version a training job wrote stayed on disk).
        let running = [changed.dir.clone()].into_iter().collect();
        unused_for_an_hour(&other);
        assert_eq!(cache.prune(&store, &running).await, 1);
        assert!(!other.exists() && !other.parent().unwrap().parent().unwrap().exists());
        assert!(changed.dir.join("vocab.txt").exists());
        let e = cache.fetch(&store, "m", "1", &files, 100).await.unwrap_err().to_string();
        assert!(e.contains("above max_version_bytes (100)"), "{e}");
        let _ = std::fs::remove_dir_all(&base);
    }

    /// A fetch that fails part-way changes nothing on disk: the contents cached before are as
    /// they were, and nothing of the new contents (no temporary file, no folder) stays.
    #[tokio::test]
    async fn a_fetch_failing_part_way_leaves_the_version_as_it_was() {
        let base = std::env::temp_dir().join(format!("sluice-cache-partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let repo = base.join("repo");
        std::fs::create_dir_all(repo.join("m/1")).unwrap();
        std::fs::write(repo.join("m/1/a.onnx"), b"old model").unwrap();
        std::fs::write(repo.join("m/1/b.data"), b"old weights").unwrap();
        let store = remote_store(&repo);
        let cache = Cache::new(base.join("cache"));
        let files = store.list("m/1").await.unwrap();
        let dir = cache.fetch(&store, "m", "1", &files, 1 << 20).await.unwrap().dir;
        // Both files change; the last one listed is gone by the time it is fetched.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(repo.join("m/1/a.onnx"), b"new model!").unwrap();
        std::fs::write(repo.join("m/1/b.data"), b"new weights!").unwrap();
        let files = store.list("m/1").await.unwrap();
        let last = files.last().unwrap().key.clone();
        std::fs::remove_file(repo.join(&last)).unwrap();
        cache.fetch(&store, "m", "1", &files, 1 << 20).await.unwrap_err();
        let new_dir = cache.files_dir(&store, "m", "1", &files);
        assert!(new_dir != dir && !new_dir.exists(), "nothing is left of the new contents");
        assert_eq!(std::fs::read(dir.join("a.onnx")).unwrap(), b"old model");
        assert_eq!(std::fs::read(dir.join("b.data")).unwrap(), b"old weights");
        let mut names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["a.onnx", "a.onnx.sluice-record", "b.data", "b.data.sluice-record"]);
        let _ = std::fs::remove_dir_all(&base);
    }

    /// Sets `dir`'s modification time an hour and a minute back.
    fn unused_for_an_hour(dir: &Path) {
        let at = std::time::SystemTime::now() - UNUSED_FOR - Duration::from_secs(60);
        std::fs::File::open(dir).unwrap().set_modified(at).unwrap();
    }

    /// A fetch that was killed (a replica past its start timeout, a crash) leaves its temporary
    /// files: the next fetch into the folder, and a prune, remove those whose fetch's lock no
    /// one holds, and, with no lock file, those not written for a while (each try started
    /// again beside them, and gigabytes piled up); never a running fetch's, however old its
    /// files (one linked from another version carries that version's time).
    #[tokio::test]
    async fn a_killed_fetchs_temporary_files_are_removed() {
        let base = std::env::temp_dir().join(format!("sluice-cache-killed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let repo = base.join("repo");
        std::fs::create_dir_all(repo.join("m/1")).unwrap();
        std::fs::write(repo.join("m/1/model.onnx"), b"model").unwrap();
        let store = remote_store(&repo);
        let cache = Cache::new(base.join("cache"));
        let files = store.list("m/1").await.unwrap();
        let dir = cache.files_dir(&store, "m", "1", &files);
        std::fs::create_dir_all(&dir).unwrap();
        let temp = |name: &str, idle: Duration| {
            let path = dir.join(name);
            std::fs::write(&path, b"part").unwrap();
            let at = std::time::SystemTime::now() - idle;
            std::fs::File::options().write(true).open(&path).unwrap().set_modified(at).unwrap();
            path
        };
        // An older Sluice's files (no lock file): by their time.
        let killed = temp(".model.onnx.part-999999-3", Duration::from_secs(3600));
        let record = temp(".model.onnx.record-999999-3", Duration::from_secs(3600));
        let recent = temp(".model.onnx.part-999998-1", Duration::from_secs(5));
        // A running fetch (its lock held) whose file was linked from a version cached long ago.
        let (token, live) = FetchLock::take(&dir).unwrap();
        let linked = temp(&format!(".vocab.txt.part-{token}"), Duration::from_secs(7200));
        // A killed fetch: its lock file left, held by no one, its file written just now.
        let unheld = dir.join(".fetch-666-1.lock");
        std::fs::write(&unheld, b"").unwrap();
        let orphan = temp(".model.onnx.part-666-1", Duration::from_secs(1));
        cache.fetch(&store, "m", "1", &files, 1 << 20).await.unwrap();
        assert!(
            !orphan.exists() && !unheld.exists(),
            "a killed fetch's files and lock are gone, however new"
        );
        assert!(!killed.exists() && !record.exists(), "an old fetch's files are gone");
        assert!(recent.exists(), "recent, with no lock file: kept");
        assert!(linked.exists(), "a running fetch keeps its files, however old");
        assert!(dir.join("model.onnx").exists());
        drop(live);
        let kept = [dir.clone()].into_iter().collect();
        assert_eq!(cache.prune(&store, &kept).await, 0);
        assert!(!linked.exists(), "its fetch ended without cleaning up (its lock gone)");
        assert!(recent.exists() && dir.join("model.onnx").exists());
        // A folder no one serves, unused for an hour by its time, where a fetch runs (a large
        // file being written does not move the folder's time): kept while its lock is held.
        let fetching = dir.parent().unwrap().join("0123456789abcdef");
        std::fs::create_dir_all(&fetching).unwrap();
        let (_, running) = FetchLock::take(&fetching).unwrap();
        unused_for_an_hour(&fetching);
        assert_eq!(cache.prune(&store, &kept).await, 0);
        assert!(fetching.exists(), "a running fetch's folder was removed");
        drop(running);
        unused_for_an_hour(&fetching);
        assert_eq!(cache.prune(&store, &kept).await, 1);
        assert!(!fetching.exists());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_local_repository_is_read_in_place() {
        let repo = std::env::temp_dir();
        let store = Store::open_location(
            &RepositoryLocation::Local(repo.clone()),
            &StoreEnv::default(),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(Cache::new("/cache").version_dir(&store, "m", "3"), repo.join("m/3"));
    }
}
