//! The safetensors layout bitsandbytes and transformers use for 4-bit linears, both ways.
//!
//! A weight `W` (say `model.layers.0.mlp.up_proj.weight`) is stored as:
//! `W` (u8 `[ceil(n/2), 1]`), `W.absmax` (f32, or u8 when nested), `W.quant_map` (f32 `[16]`),
//! `W.nested_absmax` and `W.nested_quant_map` (f32, when nested), and
//! `W.quant_state.bitsandbytes__nf4` (or `__fp4`): UTF-8 JSON bytes with the non-tensor fields.

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::double::NestedAbsmax;
use super::tensor::{Absmax, Quant4Tensor};
use super::{FloatDType, QuantConfig, QuantError, QuantType, Result};

/// The suffix of the quant-state tensor for a quant type.
pub fn quant_state_suffix(quant_type: QuantType) -> &'static str {
    match quant_type {
        QuantType::Nf4 => ".quant_state.bitsandbytes__nf4",
        QuantType::Fp4 => ".quant_state.bitsandbytes__fp4",
    }
}

/// If `key` is a quant-state tensor, the weight it belongs to and its quant type.
pub fn parse_quant_state_key(key: &str) -> Option<(&str, QuantType)> {
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        if let Some(base) = key.strip_suffix(quant_state_suffix(qt)) {
            return Some((base, qt));
        }
    }
    None
}

/// Whether `key` is one of the auxiliary tensors of a 4-bit weight (not the packed weight itself).
pub fn is_aux_key(key: &str) -> bool {
    parse_quant_state_key(key).is_some()
        || [
            ".absmax",
            ".quant_map",
            ".nested_absmax",
            ".nested_quant_map",
        ]
        .iter()
        .any(|s| key.ends_with(s))
}

/// The JSON inside `*.quant_state.bitsandbytes__*`, fields in bitsandbytes' order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuantStateJson {
    pub quant_type: String,
    pub blocksize: usize,
    pub dtype: String,
    pub shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_blocksize: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_offset: Option<f64>,
}

/// One tensor to write: name, dtype, shape and little-endian bytes.
#[derive(Debug, Clone)]
pub struct BnbTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_tensor(name: String, v: &[f32]) -> BnbTensor {
    BnbTensor {
        name,
        dtype: Dtype::F32,
        shape: vec![v.len()],
        data: f32_bytes(v),
    }
}

/// The tensors bitsandbytes writes for the 4-bit weight `name`, in its order.
pub fn to_bnb_tensors(name: &str, w: &Quant4Tensor) -> Result<Vec<BnbTensor>> {
    let packed = w.packed_bytes()?;
    let mut state = QuantStateJson {
        quant_type: w.quant_type().as_str().to_string(),
        blocksize: w.block_size(),
        dtype: w.dtype().torch_name().to_string(),
        shape: w.shape().dims().to_vec(),
        nested_blocksize: None,
        nested_dtype: None,
        nested_offset: None,
    };
    let mut out = vec![BnbTensor {
        name: name.to_string(),
        dtype: Dtype::U8,
        shape: vec![packed.len(), 1],
        data: packed,
    }];
    match w.absmax() {
        Absmax::Plain(a) => {
            out.push(f32_tensor(format!("{name}.absmax"), a));
            out.push(f32_tensor(
                format!("{name}.quant_map"),
                w.quant_type().code(),
            ));
        }
        Absmax::Nested(n) => {
            out.push(BnbTensor {
                name: format!("{name}.absmax"),
                dtype: Dtype::U8,
                shape: vec![n.codes.len()],
                data: n.codes.clone(),
            });
            out.push(f32_tensor(
                format!("{name}.quant_map"),
                w.quant_type().code(),
            ));
            out.push(f32_tensor(format!("{name}.nested_absmax"), &n.scales));
            out.push(f32_tensor(format!("{name}.nested_quant_map"), &n.code[..]));
            state.nested_blocksize = Some(n.block_size);
            state.nested_dtype = Some("float32".to_string());
            state.nested_offset = Some(n.offset as f64);
        }
    }
    let json = python_json(&state);
    out.push(BnbTensor {
        name: format!("{name}{}", quant_state_suffix(w.quant_type())),
        dtype: Dtype::U8,
        shape: vec![json.len()],
        data: json,
    });
    Ok(out)
}

/// JSON as Python's `json.dumps` writes it (`", "` and `": "` separators, floats as `repr`), so
/// the quant-state bytes equal the ones bitsandbytes writes.
fn python_json(v: &impl Serialize) -> Vec<u8> {
    struct PyFormatter;
    impl serde_json::ser::Formatter for PyFormatter {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
        ) -> std::io::Result<()> {
            w.write_all(b": ")
        }
        fn write_f64<W: ?Sized + std::io::Write>(
            &mut self,
            w: &mut W,
            v: f64,
        ) -> std::io::Result<()> {
            w.write_all(python_repr(v).as_bytes())
        }
    }
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
    v.serialize(&mut ser).expect("quant state serializes");
    out
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form outside [1e-4, 1e16).
fn python_repr(v: f64) -> String {
    if v == 0.0 || (1e-4..1e16).contains(&v.abs()) {
        let s = half_even_last_digit(v, format!("{v:?}"));
        return if s.contains('.') || s.contains('e') {
            s
        } else {
            format!("{s}.0")
        };
    }
    let s = half_even_last_digit(v, format!("{v:e}")); // e.g. 1.5e-5
    let (mantissa, exp) = s.split_once('e').expect("exponent form");
    let exp: i32 = exp.parse().expect("integer exponent");
    format!(
        "{mantissa}e{}{:02}",
        if exp < 0 { '-' } else { '+' },
        exp.abs()
    )
}

