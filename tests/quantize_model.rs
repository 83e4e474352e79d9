//! Whole model directories: bnb checkpoints made by transformers load in qlorad, and
//! `quantize_model_dir` writes what transformers + bitsandbytes write.
//! Fixtures: `scripts/gen_bnb_model_fixture.py` (transformers 5.24.0, bitsandbytes 0.50.2).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use qlorad::model::quantize::is_linear_weight;
use qlorad::model::{
    quantize_model_dir, ModelError, QuantizeOptions, SafetensorsWriter, WeightFiles,
};
use qlorad::quant::bnb::{from_bnb_tensors, parse_quant_state_key, QuantStateJson};
use qlorad::quant::{QuantConfig, QuantType};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn no_progress(_: qlorad::model::quantize::Progress<'_>) {}

/// Linears per decoder layer: Phi-3 fuses q, k, v and gate, up.
fn linears(arch: &str) -> usize {
    if arch == "phi3" {
        4
    } else {
        7
    }
}

#[test]
fn transformers_bnb_checkpoints_dequantize_to_bitsandbytes_values() {
    for arch in ["llama", "qwen2", "qwen3", "phi3"] {
        let dir = fixture(&format!("{arch}-bnb-nf4"));
        let weights = WeightFiles::open(&dir).unwrap();
        let expected =
            WeightFiles::open_file(&fixture(&format!("{arch}-bnb-nf4.dequant.safetensors")))
                .unwrap();
        let mut checked = 0;
        for key in weights.names() {
            let Some((name, qt)) = parse_quant_state_key(key) else {
                continue;
            };
            assert_eq!(qt, QuantType::Nf4);
            let w = from_bnb_tensors(name, |k| weights.get(k), &Device::Cpu).unwrap();
            let got = w
                .dequantize(DType::BF16)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap();
            let want: Vec<half::bf16> =
                bytemuck::pod_collect_to_vec(expected.tensor(name).unwrap().data());
            assert_eq!(got, want, "{arch}: {name}");
            checked += 1;
        }
        assert_eq!(
            checked,
            2 * linears(arch),
            "{arch}: every linear of 2 layers"
        );
    }
}

/// Every tensor of `ours` equals the same tensor of `theirs`; quant-state JSON compared parsed.
fn assert_same_checkpoint(ours: &Path, theirs: &Path) {
    let a = WeightFiles::open(ours).unwrap();
    let b = WeightFiles::open(theirs).unwrap();
    let names_a: Vec<&str> = a.names().collect();
    let names_b: Vec<&str> = b.names().collect();
    assert_eq!(names_a, names_b);
    for name in names_a {
        let (ta, tb) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
        assert_eq!(ta.dtype(), tb.dtype(), "{name}");
        assert_eq!(ta.shape(), tb.shape(), "{name}");
        if parse_quant_state_key(name).is_some() {
            let sa: QuantStateJson = serde_json::from_slice(ta.data()).unwrap();
            let sb: QuantStateJson = serde_json::from_slice(tb.data()).unwrap();
            assert_eq!(sa, sb, "{name}");
        }
        assert!(ta.data() == tb.data(), "{name}: bytes differ");
    }
    let ca = read_json(&ours.join("config.json"));
    let cb = read_json(&theirs.join("config.json"));
    assert_eq!(ca["quantization_config"], cb["quantization_config"]);
}

#[test]
fn quantize_writes_what_transformers_writes() {
    for arch in ["llama", "qwen2", "qwen3", "phi3"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("q");
        let report = quantize_model_dir(
            &fixture(arch),
            &out,
            &QuantizeOptions::default(),
            no_progress,
        )
        .unwrap();
        assert_eq!(report.quantized, 2 * linears(arch), "{arch}");
        assert_same_checkpoint(&out, &fixture(&format!("{arch}-bnb-nf4")));
        assert!(out.join("generation_config.json").exists());
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            1,
            "no staging left behind"
        );
    }
}

