//! `Quant4Tensor`: a weight held as packed 4-bit codes plus its quant state, on a candle device.

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use half::{bf16, f16};

use super::blockwise::{self, num_blocks};
use super::double::NestedAbsmax;
use super::{FloatDType, FloatSlice, OutFloat, QuantConfig, QuantError, QuantType, Result};

/// The per-block scales of a 4-bit weight.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double-quantized: one byte per block plus f32 per 256 blocks.
    Nested(NestedAbsmax),
}

impl Absmax {
    /// The f32 absmax per block, expanding double quantization.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        match self {
            Absmax::Plain(a) => Ok(a.clone()),
            Absmax::Nested(n) => n.expand(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Absmax::Plain(a) => a.len(),
            Absmax::Nested(n) => n.codes.len(),
        }
    }
}

/// A 4-bit (NF4 or FP4) weight: the packed codes live on `device` as a u8 tensor of
/// `ceil(numel / 2)` bytes, element 2j in the high nibble; the quant state is small and stays on
/// the host. Dequantization returns a dense tensor on the same device.
#[derive(Debug, Clone)]
pub struct Quant4Tensor {
    packed: Tensor,
    absmax: Absmax,
    /// The absmax again on the packed codes' device when that is a GPU, for its kernels.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device_absmax: Option<DeviceAbsmax>,
    quant_type: QuantType,
    block_size: usize,
    shape: Shape,
    dtype: FloatDType,
    /// The absmax expanded to f32, made on first use by the CPU's fused product.
    absmax_cache: std::sync::OnceLock<Arc<Vec<f32>>>,
}

/// The quant state on a GPU: what the dequantization kernel reads.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum DeviceAbsmax {
    Plain(Tensor),
    Nested {
        codes: Tensor,
        scales: Tensor,
        code: Tensor,
        offset: f32,
        block_size: usize,
    },
}

impl DeviceAbsmax {
    /// None on the CPU, whose path reads the host copy.
    fn new(absmax: &Absmax, device: &Device) -> Result<Option<Self>> {
        if device.is_cpu() {
            return Ok(None);
        }
        Ok(Some(match absmax {
            Absmax::Plain(a) => DeviceAbsmax::Plain(Tensor::from_slice(a, a.len(), device)?),
            Absmax::Nested(n) => DeviceAbsmax::Nested {
                codes: Tensor::from_slice(&n.codes, n.codes.len(), device)?,
                scales: Tensor::from_slice(&n.scales, n.scales.len(), device)?,
                code: Tensor::from_slice(n.code.as_slice(), 256, device)?,
                offset: n.offset,
                block_size: n.block_size,
            },
        }))
    }
}

impl Quant4Tensor {
    /// Quantize a dense f32/f16/bf16 tensor of any shape.
    pub fn quantize(t: &Tensor, config: &QuantConfig) -> Result<Self> {
        let dtype = FloatDType::from_candle(t.dtype())?;
        #[cfg(feature = "cuda")]
        if t.device().is_cuda() {
            return Self::quantize_cuda(t, None, config, dtype);
        }
        let flat = t.flatten_all()?;
        let (packed, absmax) = match dtype {
            FloatDType::F32 => {
                Self::quantize_host(FloatSlice::F32(&flat.to_vec1::<f32>()?), config)?
            }
            FloatDType::F16 => {
                Self::quantize_host(FloatSlice::F16(&flat.to_vec1::<f16>()?), config)?
            }
            FloatDType::BF16 => {
                Self::quantize_host(FloatSlice::BF16(&flat.to_vec1::<bf16>()?), config)?
            }
        };
        let n = packed.len();
        let packed = Tensor::from_vec(packed, n, t.device())?;
        Ok(Quant4Tensor {
            packed,
            device_absmax: DeviceAbsmax::new(&absmax, t.device())?,
            absmax,
            quant_type: config.quant_type,
            block_size: config.block_size,
            shape: t.shape().clone(),
            dtype,
            absmax_cache: Default::default(),
        })
    }

