//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;

use candle_core::Tensor;
use qlorad::model::random::RandomLlama;

/// A random-weight 2-layer Llama (vocab 512, hidden 64, tied) with the fixture tokenizer `tok`
/// (a directory under tests/fixtures/data) copied beside it.
pub fn tiny_model(dir: &Path, tok: &str) {
    RandomLlama {
        vocab_size: 512,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        tie_word_embeddings: true,
        qk_norm: false,
        dtype: safetensors::Dtype::F32,
        seed: 4,
    }
    .write(dir)
    .unwrap();
    let tok = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(tok);
    for f in std::fs::read_dir(&tok).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
}

/// ‖a − b‖ / ‖b‖, in f32.
pub fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(candle_core::DType::F32).unwrap();
    let b = b.to_dtype(candle_core::DType::F32).unwrap();
    let d = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Every trainable tensor of `model` within `tol` (relative, `rel`) of the same-named tensor of
/// the PEFT adapter file `file` (f32).
pub fn assert_adapter_close(model: &qlorad::model::llama::CausalLm, file: &Path, tol: f32) {
    let fin = qlorad::model::WeightFiles::open_file(file).unwrap();
    for (name, var) in model.trainable() {
        let v = fin.tensor(&name).unwrap();
        let want = Tensor::from_vec(
            bytemuck::pod_collect_to_vec::<u8, f32>(v.data()),
            v.shape(),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let r = rel(var.as_tensor(), &want);
        assert!(r <= tol, "{name}: final adapter relative error {r}");
    }
}
