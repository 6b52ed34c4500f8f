//! The repository's storage through the `object_store` crate: a local folder, S3, GCS or Azure
//! Blob, listed in one call and read file by file. Credentials come from each cloud's standard
//! environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`), which the binary reads and hands in
//! as a [`StoreEnv`] (the library never reads the environment itself).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path as StorePath;
use sluice_config::{ModelRepository, RepositoryLocation};

/// The most objects one listing may hold (a bucket holding far more is not a model
/// repository, or the prefix is wrong).
pub const MAX_LISTED: usize = 100_000;

/// The cloud variables the stores are configured from: `(name, value)` pairs whose names start
/// with `AWS_`, `GOOGLE_` or `AZURE_` (others are ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreEnv(pub Vec<(String, String)>);

impl StoreEnv {
    /// The variables of `vars` a store reads.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut v: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(k, _)| ["AWS_", "GOOGLE_", "AZURE_"].iter().any(|p| k.starts_with(p)))
            .collect();
        v.sort();
        Self(v)
    }

    fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (String, &'a str)> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
    }
}

/// The store could not be opened, listed or read. Each names the repository's URL.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("model repository `{url}`: {message}")]
    Config { url: String, message: String },
    #[error("model repository `{url}`: the folder is not there")]
    FolderGone { url: String },
    #[error("model repository `{url}` is unreachable: {source}")]
    Unreachable { url: String, source: object_store::Error },
    #[error("model repository `{url}`: access denied (check the credentials in the environment): {source}")]
    Denied { url: String, source: object_store::Error },
    #[error("model repository `{url}`: bucket, container or folder not found: {source}")]
    Missing { url: String, source: object_store::Error },
    #[error(
        "model repository `{url}` lists more than {MAX_LISTED} objects; point `path` at the repository's prefix"
    )]
    TooLarge { url: String },
    #[error("model repository `{url}`: `{file}`: {message}")]
    File { url: String, file: String, message: String },
    /// One version's files add up to more than `max_version_bytes`: that version is refused,
    /// not the repository.
    #[error("model repository `{url}`: `{file}`: {bytes} bytes is above max_version_bytes ({max})")]
    TooBig { url: String, file: String, bytes: u64, max: u64 },
}

/// One object of the repository, relative to its root (`iris/3/model.onnx`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredFile {
    pub key: String,
    pub size: u64,
    /// The store's entity tag (a local folder: derived from size and modification time).
    pub etag: Option<String>,
}

/// A repository's storage.
#[derive(Debug, Clone)]
pub struct Store {
    url: String,
    inner: Arc<dyn ObjectStore>,
    /// The repository's root inside the store.
    root: StorePath,
    /// Whether files are read in place (a local folder) rather than cached.
    local: Option<std::path::PathBuf>,
    /// The entries the last local listing left out: warned about when they change, not at
    /// every scan.
    left_out: Arc<std::sync::Mutex<Vec<String>>>,
    /// How long a call may go without progress (`store_timeout_s`).
    timeout: Duration,
}

impl Store {
    /// Opens the repository `repo` names, configured from `env`. Opening makes no call yet.
    pub fn open(repo: &ModelRepository, env: &StoreEnv) -> Result<Self, StoreError> {
        let timeout = Duration::from_secs_f64(repo.store_timeout_s);
        Self::open_location(&repo.location, env, timeout)
    }

