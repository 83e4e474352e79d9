//! Generation with the KV cache against transformers' greedy `generate` on the same f32
//! weights (Llama, Llama 3 with tied embeddings, Qwen2, Qwen3, and Llama with an unmerged PEFT
//! adapter); batched prompts equal each prompt alone; sampling is seeded and bounded by top-k.
//! Fixture: `scripts/gen_generate_fixture.py` (torch 2.15.0, transformers 5.24.0, peft 0.21.2).

use std::path::{Path, PathBuf};

use qlorad::model::llama::generate::{Finish, Next, Sampling};
use qlorad::model::llama::{CausalLm, LoadOptions};
use serde_json::Value;

fn lm(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lm")
        .join(name)
}

fn load(name: &str, adapter: Option<&str>) -> CausalLm {
    let mut m = CausalLm::load(
        &lm(name),
        &LoadOptions {
            quant: None,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    if let Some(a) = adapter {
        m.load_adapter(&lm(a)).unwrap();
    }
    m
}

fn ids(v: &Value) -> Vec<Vec<u32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn greedy(m: &CausalLm, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    m.generate_batch(prompts, n, &Sampling::default(), &[], &mut |_, _| {
        Next::Continue
    })
    .unwrap()
    .into_iter()
    .map(|(t, f)| {
        assert_eq!(f, Finish::Length);
        t
    })
    .collect()
}

#[test]
fn greedy_generation_is_token_identical_to_transformers() {
    let want: Value =
        serde_json::from_slice(&std::fs::read(lm("generate/expected.json")).unwrap()).unwrap();
    let n = want["max_new_tokens"].as_u64().unwrap() as usize;
    for (case, c) in want["cases"].as_object().unwrap() {
        let m = load(c["model"].as_str().unwrap(), c["adapter"].as_str());
        let prompts = ids(&c["prompts"]);
        let expected = ids(&c["continuations"]);
        for (p, e) in prompts.iter().zip(&expected) {
            assert_eq!(
                &greedy(&m, std::slice::from_ref(p), n)[0],
                e,
                "{case}: {p:?}"
            );
        }
        // All prompts in one left-padded batch: the same continuations.
        assert_eq!(greedy(&m, &prompts, n), expected, "{case}: batched");
    }
}

/// The cache's logits at every step equal the whole sequence's forward at its last position.
#[test]
fn cached_steps_equal_the_full_forward() {
    let m = load("qwen3", None);
    let prompt: Vec<u32> = vec![5, 17, 33, 9, 101];
    let mut cache = m.kv_cache(vec![0]);
    let dev = candle_core::Device::Cpu;
    let mut seq = prompt.clone();
    let mut logits = m
        .decode_step(
            &candle_core::Tensor::from_vec(prompt.clone(), (1, prompt.len()), &dev).unwrap(),
            &mut cache,
        )
        .unwrap();
    for t in [7u32, 64, 2, 90] {
        let full = m
            .forward(
                &candle_core::Tensor::from_vec(seq.clone(), (1, seq.len()), &dev).unwrap(),
                None,
                None,
            )
            .unwrap()
            .narrow(1, seq.len() - 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let ours = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = full
            .iter()
            .zip(&ours)
            .fold(0f32, |d, (a, b)| d.max((a - b).abs()));
        assert!(diff < 1e-5, "at length {}: {diff}", seq.len());
        seq.push(t);
        logits = m
            .decode_step(
                &candle_core::Tensor::from_vec(vec![t], (1, 1), &dev).unwrap(),
                &mut cache,
            )
            .unwrap();
    }
    assert_eq!(cache.len(), seq.len());
}

/// Sampling: the same seed gives the same tokens, top-k 1 is greedy, a stop id ends a row
/// without being returned, and the caller can stop a row.
#[test]
fn sampling_is_seeded_and_stops() {
    let m = load("llama-gqa", None);
    let prompt = vec![vec![4u32, 8, 15, 16, 23, 42]];
    let s = |seed, top_k| Sampling {
        temperature: 0.8,
        top_p: 0.9,
        top_k,
        seed,
    };
    let run = |s: &Sampling, stop: &[u32]| {
        m.generate_batch(&prompt, 16, s, stop, &mut |_, _| Next::Continue)
            .unwrap()
            .remove(0)
    };
    let (a, b) = (run(&s(1, 0), &[]), run(&s(1, 0), &[]));
    assert_eq!(a, b);
    assert_ne!(run(&s(2, 0), &[]).0, a.0, "another seed, other tokens");
    assert_eq!(
        run(&s(3, 1), &[]).0,
        greedy(&m, &prompt, 16)[0],
        "top-k 1 is greedy"
    );
    let stop_id = a.0[3];
    let at = a.0.iter().position(|&t| t == stop_id).unwrap();
    let (cut, why) = run(&s(1, 0), &[stop_id]);
    assert_eq!((cut.as_slice(), why), (&a.0[..at], Finish::Stop));
    let mut seen = 0;
    let out = m
        .generate_batch(&prompt, 16, &s(1, 0), &[], &mut |_, _| {
            seen += 1;
            if seen == 5 {
                Next::Stop
            } else {
                Next::Continue
            }
        })
        .unwrap();
    assert_eq!(out[0], (a.0[..5].to_vec(), Finish::Stop));
}

/// One loaded base serves its adapters in turn: taking the adapters off gives the base's
/// continuations, putting them back the adapter's, each as transformers generates them.
#[test]
fn adapters_swap_on_one_loaded_base() {
    let want: Value =
        serde_json::from_slice(&std::fs::read(lm("generate/expected.json")).unwrap()).unwrap();
    let n = want["max_new_tokens"].as_u64().unwrap() as usize;
    let cases = &want["cases"];
    let prompts = ids(&cases["llama-gqa"]["prompts"]);
    let mut m = load("llama-gqa", Some("llama-gqa-lora"));
    let set = m.take_adapters();
    assert!(!set.is_empty());
    for round in 0..2 {
        m.set_adapters(&[]).unwrap();
        let base = greedy(&m, &prompts, n);
        assert_eq!(
            base,
            ids(&cases["llama-gqa"]["continuations"]),
            "round {round}: base"
        );
        m.set_adapters(&set).unwrap();
        let tuned = greedy(&m, &prompts, n);
        let key = "llama-gqa+llama-gqa-lora";
        assert_eq!(
            tuned,
            ids(&cases[key]["continuations"]),
            "round {round}: adapter"
        );
    }
}
