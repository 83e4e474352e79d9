//! GGUF files as base models: configuration, weights and tokenizer equal to the Hugging Face
//! originals, llama.cpp's own tokenizer test cases, and training on a GGUF base through to a
//! merged GGUF and a GGUF LoRA.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use qlorad::cli::train::{train, TrainArgs};
use qlorad::data::TextTokenizer;
use qlorad::export::{export_all, export_gguf, GgufType, MergeBase, MergeSource, Outputs};
use qlorad::finetune::JobSpec;
use qlorad::model::config::ModelConfig;
use qlorad::model::llama::{CausalLm, LoadOptions};

use common::rel;

fn fx(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

fn no_progress(_: usize, _: usize, _: &str) {}

const SAMPLES: [&str; 8] = [
    "Hello world",
    " Hello  world!\n\nBye.",
    "It's 3.14159 - isn't it? 1234567",
    "Ünïcödé: café, Straße, 日本語 🦙",
    "def f(x):\n    return x**2\n",
    "<|im_start|>user\nHi<|im_end|>\n",
    "   leading and trailing   ",
    "tabs\tand 'll 're 've",
];

fn dense() -> LoadOptions {
    LoadOptions {
        quant: None,
        ..LoadOptions::default()
    }
}

fn logits(model: &Path, adapter: Option<&Path>, opts: &LoadOptions) -> Tensor {
    let mut m = CausalLm::load(model, opts).unwrap();
    if let Some(a) = adapter {
        m.load_adapter(a).unwrap();
    }
    let ids = Tensor::new(&[[1u32, 17, 99, 250, 3, 311, 42, 7]], &Device::Cpu).unwrap();
    m.forward(&ids, None, None).unwrap()
}

fn same_config(a: &ModelConfig, b: &ModelConfig) {
    assert_eq!(a.arch, b.arch);
    assert_eq!(
        (
            a.vocab_size,
            a.hidden_size,
            a.intermediate_size,
            a.num_hidden_layers
        ),
        (
            b.vocab_size,
            b.hidden_size,
            b.intermediate_size,
            b.num_hidden_layers
        )
    );
    assert_eq!(
        (a.num_attention_heads, a.num_key_value_heads, a.head_dim),
        (b.num_attention_heads, b.num_key_value_heads, b.head_dim)
    );
    assert_eq!(
        (
            a.tie_word_embeddings,
            a.qkv_bias,
            a.o_bias,
            a.mlp_bias,
            a.qk_norm
        ),
        (
            b.tie_word_embeddings,
            b.qkv_bias,
            b.o_bias,
            b.mlp_bias,
            b.qk_norm
        )
    );
    assert!((a.rms_norm_eps - b.rms_norm_eps).abs() <= 1e-9 * b.rms_norm_eps.max(1.0));
    assert!((a.rope_theta - b.rope_theta).abs() <= 1e-3);
    assert_eq!(a.rope_scaling.is_some(), b.rope_scaling.is_some());
    assert_eq!(a.rope_freqs(1), b.rope_freqs(1));
}

fn same_tokens(gguf: &Path, dir: &Path) {
    let ours = TextTokenizer::load(gguf).unwrap();
    let hf = TextTokenizer::load(dir).unwrap();
    for s in SAMPLES {
        assert_eq!(
            ours.encode(s).unwrap().0,
            hf.encode(s).unwrap().0,
            "{}: {s:?}",
            gguf.display()
        );
    }
    assert_eq!(ours.eos.as_ref().map(|e| e.1), hf.eos.as_ref().map(|e| e.1));
}

/// GGUF files written by llama.cpp's `convert_hf_to_gguf.py` load as their source directories.
#[test]
fn llama_cpp_converted_ggufs_load_like_their_hf_directories() {
    for arch in ["llama", "qwen2", "qwen3"] {
        let gguf = fx(&format!("export/{arch}.f32.gguf"));
        let dir = fx(&format!("export/{arch}"));
        same_config(
            &ModelConfig::load(&gguf).unwrap(),
            &ModelConfig::load(&dir).unwrap(),
        );
        let r = rel(
            &logits(&gguf, None, &dense()),
            &logits(&dir, None, &dense()),
        );
        assert!(r <= 1e-6, "{arch}: logits relative error {r}");
        // Quantized at load from the same f32 values: the same NF4 weights, the same logits.
        let nf4 = LoadOptions::default();
        let r = rel(&logits(&gguf, None, &nf4), &logits(&dir, None, &nf4));
        assert!(r <= 1e-6, "{arch}: nf4 logits relative error {r}");
        same_tokens(&gguf, &dir);
        let t = TextTokenizer::load(&gguf).unwrap();
        let msgs = [qlorad::data::Message {
            role: "user".into(),
            content: "Hi".into(),
        }];
        let (ours, theirs) = (
            t.template.as_ref().unwrap().render(&msgs, true).unwrap(),
            TextTokenizer::load(&dir)
                .unwrap()
                .template
                .unwrap()
                .render(&msgs, true)
                .unwrap(),
        );
        assert_eq!(ours, theirs, "{arch}: chat template");
    }
}

/// llama.cpp's `test-tokenizer-0` cases for a SentencePiece and a byte-level BPE vocabulary.
#[test]
fn llama_cpp_tokenizer_test_cases_pass() {
    for vocab in ["ggml-vocab-llama-spm.gguf", "ggml-vocab-starcoder.gguf"] {
        let path = fx(&format!("gguf/{vocab}"));
        let tok = TextTokenizer::load(&path).unwrap();
        let inp = std::fs::read_to_string(path.with_extension("gguf.inp")).unwrap();
        let out = std::fs::read_to_string(path.with_extension("gguf.out")).unwrap();
        let mut cases: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
        if cases.last() == Some(&"") {
            cases.pop();
        }
        let want: Vec<Vec<u32>> = out
            .lines()
            .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
            .collect();
        assert_eq!(cases.len(), want.len());
        assert!(cases.len() >= 40);
        for (s, w) in cases.iter().zip(&want) {
            assert_eq!(&tok.encode(s).unwrap().0, w, "{vocab}: {s:?}");
        }
        // Decoding gives the text back (SentencePiece drops the one leading space it adds).
        let (ids, _) = tok.encode("Hello world, it's 2024!").unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), "Hello world, it's 2024!");
    }
}