    /// Opens a location with `timeout` per call.
    pub fn open_location(
        location: &RepositoryLocation,
        env: &StoreEnv,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let url = location.to_string();
        let config = |message: String| StoreError::Config { url: url.clone(), message };
        match location {
            RepositoryLocation::Local(path) => {
                let fs = object_store::local::LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| config(format!("cannot open the folder: {e}")))?;
                Ok(Self {
                    url,
                    inner: Arc::new(fs),
                    root: StorePath::default(),
                    local: Some(path.clone()),
                    left_out: Default::default(),
                    timeout,
                })
            }
            RepositoryLocation::Url(u) => {
                let (scheme, rest) = u.split_once("://").unwrap_or(("", u));
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                install_crypto();
                // A call fails when it stops making progress for `timeout` (connecting, or
                // between reads of a listing or a file), not when a large file takes longer
                // than that in all: a whole-request timeout failed every model file too big to
                // stream within it, at every poll.
                let client = object_store::ClientOptions::new()
                    .with_timeout_disabled()
                    .with_read_timeout(timeout)
                    .with_connect_timeout(timeout.min(Duration::from_secs(5)));
                let retry = object_store::RetryConfig {
                    max_retries: 2,
                    retry_timeout: timeout,
                    backoff: object_store::BackoffConfig {
                        init_backoff: Duration::from_millis(100),
                        max_backoff: Duration::from_secs(2),
                        base: 2.0,
                    },
                };
                let inner: Arc<dyn ObjectStore> = match scheme {
                    "s3" => {
                        let mut b = object_store::aws::AmazonS3Builder::new()
                            .with_client_options(client)
                            .with_retry(retry);
                        for (k, v) in env.with_prefix("AWS_") {
                            if let Ok(key) = k.parse() {
                                b = b.with_config(key, v);
                            }
                        }
                        Arc::new(b.with_bucket_name(bucket).build().map_err(|e| config(e.to_string()))?)
                    }
                    "gs" => {
                        let mut b = object_store::gcp::GoogleCloudStorageBuilder::new()
                            .with_client_options(client)
                            .with_retry(retry);
                        for (k, v) in env.with_prefix("GOOGLE_") {
                            if let Ok(key) = k.parse() {
                                b = b.with_config(key, v);
                            }
                        }
                        Arc::new(b.with_bucket_name(bucket).build().map_err(|e| config(e.to_string()))?)
                    }
                    "az" => {
                        let mut b = object_store::azure::MicrosoftAzureBuilder::new()
                            .with_client_options(client)
                            .with_retry(retry);
                        for (k, v) in env.with_prefix("AZURE_") {
                            if let Ok(key) = k.parse() {
                                b = b.with_config(key, v);
                            }
                        }
                        Arc::new(b.with_container_name(bucket).build().map_err(|e| config(e.to_string()))?)
                    }
                    other => return Err(config(format!("unsupported scheme `{other}://`"))),
                };
                Ok(Self {
                    url,
                    inner,
                    root: StorePath::from(prefix),
                    local: None,
                    left_out: Default::default(),
                    timeout,
                })
            }
        }
    }

    /// The repository's URL (or folder), for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How long a call may go without progress.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The local folder the files are read from in place, for a local repository.
    pub fn local_root(&self) -> Option<&std::path::Path> {
        self.local.as_deref()
    }

    /// Every object under `under` (a model folder, or the whole repository with ""), sorted.
    /// A local repository lists its `model/version/file` objects only (see [`list_local`]).
    pub async fn list(&self, under: &str) -> Result<Vec<StoredFile>, StoreError> {
        if let Some(root) = &self.local {
            // A folder that went away lists as empty: an error, not "every model was removed".
            if !tokio::fs::metadata(root).await.is_ok_and(|m| m.is_dir()) {
                return Err(StoreError::FolderGone { url: self.url.clone() });
            }
            let whole = under.is_empty();
            let (root, under) = (root.clone(), under.to_string());
            let walked = tokio::task::spawn_blocking(move || list_local(&root, &under))
                .await
                .map_err(std::io::Error::other)
                .and_then(|walked| walked);
            let (mut out, mut left_out) = walked.map_err(|e| {
                self.classify(object_store::Error::Generic { store: "LocalFileSystem", source: Box::new(e) })
            })?;
            left_out.sort();
            let mut warned = self.left_out.lock().unwrap_or_else(|e| e.into_inner());
            if whole && *warned != left_out {
                if let Some(first) = left_out.first() {
                    tracing::warn!(
                        repository = %self.url,
                        "{} entr{} left out of the listing, unreadable: {first}",
                        left_out.len(),
                        if left_out.len() == 1 { "y" } else { "ies" },
                    );
                }
                *warned = left_out;
            }
            drop(warned);
            if out.len() > MAX_LISTED {
                return Err(StoreError::TooLarge { url: self.url.clone() });
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            return Ok(out);
        }
        let prefix = self.root.clone().join_path(under);
        let prefix = (prefix != StorePath::default()).then_some(prefix);
        let mut stream = self.inner.list(prefix.as_ref());
        let mut out = Vec::new();
        while let Some(item) = stream.next().await {
            let meta = item.map_err(|e| self.classify(e))?;
            let key = meta
                .location
                .prefix_match(&self.root)
                .map(|parts| parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"));
            let Some(key) = key else { continue };
            out.push(StoredFile { key, size: meta.size, etag: meta.e_tag });
            if out.len() > MAX_LISTED {
                return Err(StoreError::TooLarge { url: self.url.clone() });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Streams one object into `dest` (created or truncated); returns the bytes written.
    /// At most `max_bytes` are accepted. The object must still be what `file` lists (its entity
    /// tag, asked for with `If-Match`, and its size): an object rewritten since it was listed
    /// is refused, not cached under the listing's record.
    pub async fn download(
        &self,
        file: &StoredFile,
        dest: &std::path::Path,
        max_bytes: u64,
    ) -> Result<u64, StoreError> {
        use tokio::io::AsyncWriteExt;
        let key = file.key.as_str();
        let file_error =
            |message: String| StoreError::File { url: self.url.clone(), file: key.to_string(), message };
        let changed =
            || file_error("changed in the store since it was listed; fetched again at the next scan".into());
        let options = object_store::GetOptions { if_match: file.etag.clone(), ..Default::default() };
        let got = match self.inner.get_opts(&self.root.clone().join_path(key), options).await {
            Ok(got) => got,
            Err(object_store::Error::Precondition { .. }) => return Err(changed()),
            Err(e) => return Err(self.classify(e)),
        };
        if got.meta.size != file.size {
            return Err(changed());
        }
        let mut out = tokio::fs::File::create(dest)
            .await
            .map_err(|e| file_error(format!("cannot write `{}`: {e}", dest.display())))?;
        let mut stream = got.into_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.classify(e))?;
            written += chunk.len() as u64;
            if written > max_bytes {
                return Err(file_error(format!("larger than max_version_bytes ({max_bytes})")));
            }
            out.write_all(&chunk)
                .await
                .map_err(|e| file_error(format!("writing `{}`: {e}", dest.display())))?;
        }
        out.flush().await.map_err(|e| file_error(e.to_string()))?;
        out.sync_all().await.map_err(|e| file_error(e.to_string()))?;
        if written != file.size {
            return Err(changed());
        }
        Ok(written)
    }

    /// One clear error per failure: what the store said, named by the repository's URL.
    fn classify(&self, e: object_store::Error) -> StoreError {
        let url = self.url.clone();
        let text = e.to_string();
        match &e {
            object_store::Error::NotFound { .. } => StoreError::Missing { url, source: e },
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                StoreError::Denied { url, source: e }
            }
            _ if text.contains("NoSuchBucket") || text.contains("ContainerNotFound") => {
                StoreError::Missing { url, source: e }
            }
            // The status with its reason: the text also holds a duration (`275.043403ms`).
            _ if text.contains("403 Forbidden")
                || text.contains("AccessDenied")
                || text.contains("InvalidAccessKeyId") =>
            {
                StoreError::Denied { url, source: e }
            }
            _ => StoreError::Unreachable { url, source: e },
        }
    }
}

trait JoinPath {
    fn join_path(self, key: &str) -> StorePath;
}

impl JoinPath for StorePath {
    /// `key` as listed, under `self`: kept as it is (`Path::join` escapes each part again, so
    /// the listed `a#b/1/model.onnx` was fetched as the key `a%23b/1/model.onnx`, not found).
    fn join_path(self, key: &str) -> StorePath {
        let parts = std::iter::once(self.as_ref()).chain(key.split('/')).filter(|p| !p.is_empty());
        StorePath::parse(parts.collect::<Vec<_>>().join("/")).unwrap_or_else(|_| {
            key.split('/').filter(|p| !p.is_empty()).fold(self, |path, part| path.join(part))
        })
    }
}

/// A local repository's files at `model/version/file` under `root` (those under `under`, a
/// model or version folder or ""), and the entries left out, each with why. Walked here rather
/// than through the object store, whose listing ends at the first entry it cannot name or
/// read: one stray file (a name not UTF-8, a `lost+found` folder the server may not enter)
/// hid every model. Below the folder listed, an entry the server may not read, or a link
/// that resolves nowhere, is left out as if absent; any other error (too many open files, I/O,
/// a stale NFS handle: passing ones) fails the listing, so that nothing serving is unloaded
/// for it, and so does the folder listed failing to read. Objects at other depths, and names
/// the listing's parse drops anyway (dot-names, versions not numbers), are not looked at
/// ([`super::scan::Listing::parse`]); links are followed, dangling ones left out, as the
/// object store does, and so are its own temporary files (`model.onnx#123`).
fn list_local(root: &std::path::Path, under: &str) -> std::io::Result<(Vec<StoredFile>, Vec<String>)> {
    use std::os::unix::fs::MetadataExt;
    let start: Vec<&str> = under.split('/').filter(|p| !p.is_empty()).collect();
    let (mut out, mut left_out) = (Vec::new(), Vec::new());
    let mut folders =
        vec![(root.join(start.join("/")), start.iter().map(|p| p.to_string()).collect::<Vec<_>>())];
    let failed = |path: &std::path::Path, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
    };
    // Errors that say this entry is unreadable, not that reading failed.
    let unreadable = |e: &std::io::Error| {
        // ELOOP and ENOTDIR (Linux's numbers; std's kinds for them are not stable).
        e.kind() == std::io::ErrorKind::PermissionDenied || matches!(e.raw_os_error(), Some(40 | 20))
    };
    let mut first = true;
    while let Some((dir, parts)) = folders.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !parts.is_empty() => continue,
            Err(e) if !first && unreadable(&e) => {
                left_out.push(format!("{} ({e})", dir.display()));
                continue;
            }
            Err(e) => return Err(failed(&dir, e)),
        };
        first = false;
        for entry in entries {
            let entry = entry.map_err(|e| failed(&dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                left_out.push(format!("{} (name not UTF-8)", entry.path().display()));
                continue;
            };
            let depth = parts.len() + 1;
            let dropped = match depth {
                1 | 3 => name.starts_with('.'),
                2 => !name.parse::<u64>().is_ok_and(|v| v.to_string() == name),
                _ => true,
            };
            // The object store's own: `file#123`, a file being written.
            let temporary = depth == 3
                && name
                    .split_once('#')
                    .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if dropped || temporary {
                continue;
            }
            let meta = match std::fs::metadata(entry.path()) {
                Ok(meta) => meta,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) if unreadable(&e) => {
                    left_out.push(format!("{} ({e})", entry.path().display()));
                    continue;
                }
                Err(e) => return Err(failed(&entry.path(), e)),
            };
            let mut key = parts.clone();
            key.push(name);
            match (depth, meta.is_dir()) {
                (1 | 2, true) => folders.push((entry.path(), key)),
                (3, false) if meta.is_file() => {
                    let mtime = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .unwrap_or_default()
                        .as_micros();
                    // The object store's local etag: inode, modification time, size.
                    let etag = format!("\"{:x}-{mtime:x}-{:x}\"", meta.ino(), meta.len());
                    out.push(StoredFile { key: key.join("/"), size: meta.len(), etag: Some(etag) });
                    if out.len() > MAX_LISTED {
                        return Ok((out, left_out));
                    }
                }
                _ => {}
            }
        }
    }
    Ok((out, left_out))
}

