//! Models by Hugging Face Hub id (`Qwen/Qwen3-8B`, `org/name@revision`,
//! `org/name-GGUF:file.gguf`): downloaded once into a cache laid out as the hub's own
//! (`models--org--name/{blobs,snapshots,refs}`), so Python tools share it, and loaded from the
//! snapshot directory like any local model.
//!
//! A download resumes where an earlier one stopped (`blobs/<hash>.incomplete`, HTTP `Range`),
//! is checked against the hash the hub lists for it (sha256 for LFS files, the git blob sha1
//! for the rest) and only then takes its final name; a snapshot's files are symlinks to their
//! blobs. `HF_ENDPOINT` and `HF_TOKEN` are honoured, `HF_HUB_OFFLINE` uses the cache alone.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::blocking::Client;
use serde::Deserialize;
use sha1::Digest as _;

/// A model on the hub: a repository, a revision and, for a GGUF repository, one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// `org/name`.
    pub repo: String,
    /// A branch, tag or commit; `main` when not given.
    pub revision: String,
    /// One file of the repository (a `.gguf`) rather than a model directory.
    pub file: Option<String>,
}

impl HubRef {
    /// `org/name[:file][@revision]`, or None for anything that is not shaped like a hub id (a
    /// local path: absolute, with `..`, more than one `/`, or characters the hub never uses).
    pub fn parse(s: &str) -> Option<HubRef> {
        let (rest, revision) = match s.rsplit_once('@') {
            Some((r, rev)) if !rev.is_empty() && !rev.contains(['/', ':']) => (r, rev.to_string()),
            Some(_) => return None,
            None => (s, "main".to_string()),
        };
        let (repo, file) = match rest.split_once(':') {
            Some((r, f)) if !f.is_empty() && !f.starts_with('/') && !f.contains("..") => {
                (r, Some(f.to_string()))
            }
            Some(_) => return None,
            None => (rest, None),
        };
        let (org, name) = repo.split_once('/')?;
        let part = |p: &str| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !part(org) || !part(name) || name.contains("..") {
            return None;
        }
        Some(HubRef {
            repo: repo.to_string(),
            revision,
            file,
        })
    }

    /// The cache folder of the repository: `models--org--name`.
    fn folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }
}

impl std::fmt::Display for HubRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.repo)?;
        if let Some(file) = &self.file {
            write!(f, ":{file}")?;
        }
        if self.revision != "main" {
            write!(f, "@{}", self.revision)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{repo}: no such model repository on {endpoint}")]
    NotFound { repo: String, endpoint: String },
    #[error("{repo}: revision {revision:?} does not exist")]
    Revision { repo: String, revision: String },
    #[error("{repo}: {file:?} is not in the repository")]
    NoFile { repo: String, file: String },
    #[error("{repo}: {message}")]
    Gated { repo: String, message: String },
    #[error("{repo}: {message}")]
    Unusable { repo: String, message: String },
    #[error("{repo}: {file} does not match the hash the hub lists for it ({expected})")]
    Checksum {
        repo: String,
        file: String,
        expected: String,
    },
    #[error("{repo}: not in the cache, and HF_HUB_OFFLINE is set")]
    Offline { repo: String },
    #[error("{url}: {message}")]
    Network { url: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl HubError {
    /// Whether trying again later could succeed (the network or the disk, not the request).
    pub fn retryable(&self) -> bool {
        matches!(self, HubError::Network { .. } | HubError::Io { .. })
    }
}

type Result<T> = std::result::Result<T, HubError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the hub says of one file at a commit (`/api/models/<repo>/tree/<commit>`).
#[derive(Debug, Clone, Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: u64,
    /// The git blob sha1.
    #[serde(default)]
    oid: String,
    #[serde(default)]
    lfs: Option<LfsInfo>,
}

#[derive(Debug, Clone, Deserialize)]
struct LfsInfo {
    /// sha256 of the content.
    oid: String,
    size: u64,
}

impl TreeEntry {
    /// The blob's name in the cache, as huggingface_hub names it (its ETag): the sha256 of an
    /// LFS file, the git sha1 of any other.
    fn blob(&self) -> &str {
        self.lfs
            .as_ref()
            .map(|l| l.oid.as_str())
            .unwrap_or(&self.oid)
    }

    fn len(&self) -> u64 {
        self.lfs.as_ref().map(|l| l.size).unwrap_or(self.size)
    }
}

#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: String,
}

