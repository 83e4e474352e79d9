//! The trainable graph against transformers and PEFT: logits, loss and every adapter gradient.
//! Fixtures: `scripts/gen_model_fixtures.py` (transformers 5.24.0, peft 0.21.2, torch 2.15.0).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qlorad::lora::{LoraConfig, TargetModules};
use qlorad::model::llama::{CausalLm, LoadOptions};
use qlorad::model::WeightFiles;
use qlorad::quant::QuantConfig;

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lm")
        .join(name)
}

struct Expected {
    w: WeightFiles,
}

impl Expected {
    fn load(name: &str) -> Self {
        Expected {
            w: WeightFiles::open_file(&dir(&format!("{name}.expected.safetensors"))).unwrap(),
        }
    }
    fn f32(&self, key: &str) -> Tensor {
        let v = self.w.tensor(key).unwrap();
        Tensor::from_vec(
            bytemuck::pod_collect_to_vec::<u8, f32>(v.data()),
            v.shape(),
            &Device::Cpu,
        )
        .unwrap()
    }
    fn i64(&self, key: &str) -> Tensor {
        let v = self.w.tensor(key).unwrap();
        Tensor::from_vec(
            bytemuck::pod_collect_to_vec::<u8, i64>(v.data()),
            v.shape(),
            &Device::Cpu,
        )
        .unwrap()
    }
    fn ids(&self) -> Tensor {
        self.i64("input_ids").to_dtype(DType::U32).unwrap()
    }
    fn has(&self, key: &str) -> bool {
        self.w.contains(key)
    }
}

/// ‖a − b‖ / ‖b‖.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let num = (&a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
    (num / den).unwrap().to_scalar::<f32>().unwrap()
}

fn dense() -> LoadOptions {
    LoadOptions {
        quant: None,
        ..LoadOptions::default()
    }
}

const MODELS: [&str; 6] = [
    "llama-gqa",
    "llama3-tied",
    "qwen2",
    "qwen3",
    "phi3",
    "phi3-longrope",
];

#[test]
fn f32_logits_and_loss_match_transformers() {
    for name in MODELS {
        let e = Expected::load(name);
        let m = CausalLm::load(&dir(name), &dense()).unwrap();
        let mask = e.i64("attention_mask");
        let logits = m.forward(&e.ids(), Some(&mask), None).unwrap();
        let r = rel(&logits, &e.f32("logits"));
        assert!(r <= 1e-5, "{name}: logits relative error {r}");
        let loss = m
            .loss(&logits, &e.i64("labels"))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = e.f32("loss").to_vec1::<f32>().unwrap()[0];
        assert!(
            (loss - want).abs() <= 1e-5 * want,
            "{name}: loss {loss} vs {want}"
        );
    }
}

#[test]
fn nf4_base_matches_transformers_on_the_same_dequantized_weights() {
    for name in MODELS {
        let e = Expected::load(name);
        let m = CausalLm::load(&dir(name), &LoadOptions::default()).unwrap();
        let logits = m
            .forward(&e.ids(), Some(&e.i64("attention_mask")), None)
            .unwrap();
        let r = rel(&logits, &e.f32("logits_nf4"));
        assert!(r <= 1e-5, "{name}: nf4 logits relative error {r}");
        // and the quantization visibly changed the model
        assert!(rel(&logits, &e.f32("logits")) > 1e-3);
    }
}

fn check_lora_grads(name: &str, checkpointing: bool, quant: Option<QuantConfig>) {
    let e = Expected::load(name);
    let opts = LoadOptions {
        quant,
        gradient_checkpointing: checkpointing,
        ..LoadOptions::default()
    };
    let mut m = CausalLm::load(&dir(name), &opts).unwrap();
    let cfg = m.load_adapter(&dir(&format!("{name}-lora"))).unwrap();
    assert_eq!((cfg.r, cfg.alpha), (4, 8.0));
    let logits = m
        .forward(&e.ids(), Some(&e.i64("attention_mask")), None)
        .unwrap();
    let loss = m.loss(&logits, &e.i64("labels")).unwrap();
    let grads = m.backward(&loss).unwrap();
    if quant.is_some() {
        return assert!(m
            .trainable()
            .iter()
            .all(|(_, v)| grads.get(v.as_tensor()).is_some()));
    }
    let r = rel(&logits, &e.f32("lora_logits"));
    assert!(r <= 1e-5, "{name}: lora logits relative error {r}");
    let want = e.f32("lora_loss").to_vec1::<f32>().unwrap()[0];
    let got = loss.to_scalar::<f32>().unwrap();
    assert!(
        (got - want).abs() <= 1e-5 * want,
        "{name}: lora loss {got} vs {want}"
    );
    let trainable = m.trainable();
    // Phi-3 fuses q, k, v into qkv_proj and gate, up into gate_up_proj.
    let linears = if name.starts_with("phi3") { 4 } else { 7 };
    assert_eq!(
        trainable.len(),
        2 * linears * 2,
        "{name}: A and B for {linears} linears in 2 layers"
    );
    // The training path computes the head only where labels count: same loss, same gradients.
    let fused = m
        .forward_loss(
            &e.ids(),
            Some(&e.i64("attention_mask")),
            &e.i64("labels"),
            None,
        )
        .unwrap();
    let got = fused.to_scalar::<f32>().unwrap();
    assert!(
        (got - want).abs() <= 1e-5 * want,
        "{name}: forward_loss {got} vs {want}"
    );
    let fused_grads = m.backward(&fused).unwrap();
    for (key, var) in &trainable {
        let g = fused_grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: forward_loss gave no gradient for {key}"));
        let r = rel(g, &e.f32(&format!("grad.{key}")));
        assert!(
            r <= 1e-4,
            "{name}: forward_loss {key} gradient relative error {r}"
        );
    }
    for (key, var) in trainable {
        let want_key = format!("grad.{key}");
        assert!(e.has(&want_key), "{want_key} in fixture");
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{name}: zero gradient for {key}");
        let r = rel(g, &e.f32(&want_key));
        assert!(
            r <= 1e-4,
            "{name} (checkpointing {checkpointing}): {key} gradient relative error {r}"
        );
    }
}