/// Where v lies exactly halfway between two shortest digit strings (an f32 widened to f64 such
/// as 0.128238677978515625), Rust rounds the last digit up and Python to even: `s`, Rust's
/// shortest form of v, with Python's last digit.
fn half_even_last_digit(v: f64, s: String) -> String {
    let mantissa = s.split('e').next().unwrap_or(&s);
    let digits: String = mantissa
        .chars()
        .filter(char::is_ascii_digit)
        .skip_while(|&c| c == '0')
        .collect();
    let n = digits.len();
    if n == 0 {
        return s;
    }
    let exact = format!("{:.*e}", n + 40, v.abs());
    let exact: Vec<u8> = exact
        .split('e')
        .next()
        .unwrap_or("")
        .bytes()
        .filter(u8::is_ascii_digit)
        .collect();
    let tie = exact.get(n) == Some(&b'5') && exact[n + 1..].iter().all(|&d| d == b'0');
    if !tie {
        return s;
    }
    let last = exact[n - 1];
    let even = if (last - b'0').is_multiple_of(2) {
        last
    } else {
        last + 1
    };
    let at = mantissa
        .rfind(|c: char| c.is_ascii_digit())
        .expect("a digit");
    let mut out = s.into_bytes();
    out[at] = even;
    String::from_utf8(out).expect("ascii")
}

fn invalid(name: &str, msg: impl std::fmt::Display) -> QuantError {
    QuantError::InvalidState(format!("{name}: {msg}"))
}

fn read_f32s(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    if view.dtype() != Dtype::F32 {
        return Err(invalid(
            name,
            format_args!("expected F32, found {:?}", view.dtype()),
        ));
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The quant-state JSON of the 4-bit weight `name`, if it has one: shape and original dtype
/// without touching the packed data.
pub fn read_quant_state<'a>(
    name: &str,
    get: impl Fn(&str) -> Option<TensorView<'a>>,
) -> Result<Option<(QuantType, QuantStateJson)>> {
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let key = format!("{name}{}", quant_state_suffix(qt));
        if let Some(view) = get(&key) {
            let state: QuantStateJson = serde_json::from_slice(view.data())
                .map_err(|e| invalid(&key, format_args!("unreadable quant state JSON: {e}")))?;
            if state.quant_type != qt.as_str() {
                return Err(invalid(
                    &key,
                    format_args!("says quant_type {:?}", state.quant_type),
                ));
            }
            return Ok(Some((qt, state)));
        }
    }
    Ok(None)
}

/// Read the 4-bit weight `name` from a bitsandbytes checkpoint. `get` looks a tensor up by name
/// (across shards if need be). Every inconsistency is an error naming the tensor.
pub fn from_bnb_tensors<'a>(
    name: &str,
    get: impl Fn(&str) -> Option<TensorView<'a>>,
    device: &candle_core::Device,
) -> Result<Quant4Tensor> {
    let need = |suffix: &str| {
        let key = format!("{name}{suffix}");
        get(&key).ok_or_else(|| invalid(&key, "missing from the checkpoint"))
    };
    let (quant_type, state) = read_quant_state(name, &get)?
        .ok_or_else(|| invalid(name, "no quant_state.bitsandbytes__nf4 or __fp4 tensor"))?;
    let state_key = format!("{name}{}", quant_state_suffix(quant_type));
    let dtype = FloatDType::from_torch_name(&state.dtype).map_err(|e| invalid(&state_key, e))?;
    super::check_block_size(state.blocksize).map_err(|e| invalid(&state_key, e))?;

    // quant_storage may be any dtype; the bytes are the packed codes either way.
    let packed = get(name)
        .ok_or_else(|| invalid(name, "missing from the checkpoint"))?
        .data()
        .to_vec();
    let quant_map = read_f32s(&format!("{name}.quant_map"), &need(".quant_map")?)?;
    if quant_map.as_slice() != quant_type.code().as_slice() {
        return Err(invalid(
            &format!("{name}.quant_map"),
            format_args!("does not hold bitsandbytes' {quant_type} codebook"),
        ));
    }
    let absmax_view = need(".absmax")?;
    let absmax = if let Some(nested_blocksize) = state.nested_blocksize {
        let offset = state
            .nested_offset
            .ok_or_else(|| invalid(&state_key, "nested_blocksize without nested_offset"))?;
        if absmax_view.dtype() != Dtype::U8 {
            return Err(invalid(
                &format!("{name}.absmax"),
                "nested absmax must be U8",
            ));
        }
        let code = read_f32s(
            &format!("{name}.nested_quant_map"),
            &need(".nested_quant_map")?,
        )?;
        let code: [f32; 256] = code.try_into().map_err(|c: Vec<f32>| {
            invalid(
                &format!("{name}.nested_quant_map"),
                format_args!("{} values, expected 256", c.len()),
            )
        })?;
        Absmax::Nested(NestedAbsmax {
            codes: absmax_view.data().to_vec(),
            scales: read_f32s(&format!("{name}.nested_absmax"), &need(".nested_absmax")?)?,
            offset: offset as f32,
            block_size: nested_blocksize,
            code: Box::new(code),
        })
    } else {
        Absmax::Plain(read_f32s(&format!("{name}.absmax"), &absmax_view)?)
    };
    Quant4Tensor::from_parts(
        packed,
        absmax,
        quant_type,
        state.blocksize,
        state.shape,
        dtype,
        device,
    )
    .map_err(|e| invalid(name, e))
}

