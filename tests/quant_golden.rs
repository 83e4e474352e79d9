//! NF4/FP4 against bitsandbytes, bit for bit, and its 8-bit AdamW. Fixtures:
//! `scripts/gen_quant_fixtures.py` and `scripts/gen_optim_fixture.py` (bitsandbytes 0.50.2,
//! torch 2.15.0, CPU); see each file's `__metadata__`.

use half::{bf16, f16};
use qlorad::quant::codebook::{dynamic_signed, FP4, NF4};
use qlorad::quant::double::{quantize_8bit, torch_mean_f32, NestedAbsmax, NESTED_BLOCK_SIZE};
use qlorad::quant::{dequantize_4bit, quantize_4bit, FloatSlice, QuantType};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/quant/codec.safetensors"
);

#[derive(Deserialize, Debug)]
struct Case {
    name: String,
    dtype: String,
    quant_type: String,
    blocksize: usize,
    double_quant: bool,
    shape: Vec<usize>,
}

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn load() -> Self {
        Fixture {
            bytes: std::fs::read(FIXTURE).expect("fixture present"),
        }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }
    fn cases(&self) -> Vec<Case> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).unwrap();
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["cases"]).unwrap()
    }
}

fn raw(st: &SafeTensors<'_>, name: &str) -> Vec<u8> {
    st.tensor(name)
        .unwrap_or_else(|_| panic!("{name} in fixture"))
        .data()
        .to_vec()
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    bytemuck::pod_collect_to_vec(t.data())
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn codebooks_match_bitsandbytes() {
    let fx = Fixture::load();
    let st = fx.st();
    assert_eq!(bits(&f32s(&st, "code.nf4")), bits(&NF4));
    assert_eq!(bits(&f32s(&st, "code.fp4")), bits(&FP4));
    assert_eq!(
        bits(&f32s(&st, "code.dynamic_signed")),
        bits(&dynamic_signed())
    );
}

/// Quantize the fixture input; returns (packed, f32 absmax before nesting).
fn quantize_case(st: &SafeTensors<'_>, case: &Case, qt: QuantType) -> (Vec<u8>, Vec<f32>) {
    let input = raw(st, &format!("{}.input", case.name));
    let result = match case.dtype.as_str() {
        "float32" => quantize_4bit(
            FloatSlice::F32(&bytemuck::pod_collect_to_vec(&input)),
            qt,
            case.blocksize,
        ),
        "bfloat16" => quantize_4bit(
            FloatSlice::BF16(&bytemuck::pod_collect_to_vec::<u8, bf16>(&input)),
            qt,
            case.blocksize,
        ),
        "float16" => quantize_4bit(
            FloatSlice::F16(&bytemuck::pod_collect_to_vec::<u8, f16>(&input)),
            qt,
            case.blocksize,
        ),
        other => panic!("dtype {other}"),
    };
    result.unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

#[test]
fn quantization_matches_bitsandbytes_bit_for_bit() {
    let fx = Fixture::load();
    let st = fx.st();
    let cases = fx.cases();
    assert!(cases.len() >= 100, "fixture has {} cases", cases.len());
    for case in &cases {
        let qt: QuantType = case.quant_type.parse().unwrap();
        let p = &case.name;
        let (packed, absmax) = quantize_case(&st, case, qt);
        assert_eq!(
            packed,
            raw(&st, &format!("{p}.packed")),
            "{p}: packed bytes"
        );
        if case.double_quant {
            let nested = NestedAbsmax::compress(&absmax);
            let want_offset = f32s(&st, &format!("{p}.offset"))[0];
            assert_eq!(
                nested.offset.to_bits(),
                want_offset.to_bits(),
                "{p}: offset"
            );
            assert_eq!(
                nested.codes,
                raw(&st, &format!("{p}.absmax")),
                "{p}: nested codes"
            );
            assert_eq!(
                bits(&nested.scales),
                bits(&f32s(&st, &format!("{p}.nested_absmax"))),
                "{p}: nested absmax"
            );
        } else {
            assert_eq!(
                bits(&absmax),
                bits(&f32s(&st, &format!("{p}.absmax"))),
                "{p}: absmax"
            );
        }
    }
}

/// bitsandbytes' absmax for a case, expanded from the nested form when double-quantized.
fn reference_absmax(st: &SafeTensors<'_>, case: &Case) -> Vec<f32> {
    let p = &case.name;
    if !case.double_quant {
        return f32s(st, &format!("{p}.absmax"));
    }
    let nested = NestedAbsmax {
        codes: raw(st, &format!("{p}.absmax")),
        scales: f32s(st, &format!("{p}.nested_absmax")),
        offset: f32s(st, &format!("{p}.offset"))[0],
        block_size: NESTED_BLOCK_SIZE,
        code: Box::new(dynamic_signed()),
    };
    nested.expand().unwrap()
}

/// Bits of a dequantized value; bitsandbytes gives FP4's code 8 as -0 in its C++ and CUDA
/// kernels but +0 in the torch fallback it takes for odd widths, so zero's sign is not compared.
fn dq_bits<T: Copy + Into<f32>>(v: &[T], raw_bits: impl Fn(T) -> u32) -> Vec<u32> {
    v.iter()
        .map(|&x| if x.into() == 0.0 { 0 } else { raw_bits(x) })
        .collect()
}

#[test]
fn dequantization_matches_bitsandbytes_bit_for_bit() {
    let fx = Fixture::load();
    let st = fx.st();
    for case in fx.cases() {
        let qt: QuantType = case.quant_type.parse().unwrap();
        let p = &case.name;
        let n: usize = case.shape.iter().product();
        let packed = raw(&st, &format!("{p}.packed"));
        let absmax = reference_absmax(&st, &case);

        let mut out32 = vec![0f32; n];
        dequantize_4bit(&packed, &absmax, qt, case.blocksize, &mut out32).unwrap();
        let f32_key = if case.dtype == "float32" {
            "dq_native"
        } else {
            "dq_f32"
        };
        let want: Vec<f32> = f32s(&st, &format!("{p}.{f32_key}"));
        assert_eq!(
            dq_bits(&out32, f32::to_bits),
            dq_bits(&want, f32::to_bits),
            "{p}: f32"
        );

        let want_native = raw(&st, &format!("{p}.dq_native"));
        match case.dtype.as_str() {
            "bfloat16" => {
                let mut out = vec![bf16::ZERO; n];
                dequantize_4bit(&packed, &absmax, qt, case.blocksize, &mut out).unwrap();
                let want: Vec<bf16> = bytemuck::pod_collect_to_vec(&want_native);
                assert_eq!(
                    dq_bits(&out, |x| x.to_bits() as u32),
                    dq_bits(&want, |x| x.to_bits() as u32),
                    "{p}"
                );
            }
            "float16" => {
                let mut out = vec![f16::ZERO; n];
                dequantize_4bit(&packed, &absmax, qt, case.blocksize, &mut out).unwrap();
                let want: Vec<f16> = bytemuck::pod_collect_to_vec(&want_native);
                assert_eq!(
                    dq_bits(&out, |x| x.to_bits() as u32),
                    dq_bits(&want, |x| x.to_bits() as u32),
                    "{p}"
                );
            }
            _ => {}
        }
    }
}

#[test]
fn nested_quantization_matches_given_the_same_offset() {
    // Independent of how the mean is summed: the 8-bit codes of (absmax - offset).
    let fx = Fixture::load();
    let st = fx.st();
    for case in fx.cases().iter().filter(|c| c.double_quant) {
        let p = &case.name;
        let (_, absmax) = quantize_case(&st, case, case.quant_type.parse().unwrap());
        let offset = f32s(&st, &format!("{p}.offset"))[0];
        let centered: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let (codes, scales) = quantize_8bit(&centered, &dynamic_signed(), NESTED_BLOCK_SIZE);
        assert_eq!(codes, raw(&st, &format!("{p}.absmax")), "{p}");
        assert_eq!(
            bits(&scales),
            bits(&f32s(&st, &format!("{p}.nested_absmax"))),
            "{p}"
        );
        assert_eq!(
            torch_mean_f32(&absmax).to_bits(),
            offset.to_bits(),
            "{p}: torch mean"
        );
    }
}

/// `adamw_bnb_8bit` against `bnb.optim.AdamW8bit` on the CPU, four steps of seeded gradients
/// (`scripts/gen_optim_fixture.py`): every step's parameters, then the 8-bit codes and absmax of
/// both moments (two parameters over `min_8bit_size`, one with a partial block) and the f32
/// moments of the small one. torch's vector sqrt is not correctly rounded on every CPU (on the
/// machine that made the fixture, 0.6% of results are an ulp off), so a few parameters differ
/// by an ulp and a code on a bin's edge could land one away; here every code and absmax agree.
#[test]
fn adamw_8bit_steps_as_bitsandbytes() {
    use candle_core::{Device, Tensor, Var};
    use qlorad::quant::codebook::dynamic_unsigned;
    use qlorad::train::adamw8bit::{AdamW8bit, State8};
    use qlorad::train::optim::AdamWConfig;

    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/optim/adamw_8bit.safetensors"
    ))
    .unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    // The map bitsandbytes made is the one qlorad carries.
    assert_eq!(bits(&f32s(&st, "udynamic")), bits(&dynamic_unsigned()));
    let names = ["wide", "ragged", "small"];
    let vars: Vec<Var> = names
        .iter()
        .map(|n| {
            let p = f32s(&st, &format!("p0.{n}"));
            Var::from_tensor(&Tensor::new(p.as_slice(), &Device::Cpu).unwrap()).unwrap()
        })
        .collect();
    let sizes: Vec<usize> = vars.iter().map(|v| v.elem_count()).collect();
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut opt = AdamW8bit::new(cfg, &sizes);
    let rel = |a: &[f32], b: &[f32]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    };
    for step in 1..=4 {
        let grads: Vec<Vec<f32>> = names
            .iter()
            .map(|n| f32s(&st, &format!("grad{step}.{n}")))
            .collect();
        opt.step(&vars, &grads, 1e-3).unwrap();
        for (n, v) in names.iter().zip(&vars) {
            let got = v.as_tensor().to_vec1::<f32>().unwrap();
            let want = f32s(&st, &format!("p{step}.{n}"));
            let r = rel(&got, &want);
            assert!(r < 1e-8, "step {step} {n}: parameters differ by {r:e}");
        }
    }
    for (n, state) in names.iter().zip(opt.states()) {
        match state {
            State8::Blockwise {
                m,
                v,
                absmax_m,
                absmax_v,
            } => {
                for (kind, codes, absmax, want_absmax) in [
                    ("state1", m, absmax_m, "absmax1"),
                    ("state2", v, absmax_v, "absmax2"),
                ] {
                    let want = raw(&st, &format!("{kind}.{n}"));
                    let same = codes.iter().zip(&want).filter(|(a, b)| a == b).count();
                    let far = codes
                        .iter()
                        .zip(&want)
                        .filter(|(a, b)| (**a as i32 - **b as i32).abs() > 1)
                        .count();
                    assert!(
                        same as f64 >= 0.999 * want.len() as f64 && far == 0,
                        "{kind}.{n}: {same} of {} codes equal, {far} more than one apart",
                        want.len()
                    );
                    let r = rel(absmax, &f32s(&st, &format!("{want_absmax}.{n}")));
                    assert!(r < 1e-7, "{want_absmax}.{n}: {r:e}");
                }
            }
            State8::Full(mo) => {
                assert_eq!(*n, "small");
                assert!(rel(&mo.exp_avg, &f32s(&st, "state1.small")) < 1e-6);
                assert!(rel(&mo.exp_avg_sq, &f32s(&st, "state2.small")) < 1e-6);
            }
        }
    }
}