    /// Quantize host floats given their shape; the packed codes go to `device`.
    pub fn quantize_slice(
        data: FloatSlice<'_>,
        shape: impl Into<Shape>,
        config: &QuantConfig,
        device: &Device,
    ) -> Result<Self> {
        let shape = shape.into();
        if shape.elem_count() != data.len() {
            return Err(QuantError::InvalidState(format!(
                "shape {shape:?} holds {} elements, data has {}",
                shape.elem_count(),
                data.len()
            )));
        }
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            let t = match data {
                FloatSlice::F32(d) => Tensor::from_slice(d, d.len(), device)?,
                FloatSlice::F16(d) => Tensor::from_slice(d, d.len(), device)?,
                FloatSlice::BF16(d) => Tensor::from_slice(d, d.len(), device)?,
            };
            let mut q = Self::quantize_cuda(&t, Some(&data), config, data.dtype())?;
            q.shape = shape;
            return Ok(q);
        }
        let (packed, absmax) = Self::quantize_host(data, config)?;
        let n = packed.len();
        Ok(Quant4Tensor {
            packed: Tensor::from_vec(packed, n, device)?,
            device_absmax: DeviceAbsmax::new(&absmax, device)?,
            absmax,
            quant_type: config.quant_type,
            block_size: config.block_size,
            shape,
            dtype: data.dtype(),
            absmax_cache: Default::default(),
        })
    }

    /// Quantize on the GPU holding `t`: the same bytes as the CPU path. Double quantization of
    /// the absmax (a few bytes per block) runs on the host.
    #[cfg(feature = "cuda")]
    fn quantize_cuda(
        t: &Tensor,
        host: Option<&FloatSlice<'_>>,
        config: &QuantConfig,
        dtype: FloatDType,
    ) -> Result<Self> {
        super::check_block_size(config.block_size)?;
        let b = super::codebook::Bucketizer::new(config.quant_type);
        let mut tables = [0f32; 31];
        tables[..15].copy_from_slice(&b.bounds);
        for (t, &o) in tables[15..].iter_mut().zip(&b.order) {
            *t = o as f32;
        }
        let flat = t.flatten_all()?;
        let (packed, absmax) = match launch::quantize_4bit(&flat, config.block_size, &tables)? {
            Ok(r) => r,
            Err(index) => {
                let index = index as usize;
                let value = match host {
                    Some(h) => {
                        let mut v = [0f32];
                        h.read_f32(index, &mut v);
                        v[0]
                    }
                    None => flat.get(index)?.to_dtype(DType::F32)?.to_scalar::<f32>()?,
                };
                return Err(QuantError::NonFinite { index, value });
            }
        };
        let absmax = if config.double_quant {
            Absmax::Nested(NestedAbsmax::compress(&absmax))
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Quant4Tensor {
            packed,
            device_absmax: DeviceAbsmax::new(&absmax, t.device())?,
            absmax,
            quant_type: config.quant_type,
            block_size: config.block_size,
            shape: t.shape().clone(),
            dtype,
            absmax_cache: Default::default(),
        })
    }

    fn quantize_host(data: FloatSlice<'_>, config: &QuantConfig) -> Result<(Vec<u8>, Absmax)> {
        let (packed, absmax) =
            blockwise::quantize_4bit(data, config.quant_type, config.block_size)?;
        let absmax = if config.double_quant {
            Absmax::Nested(NestedAbsmax::compress(&absmax))
        } else {
            Absmax::Plain(absmax)
        };
        Ok((packed, absmax))
    }

    /// Assemble from stored parts, checking that they agree with each other.
    pub fn from_parts(
        packed: Vec<u8>,
        absmax: Absmax,
        quant_type: QuantType,
        block_size: usize,
        shape: impl Into<Shape>,
        dtype: FloatDType,
        device: &Device,
    ) -> Result<Self> {
        super::check_block_size(block_size)?;
        let shape = shape.into();
        let n = shape.elem_count();
        if packed.len() != n.div_ceil(2) {
            return Err(QuantError::InvalidState(format!(
                "{} packed bytes for shape {:?} (expected {})",
                packed.len(),
                shape.dims(),
                n.div_ceil(2)
            )));
        }
        if absmax.len() != num_blocks(n, block_size) {
            return Err(QuantError::InvalidState(format!(
                "{} absmax values for shape {:?} in blocks of {block_size} (expected {})",
                absmax.len(),
                shape.dims(),
                num_blocks(n, block_size)
            )));
        }
        if let Absmax::Nested(nested) = &absmax {
            if nested.block_size == 0
                || nested.scales.len() != nested.codes.len().div_ceil(nested.block_size)
            {
                return Err(QuantError::InvalidState(format!(
                    "{} nested absmax values for {} absmax codes in blocks of {} (expected {})",
                    nested.scales.len(),
                    nested.codes.len(),
                    nested.block_size,
                    nested.codes.len().div_ceil(nested.block_size.max(1))
                )));
            }
        }
        let len = packed.len();
        Ok(Quant4Tensor {
            packed: Tensor::from_vec(packed, len, device)?,
            device_absmax: DeviceAbsmax::new(&absmax, device)?,
            absmax,
            quant_type,
            block_size,
            shape,
            dtype,
            absmax_cache: Default::default(),
        })
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The dtype the weight had before quantization (`quant_state.dtype`).
    pub fn dtype(&self) -> FloatDType {
        self.dtype
    }

    pub fn quant_type(&self) -> QuantType {
        self.quant_type
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }

    pub fn device(&self) -> &Device {
        self.packed.device()
    }

    /// The packed codes as a u8 tensor of `ceil(numel / 2)` bytes.
    pub fn packed(&self) -> &Tensor {
        &self.packed
    }

    pub fn packed_bytes(&self) -> Result<Vec<u8>> {
        Ok(self.packed.to_vec1::<u8>()?)
    }

    /// Bytes held: packed codes plus the stored absmax.
    pub fn storage_bytes(&self) -> usize {
        let absmax = match &self.absmax {
            Absmax::Plain(a) => a.len() * 4,
            Absmax::Nested(n) => n.codes.len() + n.scales.len() * 4 + 256 * 4,
        };
        self.packed.elem_count() + absmax
    }

    /// `x · Wᵀ` for a few rows of f32 x `[m, in]` on the CPU without making W dense (see
    /// `blockwise::matmul_rows_4bit`): y `[m, out]`. None where that path does not apply: a
    /// weight off the CPU, not 2-D, or whose blocks straddle its rows.
    pub fn matmul_rows_cpu(&self, x: &[f32], m: usize) -> Result<Option<Vec<f32>>> {
        let &[n, k] = self.shape.dims() else {
            return Ok(None);
        };
        if !self.packed.device().is_cpu() || k % self.block_size != 0 {
            return Ok(None);
        }
        let (storage, layout) = self.packed.storage_and_layout();
        let candle_core::Storage::Cpu(candle_core::CpuStorage::U8(bytes)) = &*storage else {
            return Ok(None);
        };
        let bytes = &bytes[layout.start_offset()..];
        let absmax = self.absmax_f32()?;
        let mut y = vec![0f32; m * n];
        blockwise::matmul_rows_4bit(
            bytes,
            &absmax,
            self.quant_type,
            self.block_size,
            x,
            (m, k, n),
            &mut y,
        )?;
        Ok(Some(y))
    }

    /// The blocks' absmax in f32, expanded once (double quantization) and kept.
    fn absmax_f32(&self) -> Result<Arc<Vec<f32>>> {
        if let Some(a) = self.absmax_cache.get() {
            return Ok(a.clone());
        }
        let a = Arc::new(self.absmax.to_f32()?);
        Ok(self.absmax_cache.get_or_init(|| a).clone())
    }

    /// Dequantize to a dense tensor of this weight's shape on its device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let out = FloatDType::from_candle(dtype)?;
        #[cfg(feature = "cuda")]
        if let Some(absmax) = &self.device_absmax {
            return Ok(launch::dequant_4bit(
                &self.packed,
                absmax,
                self.quant_type == QuantType::Fp4,
                self.block_size,
                &self.shape,
                dtype,
            )?);
        }
        let packed = self.packed_bytes()?;
        let absmax = self.absmax.to_f32()?;
        let n = self.shape.elem_count();
        let t = match out {
            FloatDType::F32 => self.dequantize_host::<f32>(&packed, &absmax, n)?,
            FloatDType::F16 => self.dequantize_host::<f16>(&packed, &absmax, n)?,
            FloatDType::BF16 => self.dequantize_host::<bf16>(&packed, &absmax, n)?,
        };
        Ok(t.to_device(self.device())?)
    }

    fn dequantize_host<T: OutFloat + candle_core::WithDType>(
        &self,
        packed: &[u8],
        absmax: &[f32],
        n: usize,
    ) -> Result<Tensor> {
        let mut out = vec![T::default(); n];
        blockwise::dequantize_4bit(packed, absmax, self.quant_type, self.block_size, &mut out)?;
        Ok(Tensor::from_vec(out, self.shape.clone(), &Device::Cpu)?)
    }
}