#[test]
fn lora_logits_and_every_adapter_gradient_match_peft() {
    check_lora_grads("llama-gqa", false, None);
    check_lora_grads("qwen2", false, None);
    check_lora_grads("qwen3", false, None);
    check_lora_grads("phi3", false, None);
    check_lora_grads("phi3-longrope", false, None);
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    check_lora_grads("llama-gqa", true, None);
    check_lora_grads("qwen2", true, None);
    check_lora_grads("qwen3", true, None);
    check_lora_grads("llama-gqa", true, Some(QuantConfig::default()));
    check_lora_grads("qwen3", true, Some(QuantConfig::default()));
    check_lora_grads("phi3", true, None);
    check_lora_grads("phi3", true, Some(QuantConfig::default()));
}

/// Phi-3's sliding window changes nothing for sequences up to its width (the fixture's 32,
/// its batch 8 tokens long); longer ones are refused by the field rather than computed
/// differently from transformers.
#[test]
fn sequences_beyond_a_sliding_window_are_refused() {
    let m = CausalLm::load(&dir("phi3"), &dense()).unwrap();
    assert_eq!(m.config.sliding_window, Some(32));
    let ids = Tensor::from_vec((0..33u32).collect(), (1, 33), &Device::Cpu).unwrap();
    let msg = m.forward(&ids, None, None).unwrap_err().to_string();
    assert!(
        msg.contains("sliding_window") && msg.contains("33 tokens"),
        "{msg}"
    );
    let ids = ids.narrow(1, 0, 32).unwrap();
    assert!(m.forward(&ids, None, None).is_ok());
}

#[test]
fn adapters_saved_by_qlorad_load_back_identically() {
    let e = Expected::load("llama-gqa");
    let mut m = CausalLm::load(&dir("llama-gqa"), &dense()).unwrap();
    let cfg = m.load_adapter(&dir("llama-gqa-lora")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    m.save_adapter(tmp.path(), &cfg, Some("llama-gqa")).unwrap();
    let names = WeightFiles::open_file(&tmp.path().join("adapter_model.safetensors")).unwrap();
    assert!(names.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    let mut m2 = CausalLm::load(&dir("llama-gqa"), &dense()).unwrap();
    let cfg2 = m2.load_adapter(tmp.path()).unwrap();
    assert_eq!(
        (cfg2.r, cfg2.alpha, cfg2.use_rslora),
        (cfg.r, cfg.alpha, cfg.use_rslora)
    );
    let ids = e.ids();
    let a = m.forward(&ids, None, None).unwrap();
    let b = m2.forward(&ids, None, None).unwrap();
    assert_eq!(rel(&a, &b), 0.0);
}

#[test]
fn fresh_adapters_start_at_the_base_and_layer_zero_gets_gradients() {
    let e = Expected::load("qwen2");
    let mut m = CausalLm::load(&dir("qwen2"), &LoadOptions::default()).unwrap();
    let base = m.forward(&e.ids(), None, None).unwrap();
    let cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        target_modules: TargetModules::all_linear(),
        use_rslora: false,
    };
    m.add_lora(&cfg, 1).unwrap();
    let logits = m.forward(&e.ids(), None, None).unwrap();
    assert_eq!(
        rel(&logits, &base.to_dtype(DType::F32).unwrap()),
        0.0,
        "B = 0 leaves the model unchanged"
    );
    let loss = m.loss(&logits, &e.i64("labels")).unwrap();
    let grads = m.backward(&loss).unwrap();
    for (key, var) in m.trainable() {
        if key.contains("lora_B") {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {key}"));
            let n = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "zero gradient for {key}");
        }
    }
}