/// Files of a model directory qlorad reads; everything else in a repository is left.
fn wanted(path: &str) -> bool {
    matches!(
        path,
        "config.json"
            | "generation_config.json"
            | "tokenizer.json"
            | "tokenizer_config.json"
            | "special_tokens_map.json"
            | "chat_template.jinja"
            | "model.safetensors.index.json"
    ) || (path.ends_with(".safetensors") && !path.contains('/'))
}

/// Progress of a download: the file, bytes so far, its size.
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, u64);

/// The hub client and its cache.
#[derive(Clone)]
pub struct Hub {
    endpoint: String,
    token: Option<String>,
    offline: bool,
    cache: PathBuf,
    /// One download of a blob at a time in this process: workers share the cache.
    busy: Arc<Mutex<()>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("cache", &self.cache)
            .finish()
    }
}

impl Hub {
    /// A client of `HF_ENDPOINT` (default `https://huggingface.co`) with `HF_TOKEN`, caching
    /// into `cache`.
    pub fn from_env(cache: PathBuf) -> Hub {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Hub::new(
            var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
            var("HF_TOKEN"),
            var("HF_HUB_OFFLINE").is_some_and(|v| v != "0" && v != "false"),
            cache,
        )
    }

    pub fn new(endpoint: String, token: Option<String>, offline: bool, cache: PathBuf) -> Hub {
        Hub {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            offline,
            cache,
            busy: Arc::new(Mutex::new(())),
        }
    }

