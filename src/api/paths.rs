//! Paths a request names (artifact names, file ids) resolve inside the data directory only:
//! no `..`, no absolute paths, and no symlink that leads out.

use std::path::{Component, Path, PathBuf};

/// `root/rel` if `rel` is a plain relative path and the file it names, symlinks resolved, is
/// inside `root` (symlinks resolved too). `None` for anything else, or a path that is missing.
pub fn contained(root: &Path, rel: &str) -> Option<PathBuf> {
    let rel = Path::new(rel);
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    let root = root.canonicalize().ok()?;
    let real = root.join(rel).canonicalize().ok()?;
    real.starts_with(&root).then_some(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_paths_inside_the_root_resolve() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("artifacts");
        std::fs::create_dir_all(root.join("merged")).unwrap();
        std::fs::write(root.join("merged/config.json"), "{}").unwrap();
        std::fs::write(tmp.path().join("secret"), "x").unwrap();
        assert!(contained(&root, "merged/config.json").is_some());
        for bad in [
            "../secret",
            "merged/../../secret",
            "/etc/passwd",
            "",
            "./merged/config.json",
            "missing",
        ] {
            assert_eq!(contained(&root, bad), None, "{bad}");
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(tmp.path().join("secret"), root.join("link")).unwrap();
            std::os::unix::fs::symlink(tmp.path(), root.join("dirlink")).unwrap();
            assert_eq!(contained(&root, "link"), None);
            assert_eq!(contained(&root, "dirlink/secret"), None);
            std::os::unix::fs::symlink(root.join("merged"), root.join("inner")).unwrap();
            assert!(contained(&root, "inner/config.json").is_some());
        }
    }
}
