//! The safetensors weights of a model directory, memory-mapped, one file or many shards.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorView};
use safetensors::{Dtype, SafeTensors};

use super::{io_err, read_json, ModelError, Result};

/// A dense tensor on `dev` from a safetensors view of f32, f16 or bf16 data.
pub fn view_to_tensor(
    name: &str,
    v: &TensorView<'_>,
    dev: &candle_core::Device,
) -> Result<candle_core::Tensor> {
    use candle_core::Tensor;
    let shape = v.shape().to_vec();
    let d = v.data();
    let t = match v.dtype() {
        Dtype::F32 => Tensor::from_slice(&cast_bytes::<f32>(d), shape, dev)?,
        Dtype::BF16 => Tensor::from_slice(&cast_bytes::<half::bf16>(d), shape, dev)?,
        Dtype::F16 => Tensor::from_slice(&cast_bytes::<half::f16>(d), shape, dev)?,
        other => {
            return Err(ModelError::BadTensor {
                tensor: name.to_string(),
                message: format!("dtype {other:?} is not a float type"),
            })
        }
    };
    Ok(t)
}

/// A tensor's bytes as `T`: borrowed straight from the mapped file when aligned for `T` (as
/// safetensors writes them), else through one aligned copy.
pub fn cast_bytes<T: bytemuck::Pod>(d: &[u8]) -> std::borrow::Cow<'_, [T]> {
    match bytemuck::try_cast_slice(d) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => std::borrow::Cow::Owned(bytemuck::pod_collect_to_vec(d)),
    }
}

/// Name of the single-file checkpoint and of the shard index transformers writes.
pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One memory-mapped safetensors file.
pub struct Shard {
    pub path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    metadata: Metadata,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        // SAFETY: the file is only read; a concurrent writer truncating it is outside our contract,
        // as for every reader of memory-mapped checkpoints (candle, safetensors, torch).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|source| ModelError::Safetensors {
                path: path.to_path_buf(),
                source,
            })?;
        let shard = Shard {
            path: path.to_path_buf(),
            data_start: 8 + header_len,
            metadata,
            mmap,
        };
        // Validate every tensor's extent once, so `view` cannot fail later.
        for (name, info) in shard.metadata.tensors() {
            let (s, e) = info.data_offsets;
            let expected = info.shape.iter().product::<usize>() * info.dtype.bitsize() / 8;
            if e < s || shard.data_start + e > shard.mmap.len() || e - s != expected {
                return Err(ModelError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "tensor {name} has inconsistent data offsets (file truncated?)"
                    ),
                });
            }
        }
        Ok(shard)
    }

    /// Tensor names in this file, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.metadata.tensors().into_keys().collect();
        names.sort();
        names
    }

    pub fn view(&self, name: &str) -> Option<TensorView<'_>> {
        let info = self.metadata.info(name)?;
        let (s, e) = info.data_offsets;
        let data = &self.mmap[self.data_start + s..self.data_start + e];
        TensorView::new(info.dtype, info.shape.clone(), data).ok()
    }

    /// The file's `__metadata__`.
    pub fn metadata(&self) -> Option<&std::collections::HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }
}

/// All weights of a model directory: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
pub struct WeightFiles {
    pub dir: PathBuf,
    shards: Vec<Shard>,
    /// Which shard holds each tensor.
    index: BTreeMap<String, usize>,
    sharded: bool,
}

impl WeightFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        let (files, sharded) = if index_path.exists() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Invalid {
                    path: index_path.clone(),
                    message: "no weight_map object".into(),
                })?;
            let mut files: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| ModelError::Invalid {
                    path: index_path.clone(),
                    message: format!("weight_map[{tensor:?}] is not a file name"),
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(ModelError::Invalid {
                        path: index_path.clone(),
                        message: format!(
                            "weight_map[{tensor:?}] names {file:?}, outside the model directory"
                        ),
                    });
                }
                if !files.iter().any(|f| f == file) {
                    files.push(file.to_string());
                }
            }
            files.sort();
            (files, true)
        } else if single.exists() {
            (vec![SINGLE_FILE.to_string()], false)
        } else {
            return Err(ModelError::Missing { path: single });
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            let path = dir.join(f);
            if !path.exists() {
                return Err(ModelError::Invalid {
                    path: index_path.clone(),
                    message: format!("names shard {f}, which is missing"),
                });
            }
            let shard = Shard::open(&path)?;
            for name in shard.names() {
                if let Some(prev) = index.insert(name.clone(), i) {
                    return Err(ModelError::Invalid {
                        path,
                        message: format!("tensor {name} also appears in {}", files[prev]),
                    });
                }
            }
            shards.push(shard);
        }
        Ok(WeightFiles {
            dir: dir.to_path_buf(),
            shards,
            index,
            sharded,
        })
    }

    /// A single safetensors file, outside any model directory.
    pub fn open_file(path: &Path) -> Result<Self> {
        let shard = Shard::open(path)?;
        let index = shard.names().into_iter().map(|n| (n, 0)).collect();
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Ok(WeightFiles {
            dir,
            shards: vec![shard],
            index,
            sharded: false,
        })
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    pub fn is_sharded(&self) -> bool {
        self.sharded
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|s| s.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        self.shards[*self.index.get(name)?].view(name)
    }

    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        self.get(name).ok_or_else(|| ModelError::BadTensor {
            tensor: name.to_string(),
            message: format!("not found in {}", self.dir.display()),
        })
    }

    /// The float dtype most weights are stored in (the model's `torch_dtype`).
    pub fn dominant_float_dtype(&self) -> Option<Dtype> {
        let mut counts: BTreeMap<String, (usize, Dtype)> = BTreeMap::new();
        for name in self.names() {
            if let Some(v) = self.get(name) {
                if matches!(v.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16) {
                    let e = counts
                        .entry(format!("{:?}", v.dtype()))
                        .or_insert((0, v.dtype()));
                    e.0 += v.data().len();
                }
            }
        }
        counts.into_values().max_by_key(|(n, _)| *n).map(|(_, d)| d)
    }
}