    /// A blocking client for one check or fetch. It holds a runtime of its own, which must not
    /// be dropped on an async worker, so it lives only as long as the call (on a blocking
    /// thread).
    fn client(&self, url: &str) -> Result<Client> {
        Client::builder()
            .connect_timeout(Duration::from_secs(20))
            .timeout(None)
            .user_agent(concat!("qlorad/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| net(url, e))
    }

    /// The cache directory shared with huggingface_hub's layout.
    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    /// The hub's default cache, as huggingface_hub picks it: `HF_HUB_CACHE`, `HF_HOME/hub`, or
    /// `~/.cache/huggingface/hub`.
    pub fn default_cache() -> PathBuf {
        if let Some(c) = std::env::var_os("HF_HUB_CACHE") {
            return c.into();
        }
        if let Some(h) = std::env::var_os("HF_HOME") {
            return PathBuf::from(h).join("hub");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
        PathBuf::from(home).join(".cache/huggingface/hub")
    }

    /// The cached snapshot of `r` (the directory, or the GGUF file in it), if complete; no
    /// network.
    pub fn cached(&self, r: &HubRef) -> Option<PathBuf> {
        let repo = self.cache.join(r.folder());
        let commit = if is_commit(&r.revision) {
            r.revision.clone()
        } else {
            std::fs::read_to_string(repo.join("refs").join(&r.revision))
                .ok()?
                .trim()
                .to_string()
        };
        let snap = repo.join("snapshots").join(commit);
        let path = match &r.file {
            Some(f) => snap.join(f),
            None => snap,
        };
        // config.json is linked last, so a snapshot that has it has every file.
        crate::model::is_model_path(&path).then_some(path)
    }

    /// Every cached model: `(id, snapshot path)` for each repository and ref, sorted.
    pub fn list_cached(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.cache)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(repo) = name.strip_prefix("models--") else {
                continue;
            };
            let Some((org, model)) = repo.split_once("--") else {
                continue;
            };
            let repo = format!("{org}/{model}");
            for r in std::fs::read_dir(e.path().join("refs"))
                .into_iter()
                .flatten()
                .flatten()
            {
                let rev = r.file_name().to_string_lossy().into_owned();
                let Ok(commit) = std::fs::read_to_string(r.path()) else {
                    continue;
                };
                let snap = e.path().join("snapshots").join(commit.trim());
                let id = if rev == "main" {
                    repo.clone()
                } else {
                    format!("{repo}@{rev}")
                };
                if crate::model::is_model_path(&snap) {
                    out.push((id.clone(), snap.clone()));
                }
                for f in std::fs::read_dir(&snap).into_iter().flatten().flatten() {
                    let p = f.path();
                    if crate::model::gguf::is_gguf(&p) && p.is_file() {
                        let file = f.file_name().to_string_lossy().into_owned();
                        let id = match id.split_once('@') {
                            Some((repo, rev)) => format!("{repo}:{file}@{rev}"),
                            None => format!("{id}:{file}"),
                        };
                        out.push((id, p));
                    }
                }
            }
        }
        out.sort();
        out
    }

    fn get(&self, client: &Client, url: &str) -> reqwest::blocking::RequestBuilder {
        let req = client.get(url);
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// A JSON answer of the hub API, with its errors named for the repository.
    fn api<T: for<'de> Deserialize<'de>>(&self, c: &Client, r: &HubRef, url: &str) -> Result<T> {
        let resp = self.get(c, url).send().map_err(|e| net(url, e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(self.status_error(r, status, resp.headers()));
        }
        resp.json().map_err(|e| HubError::Network {
            url: url.to_string(),
            message: format!("not the hub's JSON: {e}"),
        })
    }

    fn status_error(
        &self,
        r: &HubRef,
        status: reqwest::StatusCode,
        headers: &reqwest::header::HeaderMap,
    ) -> HubError {
        let code = headers
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let repo = r.repo.clone();
        match (status.as_u16(), code) {
            (_, "RevisionNotFound") => HubError::Revision {
                repo,
                revision: r.revision.clone(),
            },
            (_, "EntryNotFound") => HubError::NoFile {
                repo,
                file: r.file.clone().unwrap_or_default(),
            },
            (401, _) if self.token.is_none() => HubError::Gated {
                repo,
                message: "the repository is gated or private: set HF_TOKEN to a token that may read it".into(),
            },
            (401, _) | (403, _) => HubError::Gated {
                repo,
                message: format!(
                    "HF_TOKEN may not read this repository ({status}): accept its terms on the hub, or use another token"
                ),
            },
            (404, _) => HubError::NotFound {
                repo,
                endpoint: self.endpoint.clone(),
            },
            _ => HubError::Network {
                url: format!("{}/{}", self.endpoint, r.repo),
                message: format!("the hub answered {status}"),
            },
        }
    }

    /// Whether `r` can be fetched: cached, or on the hub with what a model needs (no
    /// download). What a service asks when a job names a hub id.
    pub fn check(&self, r: &HubRef) -> Result<()> {
        if self.cached(r).is_some() {
            return Ok(());
        }
        self.plan(&self.client(&self.endpoint)?, r).map(|_| ())
    }

    /// Download what `r` needs into the cache (nothing when it is there already) and return
    /// the path to load: the snapshot directory, or the GGUF file in it.
    pub fn fetch(&self, r: &HubRef, progress: Progress<'_>) -> Result<PathBuf> {
        if let Some(p) = self.cached(r) {
            return Ok(p);
        }
        let c = self.client(&self.endpoint)?;
        let (commit, files) = self.plan(&c, r)?;
        let repo = self.cache.join(r.folder());
        let snap = repo.join("snapshots").join(&commit);
        for e in &files {
            self.fetch_file(&c, r, &commit, &repo, e, progress)?;
        }
        if r.revision != commit {
            let refs = repo.join("refs");
            std::fs::create_dir_all(&refs).map_err(io(&refs))?;
            write_atomic(&refs.join(&r.revision), commit.as_bytes())?;
        }
        Ok(match &r.file {
            Some(f) => snap.join(f),
            None => snap,
        })
    }

    /// The commit `r` names and the files to download from it, config.json last (a snapshot
    /// that has it is complete: see `cached`).
    fn plan(&self, c: &Client, r: &HubRef) -> Result<(String, Vec<TreeEntry>)> {
        if self.offline {
            return Err(HubError::Offline {
                repo: r.repo.clone(),
            });
        }
        let rev = url_part(&r.revision);
        let info: RepoInfo = self.api(
            c,
            r,
            &format!("{}/api/models/{}/revision/{rev}", self.endpoint, r.repo),
        )?;
        let commit = info.sha;
        if !is_commit(&commit) {
            return Err(HubError::Network {
                url: format!("{}/api/models/{}", self.endpoint, r.repo),
                message: format!("{commit:?} is not a commit hash"),
            });
        }
        let tree: Vec<TreeEntry> = self.api(
            c,
            r,
            &format!(
                "{}/api/models/{}/tree/{commit}?recursive=true",
                self.endpoint, r.repo
            ),
        )?;
        let mut files: Vec<TreeEntry> = tree
            .into_iter()
            .filter(|e| e.kind == "file")
            .filter(|e| match &r.file {
                Some(f) => &e.path == f,
                None => wanted(&e.path),
            })
            .collect();
        let unusable = |message: String| HubError::Unusable {
            repo: r.repo.clone(),
            message,
        };
        match &r.file {
            Some(f) if files.is_empty() => {
                return Err(HubError::NoFile {
                    repo: r.repo.clone(),
                    file: f.clone(),
                })
            }
            Some(f) if !crate::model::gguf::is_gguf(Path::new(f)) => {
                return Err(unusable(format!("{f:?}: a single file must be a .gguf")))
            }
            Some(_) => {}
            None => {
                if !files.iter().any(|e| e.path == "config.json") {
                    return Err(unusable(
                        "has no config.json at its root; for a GGUF repository name the file (org/name:file.gguf)".into(),
                    ));
                }
                if !files.iter().any(|e| e.path.ends_with(".safetensors")) {
                    return Err(unusable(
                        "has no .safetensors weights (qlorad does not read pickled .bin files)"
                            .into(),
                    ));
                }
            }
        }
        files.sort_by_key(|e| e.path == "config.json");
        Ok((commit, files))
    }

    /// One file: its blob (resumed, checked, renamed into place) and the snapshot's link to it.
    fn fetch_file(
        &self,
        c: &Client,
        r: &HubRef,
        commit: &str,
        repo: &Path,
        e: &TreeEntry,
        progress: Progress<'_>,
    ) -> Result<()> {
        let blobs = repo.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
        let blob = blobs.join(e.blob());
        if !blob.exists() {
            let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
            if !blob.exists() {
                self.download(c, r, commit, e, &blob, progress)?;
            }
        }
        let link = repo.join("snapshots").join(commit).join(&e.path);
        let parent = link.parent().expect("a snapshot file has a parent");
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        if link.symlink_metadata().is_ok() {
            return Ok(());
        }
        // `snapshots/<commit>/<path>` -> `../../blobs/<hash>`, one more `..` per folder.
        let depth = e.path.matches('/').count();
        let target = PathBuf::from("../".repeat(depth + 2))
            .join("blobs")
            .join(e.blob());
        symlink_or_copy(&target, &blob, &link)
    }

    fn download(
        &self,
        c: &Client,
        r: &HubRef,
        commit: &str,
        e: &TreeEntry,
        blob: &Path,
        progress: Progress<'_>,
    ) -> Result<()> {
        let partial = blob.with_extension("incomplete");
        let url = format!(
            "{}/{}/resolve/{commit}/{}",
            self.endpoint,
            r.repo,
            url_part(&e.path)
        );
        let total = e.len();
        // A few tries, each resuming from what the previous one wrote.
        let mut last = None;
        for attempt in 0..4 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 << attempt));
            }
            match self.download_once(c, r, &url, &partial, total, &e.path, progress) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(err) if err.retryable() => last = Some(err),
                Err(err) => return Err(err),
            }
        }
        if let Some(err) = last {
            return Err(err);
        }
        if !hash_matches(&partial, e)? {
            let _ = std::fs::remove_file(&partial);
            return Err(HubError::Checksum {
                repo: r.repo.clone(),
                file: e.path.clone(),
                expected: e.blob().to_string(),
            });
        }
        std::fs::rename(&partial, blob).map_err(io(blob))
    }

    /// One GET of the rest of the file, appended to `partial`.
    #[allow(clippy::too_many_arguments)]
    fn download_once(
        &self,
        c: &Client,
        r: &HubRef,
        url: &str,
        partial: &Path,
        total: u64,
        name: &str,
        progress: Progress<'_>,
    ) -> Result<()> {
        let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        if have == total && total > 0 {
            return Ok(());
        }
        let mut req = self.get(c, url);
        if have > 0 && have < total {
            req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let mut resp = req.send().map_err(|e| net(url, e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(self.status_error(r, status, resp.headers()));
        }
        // 206 continues the file; a 200 is the whole of it again.
        let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT && have > 0;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(resumed)
            .write(true)
            .truncate(!resumed)
            .open(partial)
            .map_err(io(partial))?;
        let mut done = if resumed { have } else { 0 };
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = resp.read(&mut buf).map_err(|e| HubError::Network {
                url: url.to_string(),
                message: format!("download stopped after {done} of {total} bytes: {e}"),
            })?;
            if n == 0 {
                break;
            }
            f.write_all(&buf[..n]).map_err(io(partial))?;
            done += n as u64;
            progress(name, done, total);
        }
        f.sync_all().map_err(io(partial))?;
        if done != total {
            return Err(HubError::Network {
                url: url.to_string(),
                message: format!("download stopped after {done} of {total} bytes"),
            });
        }
        Ok(())
    }
}