/// The 4-bit kernels' launches (`kernels/quant_4bit.cu`); `blockwise` holds their CPU twins.
#[cfg(feature = "cuda")]
mod launch {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{CudaStorage, WrapErr};
    use candle_core::{bail, DType, Result, Shape, Storage, Tensor};

    use super::DeviceAbsmax;
    use crate::ops::cuda::{alloc, func, grid, suffix, tensor, view, with_cuda};

    /// Dequantize `n` packed 4-bit values to `dtype`.
    pub(super) fn dequant_4bit(
        packed: &Tensor,
        absmax: &DeviceAbsmax,
        fp4: bool,
        block_size: usize,
        shape: &Shape,
        dtype: DType,
    ) -> Result<Tensor> {
        let n = shape.elem_count();
        if !block_size.is_power_of_two() || block_size < 8 {
            bail!("dequant_4bit: block size {block_size} is not a power of two of at least 8");
        }
        let name = match absmax {
            DeviceAbsmax::Plain(_) => format!("dequant_4bit_{}", suffix(dtype)?),
            DeviceAbsmax::Nested { .. } => format!("dequant_4bit_nested_{}", suffix(dtype)?),
        };
        let (a, codes, scales, code, offset, nested_shift) = match absmax {
            DeviceAbsmax::Plain(a) => (a, a, a, a, 0f32, 0i32),
            DeviceAbsmax::Nested {
                codes,
                scales,
                code,
                offset,
                block_size,
            } => {
                if !block_size.is_power_of_two() {
                    bail!("dequant_4bit: nested block size {block_size} is not a power of two");
                }
                let shift = block_size.trailing_zeros() as i32;
                (scales, codes, scales, code, *offset, shift)
            }
        };
        let (ps, pl) = packed.storage_and_layout();
        let (as_, al) = a.storage_and_layout();
        let (cs, cl) = codes.storage_and_layout();
        let (ss, sl) = scales.storage_and_layout();
        let (ks, kl) = code.storage_and_layout();
        let (
            Storage::Cuda(ps),
            Storage::Cuda(as_),
            Storage::Cuda(cs),
            Storage::Cuda(ss),
            Storage::Cuda(ks),
        ) = (&*ps, &*as_, &*cs, &*ss, &*ks)
        else {
            bail!("dequant_4bit: quant state is not on a CUDA device");
        };
        let dev = ps.device().clone();
        let packed_v = view::<u8>(ps, pl)?;
        if packed_v.len() != n.div_ceil(2) {
            bail!(
                "dequant_4bit: {} packed bytes for {n} values",
                packed_v.len()
            );
        }
        let absmax_v = view::<f32>(as_, al)?;
        // Plain absmax: the kernel never reads codes, scales or code; any pointer will do.
        let codes_v = match absmax {
            DeviceAbsmax::Plain(_) => view::<u8>(ps, pl)?,
            DeviceAbsmax::Nested { .. } => view::<u8>(cs, cl)?,
        };
        let scales_v = view::<f32>(ss, sl)?;
        let code_v = view::<f32>(ks, kl)?;
        let cfg = grid(n.div_ceil(16), 256); // two chunks of 8 values per thread
        let f = func!(dev, &name)?;
        let (fp4, shift, n64) = (fp4 as i32, block_size.trailing_zeros() as i32, n as i64);
        let out = float_dispatch!("qlorad kernels", dtype, T => {
            let out = alloc::<T>(&dev, n)?;
            let mut b = f.builder();
            b.arg(&packed_v)
                .arg(&absmax_v)
                .arg(&codes_v)
                .arg(&scales_v)
                .arg(&code_v)
                .arg(&offset)
                .arg(&nested_shift)
                .arg(&fp4)
                .arg(&shift)
                .arg(&n64)
                .arg(&out);
            // SAFETY: argument types and counts match the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok(tensor(out, shape.clone()))
    }

    /// Quantize a dense contiguous tensor to 4 bits: the packed codes stay on the device, the f32
    /// absmax per block comes back to the host. `tables`: 15 midpoints then the 16 codes by rank.
    /// Err(Some(index)) names the first non-finite element.
    pub(super) fn quantize_4bit(
        x: &Tensor,
        block_size: usize,
        tables: &[f32; 31],
    ) -> Result<std::result::Result<(Tensor, Vec<f32>), u64>> {
        let n = x.elem_count();
        let blocks = n.div_ceil(block_size);
        let dev = match x.device() {
            candle_core::Device::Cuda(d) => d.clone(),
            _ => bail!("quantize_4bit: tensor is not on a CUDA device"),
        };
        let tables = dev.clone_htod(tables.as_slice())?;
        let bad = dev.clone_htod(&[u64::MAX])?;
        let packed = alloc::<u8>(&dev, n.div_ceil(2))?;
        let absmax = alloc::<f32>(&dev, blocks)?;
        let f = func!(dev, &format!("quantize_4bit_{}", suffix(x.dtype())?))?;
        let cfg = grid(blocks * 32, 256);
        let (n64, bs) = (n as i64, block_size as i32);
        with_cuda(&x.contiguous()?, |s, l| {
            float_dispatch!("qlorad kernels", x.dtype(), T => {
                let xv = view::<T>(s, l)?;
                let mut b = f.builder();
                b.arg(&xv)
                    .arg(&n64)
                    .arg(&bs)
                    .arg(&tables)
                    .arg(&packed)
                    .arg(&absmax)
                    .arg(&bad);
                // SAFETY: argument types and counts match the kernel's signature.
                unsafe { b.launch(cfg) }.w()?;
            });
            Ok(())
        })?;
        let bad = dev.clone_dtoh(&bad)?[0];
        if bad != u64::MAX {
            return Ok(Err(bad));
        }
        let absmax = dev.clone_dtoh(&absmax)?;
        let packed = tensor(
            CudaStorage::wrap_cuda_slice(packed, dev.clone()),
            n.div_ceil(2),
        );
        Ok(Ok((packed, absmax)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_and_dequantize_a_candle_tensor() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 40), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let q = Quant4Tensor::quantize(&w, &QuantConfig::default()).unwrap();
        assert_eq!(q.shape().dims(), &[48, 40]);
        assert_eq!(q.packed().dims(), &[960]);
        assert_eq!(q.dtype(), FloatDType::BF16);
        let d = q.dequantize(DType::F32).unwrap();
        let err = (d - w.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap();
        let max = err.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(max < 0.7, "max error {max}");
        assert!(q.storage_bytes() < 48 * 40 * 2, "smaller than bf16");
    }

    #[test]
    fn inconsistent_parts_are_rejected() {
        let err = Quant4Tensor::from_parts(
            vec![0; 10],
            Absmax::Plain(vec![1.0]),
            QuantType::Nf4,
            64,
            (4, 6),
            FloatDType::F32,
            &Device::Cpu,
        )
        .unwrap_err();
        assert!(err.to_string().contains("packed bytes"), "{err}");
    }
}