/// A tiny model exported to GGUF here, for each fixture tokenizer, with llama3 RoPE scaling.
fn tiny_gguf(tmp: &Path, tok: &str, ty: GgufType) -> (PathBuf, PathBuf) {
    let dir = tmp.join(tok);
    common::tiny_model(&dir, tok);
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["rope_scaling"] = serde_json::json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
    });
    cfg["rope_theta"] = serde_json::json!(500000.0);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let gguf = tmp.join(format!("{tok}-{}.gguf", ty.as_str()));
    let src = MergeSource::open(&dir, None, MergeBase::Original).unwrap();
    export_gguf(&src, &gguf, ty, &mut no_progress).unwrap();
    (dir, gguf)
}

#[test]
fn tiny_ggufs_made_here_import_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    for tok in ["tok-chatml", "tok-llama3", "tok-mistral"] {
        let (dir, gguf) = tiny_gguf(tmp.path(), tok, GgufType::F32);
        same_config(
            &ModelConfig::load(&gguf).unwrap(),
            &ModelConfig::load(&dir).unwrap(),
        );
        let r = rel(
            &logits(&gguf, None, &dense()),
            &logits(&dir, None, &dense()),
        );
        assert!(r <= 1e-6, "{tok}: logits relative error {r}");
        same_tokens(&gguf, &dir);
    }
    // A block-quantized GGUF dequantizes at load: close to the original, within Q8_0's error.
    let (dir, gguf) = tiny_gguf(tmp.path(), "tok-chatml", GgufType::Q8_0);
    let r = rel(
        &logits(&gguf, None, &dense()),
        &logits(&dir, None, &dense()),
    );
    assert!(r > 0.0 && r <= 2e-2, "q8_0 logits relative error {r}");
}

/// A GGUF base of each architecture trains; its merged GGUF and safetensors compute what
/// base plus adapter does.
#[test]
fn training_on_a_gguf_base_exports_merged_gguf_and_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, tiny) = tiny_gguf(tmp.path(), "tok-chatml", GgufType::Q8_0);
    train_and_export(tmp.path(), &tiny, "tok-chatml-q8_0");
    // llama.cpp's own Qwen3 conversion.
    train_and_export(tmp.path(), &fx("export/qwen3.f32.gguf"), "qwen3.f32");
}

