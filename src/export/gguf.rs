//! A GGUF v3 writer that streams: tensor infos are declared up front (type and shape fix each
//! tensor's size), then tensor data is written one tensor at a time, produced on demand.

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;

use super::{ExportError, Result};

pub const ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    ArrayString(Vec<String>),
    ArrayI32(Vec<i32>),
    ArrayF32(Vec<f32>),
}

fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// Bytes of a tensor of `ne0 x rows` in type `t`.
pub fn tensor_bytes(t: GgmlDType, shape: &[usize]) -> usize {
    let n: usize = shape.iter().product();
    n / t.block_size() * t.type_size()
}

fn write_str<W: Write>(w: &mut W, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value<W: Write>(w: &mut W, v: &Value) -> std::io::Result<()> {
    const U32: u32 = 4;
    const I32: u32 = 5;
    const F32: u32 = 6;
    const BOOL: u32 = 7;
    const STRING: u32 = 8;
    const ARRAY: u32 = 9;
    match v {
        Value::U32(x) => {
            w.write_all(&U32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Value::I32(x) => {
            w.write_all(&I32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Value::F32(x) => {
            w.write_all(&F32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Value::Bool(x) => {
            w.write_all(&BOOL.to_le_bytes())?;
            w.write_all(&[*x as u8])
        }
        Value::String(s) => {
            w.write_all(&STRING.to_le_bytes())?;
            write_str(w, s)
        }
        Value::ArrayString(a) => {
            w.write_all(&ARRAY.to_le_bytes())?;
            w.write_all(&STRING.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|s| write_str(w, s))
        }
        Value::ArrayI32(a) => {
            w.write_all(&ARRAY.to_le_bytes())?;
            w.write_all(&I32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
        Value::ArrayF32(a) => {
            w.write_all(&ARRAY.to_le_bytes())?;
            w.write_all(&F32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
    }
}

/// One tensor to be written: GGUF name, type and shape in torch order (`[rows, ne0]`).
#[derive(Debug, Clone)]
pub struct TensorDecl {
    pub name: String,
    pub dtype: GgmlDType,
    pub shape: Vec<usize>,
}

/// Writes `<path>.partial` and renames it to `path` in `finish`; dropped unfinished, it removes
/// the partial file, so no half-written GGUF ever carries the final name.
pub struct GgufWriter {
    path: PathBuf,
    partial: PathBuf,
    w: Option<BufWriter<File>>,
    decls: Vec<TensorDecl>,
    next: usize,
}

impl GgufWriter {
    pub fn create(
        path: &Path,
        metadata: &[(String, Value)],
        decls: Vec<TensorDecl>,
    ) -> Result<Self> {
        let partial = path.with_extension("gguf.partial");
        let io = |e| ExportError::Io {
            path: partial.clone(),
            source: e,
        };
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&partial).map_err(io)?);
        let header = (|| -> std::io::Result<()> {
            w.write_all(b"GGUF")?;
            w.write_all(&3u32.to_le_bytes())?;
            w.write_all(&(decls.len() as u64).to_le_bytes())?;
            w.write_all(&(metadata.len() as u64).to_le_bytes())?;
            for (k, v) in metadata {
                write_str(&mut w, k)?;
                write_value(&mut w, v)?;
            }
            let mut offset = 0u64;
            for d in &decls {
                write_str(&mut w, &d.name)?;
                w.write_all(&(d.shape.len() as u32).to_le_bytes())?;
                for &dim in d.shape.iter().rev() {
                    w.write_all(&(dim as u64).to_le_bytes())?;
                }
                w.write_all(&ggml_type_id(d.dtype).to_le_bytes())?;
                w.write_all(&offset.to_le_bytes())?;
                offset += (tensor_bytes(d.dtype, &d.shape) as u64).next_multiple_of(ALIGNMENT);
            }
            let pos = w.stream_position()?;
            w.write_all(&vec![0u8; (pos.next_multiple_of(ALIGNMENT) - pos) as usize])?;
            Ok(())
        })();
        match header {
            Ok(_) => {}
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(io(e));
            }
        }
        Ok(GgufWriter {
            path: path.to_path_buf(),
            partial,
            w: Some(w),
            decls,
            next: 0,
        })
    }

    /// The next declared tensor, if any.
    pub fn next_decl(&self) -> Option<&TensorDecl> {
        self.decls.get(self.next)
    }

    /// Write the data of the next declared tensor.
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        let d = self
            .decls
            .get(self.next)
            .ok_or_else(|| ExportError::Invalid("more tensors than declared".into()))?;
        let want = tensor_bytes(d.dtype, &d.shape);
        if data.len() != want {
            return Err(ExportError::Invalid(format!(
                "{}: {} bytes, expected {want}",
                d.name,
                data.len()
            )));
        }
        let w = self.w.as_mut().expect("open until finish");
        let pad = (want as u64).next_multiple_of(ALIGNMENT) - want as u64;
        w.write_all(data)
            .and_then(|_| w.write_all(&vec![0u8; pad as usize]))
            .map_err(|e| ExportError::Io {
                path: self.partial.clone(),
                source: e,
            })?;
        self.next += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        if self.next != self.decls.len() {
            return Err(ExportError::Invalid(format!(
                "{} of {} tensors written",
                self.next,
                self.decls.len()
            )));
        }
        let mut w = self.w.take().expect("open until finish");
        let io = |e| ExportError::Io {
            path: self.partial.clone(),
            source: e,
        };
        w.flush().map_err(io)?;
        let f = w.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&self.partial, &self.path).map_err(|e| ExportError::Io {
            path: self.path.clone(),
            source: e,
        })
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if self.w.is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}
