//! Write a qlorad adapter (random, non-zero B) and the logits it gives, for
//! `scripts/check_peft_load.py` to reload with PEFT and compare.
//!
//! cargo run --release --example lora_interop -- MODEL_DIR OUT_DIR

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use qlorad::lora::{LoraConfig, TargetModules};
use qlorad::model::llama::{CausalLm, LoadOptions};
use qlorad::rng::Rng;

fn main() -> anyhow::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [model_dir, out] = args.as_slice() else {
        anyhow::bail!("usage: lora_interop MODEL_DIR OUT_DIR");
    };
    let opts = LoadOptions {
        quant: None,
        dtype: DType::F32,
        ..LoadOptions::default()
    };
    let mut model = CausalLm::load(model_dir, &opts)?;
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: TargetModules::Names(vec![
            "q_proj".into(),
            "v_proj".into(),
            "down_proj".into(),
        ]),
        use_rslora: true,
    };
    model.add_lora(&cfg, 5)?;
    let mut rng = Rng::new(17);
    for (_, a) in model.adapters() {
        let dims = a.b.dims().to_vec();
        let vals: Vec<f32> = (0..dims.iter().product())
            .map(|_| rng.uniform(-0.1, 0.1))
            .collect();
        a.b.set(&Tensor::from_vec(vals, dims, &Device::Cpu)?)?;
    }
    model.save_adapter(&out.join("adapter"), &cfg, model_dir.to_str())?;
    let ids: Vec<u32> = (0..12)
        .map(|i| (i * 37 + 3) % model.config.vocab_size as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (1, 12), &Device::Cpu)?;
    let logits = model.forward(&ids, None, None)?;
    candle_core::safetensors::save(
        &[
            ("input_ids".to_string(), ids.to_dtype(DType::I64)?),
            ("logits".to_string(), logits),
        ]
        .into_iter()
        .collect(),
        out.join("logits.safetensors"),
    )?;
    println!("wrote {}", out.display());
    Ok(())
}
