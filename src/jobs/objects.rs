//! Files, checkpoints and artifacts in an object store every host reads
//! (`storage.object_store = "s3://bucket/prefix"`): the data directory stays each process's
//! working copy, and the store holds the same paths under its prefix (`files/<id>.jsonl`,
//! `jobs/<id>/run/checkpoint-N/…`, `jobs/<id>/artifacts/…`). A file is uploaded in parts as it
//! is read (an upload that fails is aborted, so nothing half-written stays behind); a
//! checkpoint's files go first and its `.complete` marker last, so a host that never saw it
//! takes only whole ones. Credentials, endpoint and region come from the usual `AWS_*`
//! variables (`AWS_ENDPOINT_URL` for MinIO, R2 or any S3-compatible server).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{Stream, StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectStore, WriteMultipart};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What marks a checkpoint directory as whole in the store.
const COMPLETE: &str = ".complete";

/// Part size of multipart uploads (S3's minimum is 5 MiB).
const PART: usize = 16 << 20;

#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    data_dir: PathBuf,
    url: String,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects").field("url", &self.url).finish()
    }
}

fn io(e: object_store::Error) -> std::io::Error {
    match e {
        object_store::Error::NotFound { .. } => {
            std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string())
        }
        e => std::io::Error::other(format!("object store: {e}")),
    }
}

