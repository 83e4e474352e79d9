//! Export against llama.cpp's own converter: GGUF metadata, tensor names, types, shapes and
//! bytes; the GGUF LoRA; merged safetensors. Fixtures: `scripts/gen_export_fixtures.py`
//! (convert_hf_to_gguf.py / convert_lora_to_gguf.py of llama-cpp-python 0.3.36's llama.cpp).

mod common;

use common::rel;

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use qlorad::export::{
    export_gguf, export_gguf_lora, export_safetensors, GgufType, MergeBase, MergeSource,
};
use qlorad::model::llama::{CausalLm, LoadOptions};

fn fx(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/export")
        .join(name)
}

fn read(path: &Path) -> (Content, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let c = Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
    (c, bytes)
}

fn raw(c: &Content, bytes: &[u8], name: &str) -> Vec<u8> {
    let info = &c.tensor_infos[name];
    let size = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
    let start = c.tensor_data_offset as usize + info.offset as usize;
    bytes[start..start + size].to_vec()
}

fn same_value(a: &GValue, b: &GValue) -> bool {
    match (a, b) {
        (GValue::Array(x), GValue::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_value(p, q))
        }
        (GValue::String(x), GValue::String(y)) => x == y,
        (GValue::F32(x), GValue::F32(y)) => x.to_bits() == y.to_bits(),
        _ => format!("{a:?}") == format!("{b:?}"),
    }
}

fn no_progress(_: usize, _: usize, _: &str) {}

#[test]
fn gguf_matches_llama_cpp_converter() {
    for arch in ["llama", "qwen2", "qwen3"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("m.gguf");
        let src = MergeSource::open(&fx(arch), None, MergeBase::Original).unwrap();
        export_gguf(&src, &out, GgufType::F32, &mut no_progress).unwrap();
        let (ours, ob) = read(&out);
        let (theirs, tb) = read(&fx(&format!("{arch}.f32.gguf")));
        for (k, v) in &theirs.metadata {
            if k == "general.name" || k == "general.size_label" {
                continue;
            }
            let mine = ours
                .metadata
                .get(k)
                .unwrap_or_else(|| panic!("{arch}: metadata {k} missing"));
            if arch.starts_with("qwen")
                && (k == "tokenizer.ggml.tokens" || k == "tokenizer.ggml.token_type")
            {
                // transformers' Qwen2Tokenizer adds `<|endoftext|>` to a vocabulary that lacks it
                // (real Qwen2 vocabularies have it), so the converter saw one token more (id 508).
                let (GValue::Array(a), GValue::Array(b)) = (mine, v) else {
                    panic!("{k} is an array")
                };
                assert!(
                    a[..508]
                        .iter()
                        .zip(&b[..508])
                        .all(|(x, y)| same_value(x, y)),
                    "{arch}: {k}"
                );
                continue;
            }
            assert!(
                same_value(mine, v),
                "{arch}: metadata {k}: {mine:?} vs {v:?}"
            );
        }
        assert_eq!(
            ours.tensor_infos.len(),
            theirs.tensor_infos.len(),
            "{arch}: tensor count"
        );
        for (name, info) in &theirs.tensor_infos {
            let mine = ours
                .tensor_infos
                .get(name)
                .unwrap_or_else(|| panic!("{arch}: tensor {name} missing"));
            assert_eq!(mine.shape.dims(), info.shape.dims(), "{arch}: {name}");
            assert_eq!(mine.ggml_dtype, info.ggml_dtype, "{arch}: {name}");
            let (a, b) = (raw(&ours, &ob, name), raw(&theirs, &tb, name));
            if name == "rope_freqs.weight" {
                let a: Vec<f32> = bytemuck::pod_collect_to_vec(&a);
                let b: Vec<f32> = bytemuck::pod_collect_to_vec(&b);
                for (x, y) in a.iter().zip(&b) {
                    assert!(
                        (x - y).abs() <= 1e-6 * y.abs(),
                        "{arch}: rope_freqs {x} vs {y}"
                    );
                }
            } else {
                assert!(a == b, "{arch}: {name}: bytes differ");
            }
        }
    }
}