/// The `quantization_config` transformers writes into `config.json` for a bitsandbytes 4-bit model.
pub fn quantization_config(config: &QuantConfig, compute_dtype: FloatDType) -> serde_json::Value {
    serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype.torch_name(),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": config.quant_type.as_str(),
        "bnb_4bit_use_double_quant": config.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

/// Read the quantization settings back from a `quantization_config`, if it describes bnb 4-bit.
pub fn parse_quantization_config(v: &serde_json::Value) -> Option<(QuantType, bool)> {
    if v.get("quant_method")?.as_str()? != "bitsandbytes" || !v.get("load_in_4bit")?.as_bool()? {
        return None;
    }
    let qt = v
        .get("bnb_4bit_quant_type")
        .and_then(|q| q.as_str())
        .unwrap_or("fp4");
    let dq = v
        .get("bnb_4bit_use_double_quant")
        .and_then(|d| d.as_bool())
        .unwrap_or(false);
    Some((qt.parse().ok()?, dq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::FloatSlice;
    use candle_core::Device;
    use std::collections::HashMap;

    fn roundtrip(config: QuantConfig) {
        let x: Vec<f32> = (0..3 * 100)
            .map(|i| ((i * 7919) % 211) as f32 / 50.0 - 2.0)
            .collect();
        let w = Quant4Tensor::quantize_slice(FloatSlice::F32(&x), (3, 100), &config, &Device::Cpu)
            .unwrap();
        let tensors = to_bnb_tensors("m.w", &w).unwrap();
        let map: HashMap<_, _> = tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
                )
            })
            .collect();
        let back = from_bnb_tensors("m.w", |k| map.get(k).cloned(), &Device::Cpu).unwrap();
        assert_eq!(back.absmax(), w.absmax());
        assert_eq!(back.packed_bytes().unwrap(), w.packed_bytes().unwrap());
        assert_eq!(back.shape().dims(), &[3, 100]);
    }

    #[test]
    fn roundtrip_plain_and_nested() {
        roundtrip(QuantConfig {
            quant_type: QuantType::Nf4,
            block_size: 64,
            double_quant: true,
        });
        roundtrip(QuantConfig {
            quant_type: QuantType::Fp4,
            block_size: 128,
            double_quant: false,
        });
    }

    #[test]
    fn python_float_repr() {
        assert_eq!(python_repr(0.1289825439453125), "0.1289825439453125");
        assert_eq!(python_repr(1.0), "1.0");
        // halfway between two 17-digit strings: Python rounds to even, Rust up
        assert_eq!(python_repr(0.128_238_68_f32 as f64), "0.12823867797851562");
        assert_eq!(python_repr(0.12858887016773224), "0.12858887016773224");
        assert_eq!(python_repr(1.5e-5), "1.5e-05");
        assert_eq!(python_repr(2e20), "2e+20");
        assert_eq!(python_repr(0.0001), "0.0001");
    }

    #[test]
    fn quant_state_keys_parse() {
        assert_eq!(
            parse_quant_state_key("a.weight.quant_state.bitsandbytes__fp4"),
            Some(("a.weight", QuantType::Fp4))
        );
        assert!(is_aux_key("a.weight.nested_quant_map"));
        assert!(!is_aux_key("a.weight"));
    }

    #[test]
    fn truncated_state_is_a_clear_error() {
        let x = vec![0.25f32; 256];
        let w = Quant4Tensor::quantize_slice(
            FloatSlice::F32(&x),
            (2, 128),
            &QuantConfig::default(),
            &Device::Cpu,
        )
        .unwrap();
        let mut tensors = to_bnb_tensors("w", &w).unwrap();
        tensors[0].data.truncate(100);
        tensors[0].shape = vec![100, 1];
        let map: HashMap<_, _> = tensors
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap(),
                )
            })
            .collect();
        let err = from_bnb_tensors("w", |k| map.get(k).cloned(), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("w:") && err.contains("100 packed bytes"),
            "{err}"
        );
        let err = from_bnb_tensors(
            "w",
            |k| {
                if k.ends_with("nested_absmax") {
                    None
                } else {
                    map.get(k).cloned()
                }
            },
            &Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("w.nested_absmax: missing"), "{err}");
    }
}