fn train_and_export(tmp: &Path, gguf: &Path, stem: &str) {
    let gguf = gguf.to_path_buf();
    let data = tmp.join(format!("{stem}-train.jsonl"));
    let rows: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("What is {i} plus {i}?")},
                {"role": "assistant", "content": format!("{}", 2 * i)},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "hyperparameters": {"max_steps": 3, "batch_size": 4, "learning_rate": 0.01},
        "lora": {"r": 4, "alpha": 8},
    }))
    .unwrap();
    let out = tmp.join(format!("{stem}-run"));
    let args = TrainArgs {
        model: gguf.clone(),
        data,
        validation: None,
        out: out.clone(),
        resume: false,
        init_adapter: None,
    };
    train(&args, &spec).unwrap();
    let adapter = out.join("adapter");
    assert!(adapter.join("adapter_model.safetensors").is_file());
    let exports = out.join("export");
    // What a job's export step runs.
    let outputs = Outputs {
        gguf: vec![GgufType::F32],
        gguf_lora: true,
        safetensors: true,
        merge_base: MergeBase::Original,
    };
    export_all(&gguf, Some(&adapter), &exports, &outputs, &mut no_progress).unwrap();
    let merged_gguf = exports.join(format!("{stem}-f32.gguf"));
    let lora_gguf = exports.join(format!("{stem}-lora.gguf"));
    assert!(
        merged_gguf.is_file(),
        "merged GGUF in {}",
        exports.display()
    );
    assert!(lora_gguf.is_file());
    // The merged GGUF computes what the GGUF base plus the adapter computes (merged into the
    // weights as stored, dequantized), and it carries the base's tokenizer.
    let want = logits(&gguf, Some(&adapter), &dense());
    let r = rel(&logits(&merged_gguf, None, &dense()), &want);
    assert!(r <= 1e-5, "merged GGUF vs base + adapter: {r}");
    assert!(
        rel(&logits(&gguf, None, &dense()), &want) > 1e-4,
        "training changed the model"
    );
    same_tokens(&merged_gguf, &gguf);
    // The merged safetensors load with a tokenizer rebuilt from the GGUF.
    let merged_dir = exports.join("merged");
    let r = rel(&logits(&merged_dir, None, &dense()), &want);
    assert!(r <= 1e-3, "merged safetensors (f16) vs base + adapter: {r}");
    same_tokens(&gguf, &merged_dir);
}

#[test]
fn bad_gguf_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, gguf) = tiny_gguf(tmp.path(), "tok-chatml", GgufType::F32);
    let bytes = std::fs::read(&gguf).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = CausalLm::load(&cut, &dense()).err().unwrap().to_string();
    assert!(err.contains("cut.gguf") && err.contains("needs"), "{err}");
    let garbage = tmp.path().join("garbage.gguf");
    std::fs::write(&garbage, b"not a gguf at all").unwrap();
    let err = ModelConfig::load(&garbage).unwrap_err().to_string();
    assert!(
        err.contains("garbage.gguf") && err.contains("GGUF"),
        "{err}"
    );
    let missing = tmp.path().join("missing.gguf");
    let err = ModelConfig::load(&missing).unwrap_err().to_string();
    assert!(err.contains("missing.gguf"), "{err}");
    // A LoRA GGUF is not a base model.
    let lora = tmp.path().join("lora.gguf");
    let mut m = CausalLm::load(&gguf, &dense()).unwrap();
    let cfg = qlorad::lora::LoraConfig::default();
    m.add_lora(&cfg, 1).unwrap();
    let adapter = tmp.path().join("adapter");
    m.save_adapter(&adapter, &cfg, None).unwrap();
    let src = MergeSource::open(&gguf, Some(&adapter), MergeBase::Original).unwrap();
    qlorad::export::export_gguf_lora(&src, &lora).unwrap();
    let err = ModelConfig::load(&lora).unwrap_err().to_string();
    assert!(err.contains("adapter"), "{err}");
}