#[test]
fn gguf_lora_matches_llama_cpp_converter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a.gguf");
    let src =
        MergeSource::open(&fx("llama"), Some(&fx("llama-lora")), MergeBase::Original).unwrap();
    export_gguf_lora(&src, &out).unwrap();
    let (ours, ob) = read(&out);
    let (theirs, tb) = read(&fx("llama-lora.f32.gguf"));
    for k in [
        "general.architecture",
        "general.type",
        "adapter.type",
        "adapter.lora.alpha",
    ] {
        assert!(same_value(&ours.metadata[k], &theirs.metadata[k]), "{k}");
    }
    assert_eq!(ours.tensor_infos.len(), theirs.tensor_infos.len());
    for (name, info) in &theirs.tensor_infos {
        let mine = &ours.tensor_infos[name];
        assert_eq!(mine.shape.dims(), info.shape.dims(), "{name}");
        let a: Vec<f32> = bytemuck::pod_collect_to_vec(&raw(&ours, &ob, name));
        let b: Vec<f32> = bytemuck::pod_collect_to_vec(&raw(&theirs, &tb, name));
        assert_eq!(a, b, "{name}");
    }
}

fn logits(dir: &Path, adapter: Option<&Path>) -> Tensor {
    logits_of(dir, adapter, &[0, 17, 99, 250, 3, 311, 42])
}

/// The logits of one row of `ids` on a dense load of `dir`, with `adapter` when given.
fn logits_of(dir: &Path, adapter: Option<&Path>, ids: &[u32]) -> Tensor {
    let mut m = CausalLm::load(
        dir,
        &LoadOptions {
            quant: None,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    if let Some(a) = adapter {
        m.load_adapter(a).unwrap();
    }
    let ids = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(&ids, None, None).unwrap()
}

#[test]
fn merged_safetensors_equal_base_plus_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let src =
        MergeSource::open(&fx("llama"), Some(&fx("llama-lora")), MergeBase::Original).unwrap();
    // a tiny shard limit forces several shards and an index
    export_safetensors(&src, &out, 100_000, &mut no_progress).unwrap();
    assert!(out.join("model.safetensors.index.json").exists());
    assert!(out.join("tokenizer.json").exists());
    let merged = logits(&out, None);
    let want = logits(&fx("llama"), Some(&fx("llama-lora")));
    let r = rel(&merged, &want);
    assert!(r <= 1e-5, "merged vs adapter logits: {r}");
    assert!(
        rel(&logits(&fx("llama"), None), &want) > 1e-3,
        "the adapter changes the model"
    );
}

#[test]
fn quantized_gguf_types_dequantize_close_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let src =
        MergeSource::open(&fx("llama"), Some(&fx("llama-lora")), MergeBase::Original).unwrap();
    let f32_path = tmp.path().join("f32.gguf");
    export_gguf(&src, &f32_path, GgufType::F32, &mut no_progress).unwrap();
    let (reference, rb) = read(&f32_path);
    for (ty, expect, tol) in [
        (GgufType::F16, GgmlDType::F16, 1e-3),
        (GgufType::Bf16, GgmlDType::BF16, 1e-2),
        (GgufType::Q8_0, GgmlDType::Q8_0, 1e-2),
        (GgufType::Q4_0, GgmlDType::Q4_0, 0.15),
        // rows of 64 cannot hold 256-element k-quant blocks: llama.cpp falls back to q5_0
        (GgufType::Q4KM, GgmlDType::Q5_0, 0.08),
    ] {
        let path = tmp.path().join(format!("{}.gguf", ty.as_str()));
        export_gguf(&src, &path, ty, &mut no_progress).unwrap();
        let mut f = File::open(&path).unwrap();
        let c = Content::read(&mut f).unwrap();
        let info = &c.tensor_infos["blk.1.ffn_up.weight"];
        assert_eq!(info.ggml_dtype, expect, "{ty:?}");
        assert_eq!(
            c.tensor_infos["blk.0.attn_norm.weight"].ggml_dtype,
            GgmlDType::F32
        );
        let q = c
            .tensor(&mut f, "blk.1.ffn_up.weight", &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let want: Vec<f32> =
            bytemuck::pod_collect_to_vec(&raw(&reference, &rb, "blk.1.ffn_up.weight"));
        let want = Tensor::from_vec(want, q.shape(), &Device::Cpu).unwrap();
        let r = rel(&q.to_dtype(DType::F32).unwrap(), &want);
        assert!(r <= tol, "{ty:?}: relative error {r}");
    }
}

#[test]
fn bad_exports_are_clear_errors_and_leave_no_file() {
    let tmp = tempfile::tempdir().unwrap();
    // an adapter trained on another model
    let other = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lm/qwen2-lora");
    let err = MergeSource::open(&fx("llama"), Some(&other), MergeBase::Original)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("do not fit") || err.contains("no such linear"),
        "{err}"
    );
    let err = "q3_k_xs".parse::<GgufType>().unwrap_err().to_string();
    assert!(err.contains("unknown GGUF type"), "{err}");
    // an unsupported architecture
    let d = tmp.path().join("gpt2");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(
        d.join("config.json"),
        r#"{"model_type": "gpt2", "hidden_size": 8}"#,
    )
    .unwrap();
    let err = MergeSource::open(&d, None, MergeBase::Original)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model_type"), "{err}");
    // a write that fails midway leaves nothing under the final name
    let src = MergeSource::open(&fx("llama"), None, MergeBase::Original).unwrap();
    let target = tmp.path().join("missing-dir").join("m.gguf");
    assert!(export_gguf(&src, &target, GgufType::F16, &mut no_progress).is_err());
    assert!(!target.exists());
    let out = tmp.path().join("cancelled.gguf");
    let mut calls = 0;
    // stop after a few tensors by failing in the progress path: simulated with a panic guard
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        export_gguf(&src, &out, GgufType::F16, &mut |_, _, _| {
            calls += 1;
            if calls == 3 {
                panic!("disk full");
            }
        })
    }));
    assert!(result.is_err());
    assert!(!out.exists(), "no half-written file under the final name");
    assert!(
        !out.with_extension("gguf.partial").exists(),
        "the partial file is removed"
    );
}

