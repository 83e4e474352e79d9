//! Write a random-weight Llama of a real model's shape (bf16), with a small tokenizer, for
//! export and training benchmarks where the values do not matter.
//!
//! cargo run --release --example random_model -- OUT_DIR [llama-3.2-1b|llama-3-8b|tiny]

use std::path::PathBuf;

use qlorad::model::random::RandomLlama;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: random_model OUT_DIR [shape]"))?,
    );
    let shape = args.next().unwrap_or_else(|| "llama-3.2-1b".into());
    let (vocab, hidden, inter, layers, heads, kv, tied) = match shape.as_str() {
        "llama-3.2-1b" => (128_256, 2048, 8192, 16, 32, 8, true),
        "llama-3-8b" => (128_256, 4096, 14_336, 32, 32, 8, false),
        "tiny" => (512, 256, 512, 2, 4, 2, false),
        other => anyhow::bail!("unknown shape {other} (llama-3.2-1b, llama-3-8b, tiny)"),
    };
    RandomLlama {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        tie_word_embeddings: tied,
        qk_norm: false,
        dtype: safetensors::Dtype::BF16,
        seed: 0,
    }
    .write(&out)?;
    // A small real tokenizer: enough for GGUF metadata and the data pipeline.
    let tok =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/tok-llama3");
    for f in std::fs::read_dir(tok)? {
        let f = f?;
        std::fs::copy(f.path(), out.join(f.file_name()))?;
    }
    println!("wrote {shape} to {}", out.display());
    Ok(())
}