#[test]
fn bf16_compute_tracks_f32() {
    for name in MODELS {
        let e = Expected::load(name);
        let opts = LoadOptions {
            quant: None,
            dtype: DType::BF16,
            ..LoadOptions::default()
        };
        let m = CausalLm::load(&dir(name), &opts).unwrap();
        let logits = m
            .forward(&e.ids(), Some(&e.i64("attention_mask")), None)
            .unwrap();
        assert_eq!(logits.dtype(), DType::BF16);
        let r = rel(&logits, &e.f32("logits"));
        assert!(r <= 2e-2, "{name}: bf16 logits relative error {r}");
    }
}

fn copy_model(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match CausalLm::load(dir, &dense()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_models_give_errors_naming_the_field_or_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_model(&dir("llama-gqa"), &d);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = config.clone();
        f(&mut c);
        std::fs::write(d.join("config.json"), c.to_string()).unwrap();
    };

    edit(&|c| c["model_type"] = "gpt2".into());
    let msg = load_err(&d);
    assert!(msg.contains("model_type") && msg.contains("gpt2"), "{msg}");

    edit(&|c| c["num_key_value_heads"] = 3.into());
    let msg = load_err(&d);
    assert!(msg.contains("num_key_value_heads"), "{msg}");

    edit(&|c| c["hidden_size"] = "big".into());
    let msg = load_err(&d);
    assert!(msg.contains("hidden_size"), "{msg}");

    edit(&|c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "rope_theta": 10000.0})
    });
    let msg = load_err(&d);
    assert!(
        msg.contains("rope_parameters") && msg.contains("yarn"),
        "{msg}"
    );

    edit(&|c| c["intermediate_size"] = 100.into());
    let msg = load_err(&d);
    assert!(
        msg.contains("model.layers.0.mlp.gate_proj.weight") && msg.contains("expected [100, 64]"),
        "{msg}"
    );

    edit(&|c| c["tie_word_embeddings"] = false.into());
    let mut m = CausalLm::load(&d, &dense()).unwrap();
    let bad = tmp.path().join("adapter");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("adapter_config.json"),
        "{\"peft_type\": \"LORA\", \"r\": 4}",
    )
    .unwrap();
    let msg = m.load_adapter(&bad).unwrap_err().to_string();
    assert!(msg.contains("lora_alpha"), "{msg}");

    // the tied model has no lm_head; pretending it is untied names the missing tensor
    let t = tmp.path().join("t");
    copy_model(&dir("llama3-tied"), &t);
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.join("config.json")).unwrap()).unwrap();
    c["tie_word_embeddings"] = false.into();
    std::fs::write(t.join("config.json"), c.to_string()).unwrap();
    let msg = load_err(&t);
    assert!(
        msg.contains("lm_head.weight") && msg.contains("missing"),
        "{msg}"
    );
}

#[test]
fn bnb_4bit_checkpoints_load_and_equal_quantizing_at_load() {
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    for arch in ["llama", "qwen2", "qwen3", "phi3"] {
        let pre = CausalLm::load(&models.join(format!("{arch}-bnb-nf4")), &dense()).unwrap();
        let at_load = CausalLm::load(&models.join(arch), &LoadOptions::default()).unwrap();
        let ids = Tensor::new(&[[1u32, 5, 9, 14, 200, 3]], &Device::Cpu).unwrap();
        let a = pre.forward(&ids, None, None).unwrap();
        let b = at_load.forward(&ids, None, None).unwrap();
        assert_eq!(rel(&a, &b), 0.0, "{arch}: the same NF4 weights either way");
    }
}

#[test]
fn sliding_window_configs_are_refused_by_field() {
    for (field, value) in [
        ("use_sliding_window", serde_json::json!(true)),
        (
            "layer_types",
            serde_json::json!(["full_attention", "sliding_attention"]),
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("m");
        copy_model(&dir("qwen3"), &d);
        let mut c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
        c[field] = value;
        std::fs::write(d.join("config.json"), c.to_string()).unwrap();
        let msg = load_err(&d);
        assert!(msg.contains(field) && msg.contains("config.json"), "{msg}");
    }
}

#[test]
fn mistral_configs_load_as_llama_without_biases() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_model(&dir("llama-gqa"), &d);
    let mut c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
    c["model_type"] = "mistral".into();
    std::fs::write(d.join("config.json"), c.to_string()).unwrap();
    let e = Expected::load("llama-gqa");
    let m = CausalLm::load(&d, &dense()).unwrap();
    let logits = m
        .forward(&e.ids(), Some(&e.i64("attention_mask")), None)
        .unwrap();
    assert!(rel(&logits, &e.f32("logits")) <= 1e-5);
}