#[test]
fn a_bnb_4bit_base_exports_its_dequantized_weights() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let src = MergeSource::open(&models.join("llama-bnb-nf4"), None, MergeBase::Original).unwrap();
    let name = "model.layers.1.mlp.down_proj.weight";
    assert_eq!(src.shape(name).unwrap(), vec![64, 160]);
    assert_eq!(
        src.dtype(name).unwrap(),
        DType::BF16,
        "the dtype it was quantized from"
    );
    assert!(
        !src.names().unwrap().iter().any(|n| n.contains("absmax")),
        "auxiliary tensors are folded in"
    );
    let want =
        qlorad::model::WeightFiles::open_file(&models.join("llama-bnb-nf4.dequant.safetensors"))
            .unwrap();
    let want: Vec<half::bf16> = bytemuck::pod_collect_to_vec(want.tensor(name).unwrap().data());
    let got = src
        .tensor(name)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<half::bf16>()
        .unwrap();
    assert_eq!(got, want);
}

/// Phi-3's fused linears merge as one weight each, and the merged directory loads as Phi-3
/// again with the adapter's logits; GGUF export of Phi-3 is a clear error that writes nothing.
#[test]
fn phi3_merges_its_fused_linears() {
    let lm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lm");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let src = MergeSource::open(
        &lm.join("phi3"),
        Some(&lm.join("phi3-lora")),
        MergeBase::Original,
    )
    .unwrap();
    export_safetensors(&src, &out, 1 << 30, &mut no_progress).unwrap();
    // ids within the fixture's 128-token vocabulary
    let load =
        |dir: &Path, adapter: Option<&Path>| logits_of(dir, adapter, &[1, 17, 99, 120, 3, 31, 42]);
    let merged = load(&out, None);
    let want = load(&lm.join("phi3"), Some(&lm.join("phi3-lora")));
    let r = rel(&merged, &want);
    assert!(r <= 1e-5, "merged vs adapter logits: {r}");
    assert!(rel(&load(&lm.join("phi3"), None), &want) > 1e-3);
    let target = tmp.path().join("m.gguf");
    let err = export_gguf(&src, &target, GgufType::F16, &mut no_progress)
        .unwrap_err()
        .to_string();
    assert!(err.contains("GGUF export of phi3"), "{err}");
    assert!(!target.exists());
}