impl Objects {
    /// The store of `url` (`s3://bucket[/prefix]` or `file:///dir`) mirroring `data_dir`.
    pub fn open(url: &str, data_dir: &Path) -> Result<Self, String> {
        let bad = |m: String| format!("storage.object_store {url:?}: {m}");
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("must be s3://bucket/prefix or file:///path".into()))?;
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match scheme {
            "s3" | "s3a" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(object_store::RetryConfig {
                        max_retries: 4,
                        ..Default::default()
                    });
                let endpoint = std::env::var("AWS_ENDPOINT_URL")
                    .or_else(|_| std::env::var("AWS_ENDPOINT"))
                    .ok();
                if let Some(e) = &endpoint {
                    b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
                }
                if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none()
                {
                    b = b.with_region("us-east-1");
                }
                let s3 = b.build().map_err(|e| bad(e.to_string()))?;
                (Arc::new(s3), prefix.trim_matches('/').to_string())
            }
            "file" => {
                std::fs::create_dir_all(rest).map_err(|e| bad(e.to_string()))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(rest)
                    .map_err(|e| bad(e.to_string()))?;
                (Arc::new(fs), String::new())
            }
            other => return Err(bad(format!("unknown scheme {other}://"))),
        };
        Ok(Objects {
            store,
            prefix,
            data_dir: data_dir.to_path_buf(),
            url: url.to_string(),
        })
    }

    /// The key of a path inside the data directory.
    fn key(&self, local: &Path) -> std::io::Result<Key> {
        let rel = local.strip_prefix(&self.data_dir).map_err(|_| {
            std::io::Error::other(format!("{} is outside the data directory", local.display()))
        })?;
        let mut parts: Vec<String> = vec![];
        if !self.prefix.is_empty() {
            parts.push(self.prefix.clone());
        }
        parts.extend(rel.iter().map(|p| p.to_string_lossy().into_owned()));
        Ok(Key::from(parts.join("/")))
    }

    /// Upload a local file under its key, in parts as it is read. A failed upload is aborted:
    /// no part of it stays in the store.
    pub async fn put_file(&self, local: &Path) -> std::io::Result<()> {
        self.put_as(local, self.key(local)?).await
    }

    async fn put_as(&self, local: &Path, key: Key) -> std::io::Result<()> {
        let mut file = tokio::fs::File::open(local).await?;
        let upload = self.store.put_multipart(&key).await.map_err(io)?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0u8; 1 << 20];
        let result: std::io::Result<()> = async {
            loop {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                w.wait_for_capacity(4).await.map_err(io)?;
                w.write(&buf[..n]);
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => w.finish().await.map(|_| ()).map_err(io),
            Err(e) => {
                let _ = w.abort().await;
                Err(e)
            }
        }
    }

    /// Upload every file of a local directory, then its `.complete` marker.
    pub async fn put_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.put_dir_as(dir, dir).await
    }

    /// Upload the files of `src` as those of `dir` (a checkpoint still under its temporary
    /// name), then `dir`'s marker.
    pub async fn put_dir_as(&self, src: &Path, dir: &Path) -> std::io::Result<()> {
        let mut pending = vec![src.to_path_buf()];
        while let Some(d) = pending.pop() {
            let mut entries = tokio::fs::read_dir(&d).await?;
            while let Some(e) = entries.next_entry().await? {
                if e.file_type().await?.is_dir() {
                    pending.push(e.path());
                } else {
                    let rel = e.path().strip_prefix(src).map(Path::to_path_buf);
                    let rel = rel.map_err(std::io::Error::other)?;
                    self.put_as(&e.path(), self.key(&dir.join(rel))?).await?;
                }
            }
        }
        let marker = self.key(&dir.join(COMPLETE))?;
        self.store
            .put(&marker, bytes::Bytes::new().into())
            .await
            .map_err(io)?;
        Ok(())
    }

    /// Download a file to its local path if it is not there. False if the store has no such
    /// object.
    pub async fn fetch_file(&self, local: &Path) -> std::io::Result<bool> {
        if tokio::fs::try_exists(local).await? {
            return Ok(true);
        }
        match self.download(&self.key(local)?, local).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Write an object to `local` through a `.partial` name, so a half-downloaded file is
    /// never read.
    async fn download(&self, key: &Key, local: &Path) -> std::io::Result<()> {
        let got = self.store.get(key).await.map_err(io)?;
        if let Some(parent) = local.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let name = local.file_name().unwrap_or_default().to_string_lossy();
        let partial = local.with_file_name(format!(".{name}.{}.partial", uuid::Uuid::new_v4()));
        let written: std::io::Result<()> = async {
            let mut out = tokio::fs::File::create(&partial).await?;
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk.map_err(io)?).await?;
            }
            out.sync_all().await?;
            tokio::fs::rename(&partial, local).await
        }
        .await;
        if written.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        written
    }

    /// Every object under a local directory's key, with its path relative to the directory.
    async fn list_under(&self, dir: &Path) -> std::io::Result<Vec<(Key, Vec<String>)>> {
        let prefix = self.key(dir)?;
        let objects: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(io)?;
        Ok(objects
            .into_iter()
            .filter_map(|o| {
                let rel = o.location.prefix_match(&prefix)?;
                let rel = rel.map(|p| p.as_ref().to_string()).collect();
                Some((o.location, rel))
            })
            .collect())
    }

    /// Download every object under a local directory's key that is not there yet.
    pub async fn fetch_dir(&self, dir: &Path) -> std::io::Result<usize> {
        let mut n = 0;
        for (_, rel) in self.list_under(dir).await? {
            if rel.last().map(String::as_str) == Some(COMPLETE) {
                continue;
            }
            let local = rel.iter().fold(dir.to_path_buf(), |p, part| p.join(part));
            if self.fetch_file(&local).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Download every object under `dir`'s key into `into` (the same relative paths).
    async fn fetch_into(&self, dir: &Path, into: &Path) -> std::io::Result<()> {
        for (key, rel) in self.list_under(dir).await? {
            if rel.last().map(String::as_str) == Some(COMPLETE) {
                continue;
            }
            let local = rel.iter().fold(into.to_path_buf(), |p, part| p.join(part));
            self.download(&key, &local).await?;
        }
        Ok(())
    }

    /// The whole checkpoints (`checkpoint-<step>` with their marker) the store holds for a
    /// run directory, by step.
    pub async fn complete_checkpoints(&self, run_dir: &Path) -> std::io::Result<Vec<usize>> {
        let mut steps: Vec<usize> = self
            .list_under(run_dir)
            .await?
            .iter()
            .filter_map(|(_, rel)| match rel.as_slice() {
                [dir, marker] if marker == COMPLETE => {
                    dir.strip_prefix("checkpoint-")?.parse().ok()
                }
                _ => None,
            })
            .collect();
        steps.sort_unstable();
        Ok(steps)
    }

    /// Bytes `start..=end` of a file's object, as a stream.
    pub async fn get_range(
        &self,
        local: &Path,
        start: u64,
        end: u64,
    ) -> std::io::Result<impl Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static> {
        let key = self.key(local)?;
        let opts = GetOptions {
            range: Some(GetRange::Bounded(start..end + 1)),
            ..Default::default()
        };
        let got = self.store.get_opts(&key, opts).await.map_err(io)?;
        Ok(got.into_stream().map(|c| c.map_err(io)))
    }

    /// Remove a file's object (absent is fine).
    pub async fn delete(&self, local: &Path) -> std::io::Result<()> {
        match self.store.delete(&self.key(local)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    /// Remove every object under a local directory's key.
    pub async fn delete_dir(&self, dir: &Path) -> std::io::Result<()> {
        let prefix = self.key(dir)?;
        let keys = self
            .store
            .list(Some(&prefix))
            .map_ok(|o| o.location)
            .boxed();
        let mut deleted = self.store.delete_stream(keys);
        while let Some(r) = deleted.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(io(e)),
            }
        }
        Ok(())
    }
}

/// The service's side: what each process shares and fetches. Without an object store every
/// call is a no-op on the data directory.
impl super::Service {
    /// A dataset's local path, downloaded first where another host received it.
    pub async fn local_file(&self, id: &str) -> std::io::Result<PathBuf> {
        let path = self.layout.file(id);
        if let Some(o) = &self.objects {
            o.fetch_file(&path).await?;
        }
        Ok(path)
    }

    /// Share a file of the data directory (an upload, a result file, an artifact).
    pub async fn share_file(&self, local: &Path) -> std::io::Result<()> {
        match &self.objects {
            Some(o) => o.put_file(local).await,
            None => Ok(()),
        }
    }

    /// Share a checkpoint directory, its marker last. Its event comes while the trainer still
    /// has it under the temporary name (`.checkpoint-N.partial` beside it).
    pub async fn share_checkpoint(&self, dir: &Path) -> std::io::Result<()> {
        let Some(o) = &self.objects else {
            return Ok(());
        };
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let partial = dir.with_file_name(format!(".{name}.partial"));
        let src = if tokio::fs::try_exists(&partial).await? {
            partial
        } else {
            dir.to_path_buf()
        };
        o.put_dir_as(&src, dir).await
    }

    /// A directory another job wrote (an adapter to continue from), fetched where missing.
    pub async fn local_dir(&self, dir: &Path) -> std::io::Result<()> {
        if let Some(o) = &self.objects {
            o.fetch_dir(dir).await?;
        }
        Ok(())
    }

    /// Before a run: the newest whole checkpoint in the store, when it is newer than any
    /// here, and the run's reference log-probabilities (DPO), so a job that another host
    /// started resumes where that host stopped. The step fetched, if any.
    pub async fn fetch_run(&self, id: &str) -> std::io::Result<Option<usize>> {
        let Some(o) = &self.objects else {
            return Ok(None);
        };
        let run = self.layout.run_dir(id);
        o.fetch_file(&run.join(crate::finetune::run::REFERENCE_FILE))
            .await?;
        let Some(&newest) = o.complete_checkpoints(&run).await?.last() else {
            return Ok(None);
        };
        let dir = crate::train::checkpoint::checkpoint_dir(&run, newest);
        if tokio::fs::try_exists(&dir).await? {
            return Ok(None);
        }
        // Into a fresh directory, renamed when whole: the trainer never sees half of one.
        let partial = run.join(format!(".checkpoint-{newest}.partial"));
        let _ = tokio::fs::remove_dir_all(&partial).await;
        let fetched: std::io::Result<()> = async {
            o.fetch_into(&dir, &partial).await?;
            tokio::fs::rename(&partial, &dir).await
        }
        .await;
        if fetched.is_err() {
            let _ = tokio::fs::remove_dir_all(&partial).await;
        }
        fetched.map(|_| Some(newest))
    }

    /// Forget a job's shared files.
    pub async fn unshare_job(&self, id: &str) -> std::io::Result<()> {
        match &self.objects {
            Some(o) => o.delete_dir(&self.layout.job_dir(id)).await,
            None => Ok(()),
        }
    }

    /// Forget a dataset's shared copy.
    pub async fn unshare_file(&self, id: &str) -> std::io::Result<()> {
        match &self.objects {
            Some(o) => o.delete(&self.layout.file(id)).await,
            None => Ok(()),
        }
    }

    /// Bytes `start..=end` of an artifact this host does not have, from the store.
    pub async fn shared_range(
        &self,
        local: &Path,
        start: u64,
        end: u64,
    ) -> Option<impl Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static> {
        self.objects
            .as_ref()?
            .get_range(local, start, end)
            .await
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same operations on a `file://` store; `tests/hosts.rs` runs them on S3.
    #[tokio::test]
    async fn files_directories_and_whole_checkpoints_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, other, bucket) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("bucket"),
        );
        let url = format!("file://{}", bucket.display());
        let a = Objects::open(&url, &data).unwrap();
        let b = Objects::open(&url, &other).unwrap();
        let run = data.join("jobs/job-1/run");
        for (step, whole) in [(2, true), (4, true), (6, false)] {
            let dir = run.join(format!("checkpoint-{step}"));
            std::fs::create_dir_all(dir.join("nested")).unwrap();
            std::fs::write(dir.join("adapter.bin"), vec![step as u8; 3000]).unwrap();
            std::fs::write(dir.join("nested/state.json"), "{}").unwrap();
            if whole {
                a.put_dir(&dir).await.unwrap();
            } else {
                // Half-written: files, no marker.
                a.put_file(&dir.join("adapter.bin")).await.unwrap();
            }
        }
        let other_run = other.join("jobs/job-1/run");
        assert_eq!(b.complete_checkpoints(&other_run).await.unwrap(), [2, 4]);
        let dir = other_run.join("checkpoint-4");
        assert_eq!(b.fetch_dir(&dir).await.unwrap(), 2);
        assert_eq!(std::fs::read(dir.join("adapter.bin")).unwrap(), [4u8; 3000]);
        assert!(dir.join("nested/state.json").is_file());
        assert!(!dir.join(COMPLETE).exists());

        let range: Vec<bytes::Bytes> = b
            .get_range(&dir.join("adapter.bin"), 10, 19)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(range.concat(), [4u8; 10]);
        assert!(!b.fetch_file(&other.join("files/none.jsonl")).await.unwrap());

        a.delete_dir(&run).await.unwrap();
        assert!(b.complete_checkpoints(&other_run).await.unwrap().is_empty());
    }
}