/// Split the fixture model into two shards with an index, as transformers does for big models.
fn sharded_copy(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let w = WeightFiles::open(src).unwrap();
    let names: Vec<String> = w.names().map(String::from).collect();
    let mut map = serde_json::Map::new();
    let (first, second) = names.split_at(names.len() / 2);
    for (i, part) in [first, second].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let mut writer = SafetensorsWriter::create(&dst.join(&file), &[("format", "pt")]).unwrap();
        for n in part.iter() {
            let t = w.tensor(n).unwrap();
            writer.add(n, t.dtype(), t.shape(), t.data()).unwrap();
            map.insert(n.clone(), Value::String(file.clone()));
        }
        writer.finish().unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dst.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn sharded_models_quantize_shard_by_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("sharded");
    sharded_copy(&fixture("llama"), &src);
    let out = tmp.path().join("q");
    quantize_model_dir(&src, &out, &QuantizeOptions::default(), no_progress).unwrap();
    assert!(out.join("model-00001-of-00002.safetensors").exists());
    assert!(out.join("model-00002-of-00002.safetensors").exists());
    let index = read_json(&out.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    assert!(map.contains_key("model.layers.0.self_attn.q_proj.weight.nested_absmax"));
    // Same tensors, same bytes as the single-file reference.
    let ours = WeightFiles::open(&out).unwrap();
    let theirs = WeightFiles::open(&fixture("llama-bnb-nf4")).unwrap();
    for name in theirs.names() {
        assert!(map[name].as_str().is_some(), "{name} indexed");
        if parse_quant_state_key(name).is_none() {
            assert!(
                ours.tensor(name).unwrap().data() == theirs.tensor(name).unwrap().data(),
                "{name}"
            );
        }
    }
    let total: u64 = index["metadata"]["total_size"].as_u64().unwrap();
    let sum: usize = ours
        .names()
        .map(|n| ours.tensor(n).unwrap().data().len())
        .sum();
    assert_eq!(total as usize, sum);
}

#[test]
fn fp4_and_other_block_sizes_roundtrip_through_the_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q");
    let options = QuantizeOptions {
        config: QuantConfig {
            quant_type: QuantType::Fp4,
            block_size: 128,
            double_quant: false,
        },
    };
    quantize_model_dir(&fixture("llama"), &out, &options, no_progress).unwrap();
    let q = WeightFiles::open(&out).unwrap();
    let orig = WeightFiles::open(&fixture("llama")).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    let w = from_bnb_tensors(name, |k| q.get(k), &Device::Cpu).unwrap();
    assert_eq!(w.quant_type(), QuantType::Fp4);
    assert_eq!(w.block_size(), 128);
    let deq = w
        .dequantize(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let x: Vec<half::bf16> = bytemuck::pod_collect_to_vec(orig.tensor(name).unwrap().data());
    let max = x.iter().map(|v| v.to_f32().abs()).fold(0f32, f32::max);
    for (a, b) in x.iter().zip(&deq) {
        assert!((a.to_f32() - b).abs() <= max * 0.17, "{a} vs {b}");
    }
    let cfg = read_json(&out.join("config.json"));
    assert_eq!(cfg["quantization_config"]["bnb_4bit_quant_type"], "fp4");
    assert_eq!(
        cfg["quantization_config"]["bnb_4bit_use_double_quant"],
        false
    );
}

/// Copy the llama fixture, replacing one tensor's bytes.
fn corrupted_copy(dst: &Path, tensor: &str, edit: impl Fn(&mut Vec<u8>, &mut Vec<usize>)) {
    std::fs::create_dir_all(dst).unwrap();
    let src = fixture("llama");
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let w = WeightFiles::open(&src).unwrap();
    let mut writer =
        SafetensorsWriter::create(&dst.join("model.safetensors"), &[("format", "pt")]).unwrap();
    for n in w.names() {
        let t = w.tensor(n).unwrap();
        let (mut data, mut shape) = (t.data().to_vec(), t.shape().to_vec());
        if n == tensor {
            edit(&mut data, &mut shape);
        }
        writer.add(n, t.dtype(), &shape, &data).unwrap();
    }
    writer.finish().unwrap();
}

fn quantize_err(src: &Path, options: &QuantizeOptions) -> (ModelError, PathBuf) {
    let out = src.with_file_name("out");
    let err = quantize_model_dir(src, &out, options, no_progress).unwrap_err();
    assert!(!out.exists(), "nothing written on error");
    (err, out)
}

#[test]
fn nan_in_a_weight_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("m");
    let name = "model.layers.1.self_attn.v_proj.weight";
    corrupted_copy(&src, name, |d, _| {
        d[10..12].copy_from_slice(&half::bf16::NAN.to_bits().to_le_bytes());
    });
    let (err, _) = quantize_err(&src, &QuantizeOptions::default());
    let msg = err.to_string();
    assert!(
        msg.contains(name) && msg.contains("element 5") && msg.contains("NaN"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "no partial output"
    );
}

#[test]
fn a_linear_that_is_not_2d_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("m");
    let name = "model.layers.0.mlp.gate_proj.weight";
    corrupted_copy(&src, name, |_, shape| {
        *shape = vec![shape[0], shape[1] / 2, 2]
    });
    let (err, _) = quantize_err(&src, &QuantizeOptions::default());
    let msg = err.to_string();
    assert!(msg.contains(name) && msg.contains("2-D"), "{msg}");
}

#[test]
fn unsupported_block_size_is_rejected_before_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let options = QuantizeOptions {
        config: QuantConfig {
            block_size: 96,
            ..QuantConfig::default()
        },
    };
    let err = quantize_model_dir(
        &fixture("llama"),
        &tmp.path().join("o"),
        &options,
        no_progress,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("unsupported block size 96"),
        "{err}"
    );
}

#[test]
fn a_missing_shard_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("sharded");
    sharded_copy(&fixture("llama"), &src);
    std::fs::remove_file(src.join("model-00002-of-00002.safetensors")).unwrap();
    let (err, _) = quantize_err(&src, &QuantizeOptions::default());
    let msg = err.to_string();
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains("missing"),
        "{msg}"
    );
}

#[test]
fn truncated_and_malformed_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("m");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(fixture("llama/config.json"), src.join("config.json")).unwrap();
    let bytes = std::fs::read(fixture("llama/model.safetensors")).unwrap();
    std::fs::write(src.join("model.safetensors"), &bytes[..bytes.len() - 1000]).unwrap();
    let (err, _) = quantize_err(&src, &QuantizeOptions::default());
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    std::fs::write(
        src.join("config.json"),
        "{\n  \"model_type\": \"llama\",\n  oops\n}",
    )
    .unwrap();
    let (err, _) = quantize_err(&src, &QuantizeOptions::default());
    let msg = err.to_string();
    assert!(
        msg.contains("config.json") && msg.contains("line 3"),
        "{msg}"
    );

    let (err, _) = quantize_err(&fixture("llama-bnb-nf4"), &QuantizeOptions::default());
    assert!(err.to_string().contains("already quantized"), "{err}");
}

#[test]
fn every_linear_of_the_fixture_is_recognised() {
    let w = WeightFiles::open(&fixture("llama")).unwrap();
    let linears: Vec<&str> = w.names().filter(|n| is_linear_weight(n)).collect();
    assert_eq!(linears.len(), 14);
}