/// The cloud clients' TLS uses ring; installed once per process (a provider installed
/// earlier, by an embedding program, is kept).
fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
impl Store {
    /// A local folder behind the object-store interface, treated as remote (cached).
    pub(crate) fn for_tests_remote(dir: &std::path::Path) -> Self {
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap();
        Self {
            url: format!("test://{}", dir.display()),
            inner: Arc::new(fs),
            root: StorePath::default(),
            local: None,
            left_out: Default::default(),
            timeout: Duration::from_secs(30),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cloud_variables_are_kept() {
        let env = StoreEnv::from_vars([
            ("PATH".to_string(), "/bin".to_string()),
            ("AWS_REGION".to_string(), "eu-west-1".to_string()),
            ("AZURE_STORAGE_ACCOUNT_NAME".to_string(), "a".to_string()),
        ]);
        assert_eq!(env.0.len(), 2);
        assert_eq!(env.with_prefix("AWS_").collect::<Vec<_>>(), [("aws_region".to_string(), "eu-west-1")]);
    }

    #[tokio::test]
    async fn a_local_folder_lists_relative_keys_and_downloads() {
        let dir = std::env::temp_dir().join(format!("sluice-store-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("m/1")).unwrap();
        std::fs::write(dir.join("m/1/model.onnx"), b"abc").unwrap();
        std::fs::write(dir.join("m/1/READY"), b"").unwrap();
        let store = Store::open_location(
            &RepositoryLocation::Local(dir.clone()),
            &StoreEnv::default(),
            Duration::from_secs(5),
        )
        .unwrap();
        let files = store.list("").await.unwrap();
        let keys: Vec<_> = files.iter().map(|f| (f.key.as_str(), f.size)).collect();
        assert_eq!(keys, [("m/1/READY", 0), ("m/1/model.onnx", 3)]);
        assert!(files[1].etag.is_some());
        assert_eq!(store.list("m").await.unwrap().len(), 2);
        let dest = dir.join("copy");
        assert_eq!(store.download(&files[1], &dest, 10).await.unwrap(), 3);
        assert_eq!(std::fs::read(&dest).unwrap(), b"abc");
        let too_big = store.download(&files[1], &dest, 2).await.unwrap_err();
        assert!(too_big.to_string().contains("larger than max_version_bytes"), "{too_big}");
        // Rewritten since it was listed (same size, another tag; then another size): refused,
        // whatever the listing's record says.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.join("m/1/model.onnx"), b"xyz").unwrap();
        let changed = store.download(&files[1], &dest, 10).await.unwrap_err().to_string();
        assert!(changed.contains("`m/1/model.onnx`: changed in the store since it was listed"), "{changed}");
        let untagged = StoredFile { etag: None, ..files[1].clone() };
        assert_eq!(store.download(&untagged, &dest, 10).await.unwrap(), 3, "no tag: the size is checked");
        std::fs::write(dir.join("m/1/model.onnx"), b"abcd").unwrap();
        let changed = store.download(&untagged, &dest, 10).await.unwrap_err().to_string();
        assert!(changed.contains("changed in the store since it was listed"), "{changed}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Names object stores escape (`#`, `~`, `%`, non-ASCII) are fetched by the key listed.
    #[tokio::test]
    async fn odd_names_download_by_the_key_they_are_listed_under() {
        let dir = std::env::temp_dir().join(format!("sluice-store-odd-{}", std::process::id()));
        for name in ["a#b", "x~y", "p%q", "ümlaut"] {
            std::fs::create_dir_all(dir.join(name).join("1")).unwrap();
            std::fs::write(dir.join(name).join("1/model.onnx"), name.as_bytes()).unwrap();
        }
        let store = Store::for_tests_remote(&dir);
        let files = store.list("").await.unwrap();
        assert_eq!(files.len(), 4, "{files:?}");
        for f in &files {
            let dest = dir.join("copy");
            store.download(f, &dest, 100).await.unwrap_or_else(|e| panic!("{}: {e}", f.key));
            let name = f.key.split('/').next().unwrap();
            assert_eq!(std::fs::read(&dest).unwrap(), name.as_bytes());
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A stray file with a name that is not UTF-8 is left out, and so are links that resolve
    /// nowhere, files at other depths, dot-names and the object store's temporary files; the
    /// models around them still list.
    #[tokio::test]
    async fn an_unreadable_entry_is_left_out_not_the_repository() {
        use std::os::unix::ffi::OsStrExt;
        let dir = std::env::temp_dir().join(format!("sluice-store-unnamable-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("m/1")).unwrap();
        std::fs::write(dir.join("m/1/model.onnx"), b"abc").unwrap();
        std::fs::write(dir.join(std::ffi::OsStr::from_bytes(b"stray\xff.txt")), b"x").unwrap();
        std::fs::write(dir.join("m/1").join(std::ffi::OsStr::from_bytes(b"notes\xfe")), b"x").unwrap();
        std::os::unix::fs::symlink(dir.join("nowhere"), dir.join("m/1/dangling")).unwrap();
        std::fs::create_dir_all(dir.join("m/1/deeper")).unwrap();
        std::fs::write(dir.join("m/1/deeper/file"), b"x").unwrap();
        // Links that resolve nowhere (ELOOP), as a model folder and as a file.
        std::os::unix::fs::symlink("lost", dir.join("lost")).unwrap();
        std::os::unix::fs::symlink("loop", dir.join("m/1/loop")).unwrap();
        // The object store's temporary files, and names the listing's parse drops.
        std::fs::write(dir.join("m/1/model.onnx#17"), b"x").unwrap();
        std::fs::create_dir_all(dir.join(".hidden/1")).unwrap();
        std::fs::write(dir.join(".hidden/1/model.onnx"), b"x").unwrap();
        std::fs::create_dir_all(dir.join("m/01")).unwrap();
        std::fs::write(dir.join("m/01/model.onnx"), b"x").unwrap();
        let store = Store::open_location(
            &RepositoryLocation::Local(dir.clone()),
            &StoreEnv::default(),
            Duration::from_secs(5),
        )
        .unwrap();
        let files = store.list("").await.unwrap();
        assert_eq!(files.iter().map(|f| f.key.as_str()).collect::<Vec<_>>(), ["m/1/model.onnx"]);
        assert_eq!(store.list("m/1").await.unwrap(), files);
        assert_eq!(store.list("m").await.unwrap(), files);
        let (_, left_out) = list_local(&dir, "").unwrap();
        assert_eq!(left_out.len(), 4, "{left_out:?}");
        assert!(left_out.iter().any(|e| e.contains("/lost (")), "{left_out:?}");
        // A file written again is a new object (its etag changes).
        std::thread::sleep(Duration::from_millis(5));
        std::fs::write(dir.join("m/1/model.onnx"), b"abcd").unwrap();
        let again = store.list("").await.unwrap();
        assert_ne!(again[0].etag, files[0].etag);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_refused_connection_is_unreachable_whatever_its_duration_reads() {
        let store = Store::for_tests_remote(&std::env::temp_dir());
        let e = |text: &str| {
            store.classify(object_store::Error::Generic { store: "S3", source: text.to_string().into() })
        };
        let refused = "Error performing GET http://127.0.0.1:1/m in 275.043403ms, after 2 retries - HTTP error: error sending request";
        assert!(matches!(e(refused), StoreError::Unreachable { .. }));
        assert!(matches!(e("Client error with status 403 Forbidden: <Error/>"), StoreError::Denied { .. }));
    }

    #[tokio::test]
    async fn a_missing_folder_is_one_error_naming_it() {
        let gone = std::env::temp_dir().join("sluice-no-such-repo-folder");
        let store = Store::open_location(
            &RepositoryLocation::Local(gone.clone()),
            &StoreEnv::default(),
            Duration::from_secs(5),
        );
        let e = match store {
            Ok(s) => s.list("").await.unwrap_err().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(&gone.display().to_string()), "{e}");
    }
}
