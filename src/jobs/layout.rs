//! Where the service keeps things: the database beside uploaded datasets
//! (`files/<id>.jsonl`), each job's directory (`jobs/<id>/run` for checkpoints and the trained
//! adapter, `jobs/<id>/artifacts` for what users download), and the model roots that a spec's
//! `model` is resolved in. One type, so nothing else spells a path out.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::model::hub::{Hub, HubRef};

#[derive(Debug, Clone)]
pub struct Layout {
    data_dir: PathBuf,
    model_roots: Vec<PathBuf>,
    /// Models by hub id, cached in the hub's layout; None without a model root.
    hub: Option<Hub>,
}

impl Layout {
    pub fn new(cfg: &Config) -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let cache = cfg
            .models
            .hub_cache
            .clone()
            .or_else(|| cfg.models.roots.first().map(|r| r.join("hub")));
        let hub = cache.map(|cache| {
            Hub::new(
                cfg.models
                    .hub_endpoint
                    .clone()
                    .or_else(|| env("HF_ENDPOINT"))
                    .unwrap_or_else(|| "https://huggingface.co".into()),
                env("HF_TOKEN"),
                env("HF_HUB_OFFLINE").is_some_and(|v| v != "0" && v != "false"),
                cache,
            )
        });
        Layout {
            data_dir: cfg.storage.data_dir.clone(),
            model_roots: cfg.models.roots.clone(),
            hub,
        }
    }

    pub fn hub(&self) -> Option<&Hub> {
        self.hub.as_ref()
    }

    /// A `model` that is no local model but a hub id, with the hub to get it from.
    pub fn hub_model(&self, model: &str) -> Option<(&Hub, HubRef)> {
        let hub = self.hub.as_ref()?;
        if self.model(model).is_some() {
            return None;
        }
        Some((hub, HubRef::parse(model)?))
    }

    /// The database's directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn files_dir(&self) -> PathBuf {
        self.data_dir.join("files")
    }

    /// An uploaded dataset.
    pub fn file(&self, id: &str) -> PathBuf {
        self.files_dir().join(format!("{id}.jsonl"))
    }

    /// Where an upload is received and checked before it becomes [`Layout::file`].
    pub fn staged_file(&self, id: &str) -> PathBuf {
        self.files_dir().join(format!(".{id}.partial"))
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("jobs").join(id)
    }

    /// A job's checkpoints, metrics and trained adapter.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("run")
    }

    /// A job's downloadable files.
    pub fn artifacts_dir(&self, id: &str) -> PathBuf {
        self.job_dir(id).join("artifacts")
    }

    /// A spec's `model` inside the model roots: a name or a path below a root, never outside.
    pub fn model(&self, model: &str) -> Option<PathBuf> {
        if model.is_empty() || model.contains("..") {
            return None;
        }
        for root in &self.model_roots {
            let candidate = if Path::new(model).is_absolute() {
                PathBuf::from(model)
            } else {
                root.join(model)
            };
            let (Ok(c), Ok(r)) = (candidate.canonicalize(), root.canonicalize()) else {
                continue;
            };
            if c.starts_with(&r) && crate::model::is_model_path(&c) {
                return Some(c);
            }
        }
        None
    }

    /// Remove uploads a previous process was receiving when it stopped: every one, or where
    /// other processes share the directory, those untouched for `older_than` (no upload of a
    /// live process is that old).
    pub fn remove_staged_files(&self, older_than: Option<std::time::Duration>) {
        for e in std::fs::read_dir(self.files_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            if !e.file_name().to_string_lossy().ends_with(".partial") {
                continue;
            }
            let age = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if older_than.is_none_or(|min| age.is_some_and(|a| a >= min)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_resolve_inside_the_roots_only() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("models");
        std::fs::create_dir_all(root.join("tiny")).unwrap();
        std::fs::write(root.join("tiny/config.json"), "{}").unwrap();
        std::fs::write(tmp.path().join("outside.gguf"), b"GGUF").unwrap();
        let layout = Layout {
            data_dir: tmp.path().join("data"),
            model_roots: vec![root.clone()],
            hub: None,
        };
        assert_eq!(
            layout.model("tiny"),
            Some(root.join("tiny").canonicalize().unwrap())
        );
        assert_eq!(layout.model("../outside.gguf"), None);
        let outside = tmp.path().join("outside.gguf");
        assert_eq!(layout.model(outside.to_str().unwrap()), None);
        assert_eq!(layout.model(""), None);
        assert_eq!(layout.model("missing"), None);
        assert_eq!(
            layout.file("file-1"),
            tmp.path().join("data/files/file-1.jsonl")
        );
        assert_eq!(
            layout.artifacts_dir("job-1"),
            tmp.path().join("data/jobs/job-1/artifacts")
        );
    }
}
