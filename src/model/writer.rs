//! A safetensors writer that streams tensor by tensor and never leaves a half-written file.
//!
//! Tensor data goes to a scratch file as it comes; `finish` writes the header, appends the
//! data (an in-kernel copy) and renames the result into place. Peak memory is one tensor.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::{json, Map, Value};

use super::{io_err, Result};

pub struct SafetensorsWriter {
    path: PathBuf,
    scratch_path: PathBuf,
    scratch: BufWriter<File>,
    header: Map<String, Value>,
    offset: usize,
    sizes: BTreeMap<String, usize>,
}

impl SafetensorsWriter {
    /// Start writing `path`; `metadata` becomes `__metadata__` (transformers wants `format: pt`).
    pub fn create(path: &Path, metadata: &[(&str, &str)]) -> Result<Self> {
        let scratch_path = path.with_extension("safetensors.data.partial");
        let file = File::create(&scratch_path).map_err(io_err(&scratch_path))?;
        let mut header = Map::new();
        let meta: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        header.insert("__metadata__".into(), Value::Object(meta));
        Ok(SafetensorsWriter {
            path: path.to_path_buf(),
            scratch_path,
            scratch: BufWriter::with_capacity(1 << 20, file),
            header,
            offset: 0,
            sizes: BTreeMap::new(),
        })
    }

    pub fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: &[u8]) -> Result<()> {
        debug_assert_eq!(
            shape.iter().product::<usize>() * dtype.bitsize() / 8,
            data.len()
        );
        self.scratch
            .write_all(data)
            .map_err(io_err(&self.scratch_path))?;
        let end = self.offset + data.len();
        self.header.insert(
            name.to_string(),
            json!({ "dtype": dtype, "shape": shape, "data_offsets": [self.offset, end] }),
        );
        self.sizes.insert(name.to_string(), data.len());
        self.offset = end;
        Ok(())
    }

    /// Bytes of tensor data written so far.
    pub fn data_bytes(&self) -> usize {
        self.offset
    }

    /// Names and byte sizes of the tensors written.
    pub fn sizes(&self) -> &BTreeMap<String, usize> {
        &self.sizes
    }

    /// Write the file and move it into place.
    pub fn finish(mut self) -> Result<()> {
        self.scratch.flush().map_err(io_err(&self.scratch_path))?;
        let mut header = serde_json::to_vec(&self.header).expect("a JSON map always serializes");
        // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
        header.resize(header.len().next_multiple_of(8), b' ');
        let partial = self.path.with_extension("safetensors.partial");
        let result = (|| -> std::io::Result<()> {
            let mut out = File::create(&partial)?;
            out.write_all(&(header.len() as u64).to_le_bytes())?;
            out.write_all(&header)?;
            let mut data = File::open(&self.scratch_path)?;
            std::io::copy(&mut data, &mut out)?;
            out.sync_all()?;
            std::fs::rename(&partial, &self.path)
        })();
        let _ = std::fs::remove_file(&self.scratch_path);
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result.map_err(io_err(&self.path))
    }
}

impl Drop for SafetensorsWriter {
    fn drop(&mut self) {
        // After `finish` the scratch file is gone already; on an early return it is removed here.
        let _ = std::fs::remove_file(&self.scratch_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    #[test]
    fn written_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let mut w = SafetensorsWriter::create(&path, &[("format", "pt")]).unwrap();
        w.add("a", Dtype::U8, &[3], &[1, 2, 3]).unwrap();
        w.add("b", Dtype::F32, &[2], &[0, 0, 128, 63, 0, 0, 0, 64])
            .unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), &[1, 2, 3]);
        assert_eq!(st.tensor("b").unwrap().shape(), &[2]);
        let (n, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(n % 8, 0);
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no scratch files left"
        );
    }
}
