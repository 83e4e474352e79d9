//! Where the service keeps things: the database beside uploaded datasets
//! (`files/<id>.jsonl`), each job's directory (`jobs/<id>/run` for checkpoints and the trained
//! adapter, `jobs/<id>/artifacts` for what users download), and the model roots that a spec's
//! `model` is resolved in. One type, so nothing else spells a path out.

use std::path::{Path, PathBuf};

use crate::config::Config;

#[derive(Debug, Clone)]
pub struct Layout {
    data_dir: PathBuf,
    model_roots: Vec<PathBuf>,
}

impl Layout {
    pub fn new(cfg: &Config) -> Self {
        Layout {
            data_dir: cfg.storage.data_dir.clone(),
            model_roots: cfg.models.roots.clone(),
        }
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

    /// Remove uploads a previous process was receiving when it stopped.
    pub fn remove_staged_files(&self) {
        for e in std::fs::read_dir(self.files_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().ends_with(".partial") {
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
