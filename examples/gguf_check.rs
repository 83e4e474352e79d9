//! Checks a GGUF import against llama.cpp's own expectations.
//!
//! `gguf_check vocab FILE.gguf`: tokenizes the test strings of `FILE.gguf.inp` (llama.cpp's
//! `test-tokenizer-0` format) and compares with the ids in `FILE.gguf.out`.
//! `gguf_check tokenize MODEL.gguf < strings.json`: token ids of each string, as JSON.
//! `gguf_check logits MODEL.gguf TEXT`: prints the token ids of TEXT and the f32 logits of its
//! last position as JSON, for `scripts/check_gguf_import.py`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qlorad::data::TextTokenizer;
use qlorad::model::llama::{CausalLm, LoadOptions};

/// llama.cpp's `test-tokenizer-0` cases: strings separated by a marker line, ids one line each.
fn cases(gguf: &Path) -> anyhow::Result<Vec<(String, Vec<u32>)>> {
    let inp = std::fs::read_to_string(format!("{}.inp", gguf.display()))?;
    let out = std::fs::read_to_string(format!("{}.out", gguf.display()))?;
    let mut strings: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    // A marker at the very end closes the last case rather than opening an empty one.
    if strings.last() == Some(&"") {
        strings.pop();
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    anyhow::ensure!(
        strings.len() == ids.len(),
        "{} inputs, {} outputs",
        strings.len(),
        ids.len()
    );
    Ok(strings.into_iter().map(String::from).zip(ids).collect())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("vocab") => {
            let path = Path::new(&args[2]);
            let tok = TextTokenizer::load(path)?;
            let cases = cases(path)?;
            let mut bad = 0;
            for (text, want) in &cases {
                let (got, _) = tok.encode(text)?;
                if &got != want {
                    bad += 1;
                    println!("MISMATCH {text:?}\n  llama.cpp {want:?}\n  qlorad    {got:?}");
                }
            }
            println!(
                "{}: {}/{} strings identical",
                path.display(),
                cases.len() - bad,
                cases.len()
            );
        }
        Some("tokenize") => {
            let tok = TextTokenizer::load(Path::new(&args[2]))?;
            let texts: Vec<String> = serde_json::from_reader(std::io::stdin())?;
            let ids = texts
                .iter()
                .map(|t| tok.encode(t).map(|e| e.0))
                .collect::<Result<Vec<_>, _>>()?;
            println!("{}", serde_json::json!(ids));
        }
        Some("logits") => {
            let path = Path::new(&args[2]);
            let tok = TextTokenizer::load(path)?;
            let (ids, _) = tok.encode(&args[3])?;
            let opts = LoadOptions {
                quant: None,
                dtype: DType::F32,
                device: Device::Cpu,
                gradient_checkpointing: false,
            };
            let model = CausalLm::load(path, &opts)?;
            let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let logits = model.forward(&input, None, None)?;
            let last: Vec<f32> = logits.get(0)?.get(ids.len() - 1)?.to_vec1()?;
            println!("{}", serde_json::json!({ "ids": ids, "logits": last }));
        }
        _ => anyhow::bail!(
            "usage: gguf_check vocab FILE.gguf | tokenize MODEL.gguf | logits MODEL.gguf TEXT"
        ),
    }
    Ok(())
}