fn net(url: &str, e: reqwest::Error) -> HubError {
    HubError::Network {
        url: url.to_string(),
        message: e.to_string(),
    }
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Percent-encode what a revision or file path may hold beyond URL-safe characters.
fn url_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether the downloaded file has the hash the hub lists: sha256 for an LFS file, the git
/// blob sha1 (`sha1("blob <len>\0" + content)`) otherwise.
fn hash_matches(path: &Path, e: &TreeEntry) -> Result<bool> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut buf = vec![0u8; 1 << 20];
    let hex = match &e.lfs {
        Some(_) => {
            let mut h = sha2::Sha256::new();
            loop {
                let n = f.read(&mut buf).map_err(io(path))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            format!("{:x}", h.finalize())
        }
        None => {
            let len = std::fs::metadata(path).map_err(io(path))?.len();
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {len}\0").as_bytes());
            loop {
                let n = f.read(&mut buf).map_err(io(path))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            format!("{:x}", h.finalize())
        }
    };
    Ok(hex.eq_ignore_ascii_case(e.blob()))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(unix)]
fn symlink_or_copy(target: &Path, _blob: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link).map_err(io(link))
}

#[cfg(not(unix))]
fn symlink_or_copy(_target: &Path, blob: &Path, link: &Path) -> Result<()> {
    std::fs::copy(blob, link).map(|_| ()).map_err(io(link))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_parse_and_paths_do_not() {
        let r = HubRef::parse("Qwen/Qwen3-8B").unwrap();
        assert_eq!(
            (r.repo.as_str(), r.revision.as_str(), r.file),
            ("Qwen/Qwen3-8B", "main", None)
        );
        let r = HubRef::parse("bartowski/Qwen3-8B-GGUF:Qwen3-8B-Q4_K_M.gguf@v1.0").unwrap();
        assert_eq!(r.repo, "bartowski/Qwen3-8B-GGUF");
        assert_eq!(r.file.as_deref(), Some("Qwen3-8B-Q4_K_M.gguf"));
        assert_eq!(r.revision, "v1.0");
        assert_eq!(
            r.to_string(),
            "bartowski/Qwen3-8B-GGUF:Qwen3-8B-Q4_K_M.gguf@v1.0"
        );
        for local in [
            "tiny",
            "/abs/path",
            "a/b/c",
            "../x/y",
            "org/..",
            "org/name@",
            "org/name:",
            ".hidden/x",
            "org/na me",
        ] {
            assert_eq!(HubRef::parse(local), None, "{local}");
        }
    }
}
