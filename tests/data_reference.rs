//! Datasets: chat templates against transformers' `apply_chat_template` (fixtures from
//! `scripts/gen_data_fixtures.py`, transformers 5.24.0), loss masks, and bad input.

use std::path::{Path, PathBuf};

use qlorad::data::encode::{encode_sample, BosRule, IGNORE};
use qlorad::data::{encode_dataset, EncodeOptions, Message, Sample, TextTokenizer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

fn conversation(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Message {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect()
}

#[test]
fn chat_templates_render_and_tokenize_as_transformers() {
    let f: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("templates.json")).unwrap()).unwrap();
    let convs = f["conversations"].as_array().unwrap();
    let mut checked = 0;
    for case in f["cases"].as_array().unwrap() {
        let name = case["template"].as_str().unwrap();
        let tok = TextTokenizer::load(&fixtures().join(format!("tok-{name}"))).unwrap();
        let conv = conversation(&convs[case["conversation"].as_u64().unwrap() as usize]);
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let text = tok.template.as_ref().unwrap().render(&conv, gen).unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "{name} conversation {}",
            case["conversation"]
        );
        let (ids, _) = tok.encode(&text).unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want, "{name}: token ids");
        checked += 1;
    }
    assert!(checked >= 9, "{checked} cases");
}

/// Text and prompt/completion records start with BOS exactly where transformers' tokenizer
/// puts one before a text: its post-processor decides, not `bos_token` alone.
#[test]
fn bos_comes_from_the_tokenizer_as_transformers_adds_it() {
    let f: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("templates.json")).unwrap()).unwrap();
    let cases = f["bos_added"].as_object().unwrap();
    assert!(cases.values().any(|v| v == true) && cases.values().any(|v| v == false));
    for (name, added) in cases {
        let tok = TextTokenizer::load(&fixtures().join(format!("tok-{name}"))).unwrap();
        let added = added.as_bool().unwrap();
        assert_eq!(tok.adds_bos, added, "{name}");
        let text = Sample::Text("Hello there".into());
        let prompted = Sample::Prompted {
            prompt: "Hello".into(),
            completion: " there".into(),
        };
        for (rule, want) in [
            (BosRule::Auto, added),
            (BosRule::Always, tok.bos.is_some()),
            (BosRule::Never, false),
        ] {
            let opts = EncodeOptions {
                bos: rule,
                ..Default::default()
            };
            for s in [&text, &prompted] {
                let ex = encode_sample(&tok, s, &opts).unwrap();
                let starts = tok.bos.as_ref().map(|b| b.1) == ex.input_ids.first().copied();
                assert_eq!(starts, want, "{name}, {rule:?}: {s:?}");
                let (plain, _) = tok.encode("Hello").unwrap();
                assert_eq!(
                    ex.input_ids[usize::from(want)],
                    plain[0],
                    "{name}, {rule:?}"
                );
            }
        }
    }
    // llama.cpp: a SentencePiece vocabulary adds BOS, a GPT-2-style BPE one does not.
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf");
    assert!(
        TextTokenizer::load(&gguf.join("ggml-vocab-llama-spm.gguf"))
            .unwrap()
            .adds_bos
    );
    assert!(
        !TextTokenizer::load(&gguf.join("ggml-vocab-starcoder.gguf"))
            .unwrap()
            .adds_bos
    );
}

#[test]
fn only_completion_tokens_count() {
    let tok = TextTokenizer::load(&fixtures().join("tok-mistral")).unwrap();
    let opts = EncodeOptions {
        bos: BosRule::Always,
        ..Default::default()
    };
    // completion form as artidoro/qlora: bos + prompt masked, completion + eos learned
    let s = Sample::Prompted {
        prompt: "What is the capital of France?".into(),
        completion: " Paris.".into(),
    };
    let ex = encode_sample(&tok, &s, &opts).unwrap();
    let (p, _) = tok.encode("<s>What is the capital of France?").unwrap();
    let (c, _) = tok.encode(" Paris.</s>").unwrap();
    assert_eq!(ex.input_ids, [p.clone(), c.clone()].concat());
    let mut want = vec![IGNORE; p.len()];
    want.extend(c.iter().map(|&t| t as i64));
    assert_eq!(ex.labels, want);

    // chat: "<s>[INST] hi [/INST]Paris.</s>": only "Paris.</s>" is learned
    let s = Sample::Chat {
        messages: vec![
            Message {
                role: "user".into(),
                content: "What is the capital of France?".into(),
            },
            Message {
                role: "assistant".into(),
                content: "Paris.".into(),
            },
        ],
    };
    let ex = encode_sample(&tok, &s, &opts).unwrap();
    let learned: Vec<u32> = ex
        .input_ids
        .iter()
        .zip(&ex.labels)
        .filter(|(_, &l)| l != IGNORE)
        .map(|(&t, _)| t)
        .collect();
    let (want, _) = tok.encode("Paris.</s>").unwrap();
    assert_eq!(learned, want);
    assert_eq!(tok.decode(&learned).unwrap(), "Paris.");
    let all = encode_sample(
        &tok,
        &s,
        &EncodeOptions {
            train_on_prompt: true,
            ..opts.clone()
        },
    )
    .unwrap();
    assert!(all.labels.iter().all(|&l| l != IGNORE));

    // llama3: both assistant turns learned with their <|eot_id|>, nothing else
    let tok = TextTokenizer::load(&fixtures().join("tok-llama3")).unwrap();
    let s = Sample::Chat {
        messages: vec![
            Message {
                role: "user".into(),
                content: "Hi".into(),
            },
            Message {
                role: "assistant".into(),
                content: "Hello!".into(),
            },
            Message {
                role: "user".into(),
                content: "Thanks".into(),
            },
            Message {
                role: "assistant".into(),
                content: "Welcome.".into(),
            },
        ],
    };
    let ex = encode_sample(&tok, &s, &opts).unwrap();
    let learned: Vec<u32> = ex
        .input_ids
        .iter()
        .zip(&ex.labels)
        .filter(|(_, &l)| l != IGNORE)
        .map(|(&t, _)| t)
        .collect();
    let (a, _) = tok.encode("Hello!<|eot_id|>").unwrap();
    let (b, _) = tok.encode("Welcome.<|eot_id|>").unwrap();
    assert_eq!(learned, [a, b].concat());
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn err(path: &Path, opts: &EncodeOptions) -> String {
    let tok = TextTokenizer::load(&fixtures().join("tok-chatml")).unwrap();
    match encode_dataset(path, &tok, opts) {
        Ok(_) => panic!("{} should fail", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_datasets_name_file_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let o = EncodeOptions::default();
    let ok = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#;

    let p = write(d, "a.jsonl", &format!("{ok}\n{{\"messages\": [\n"));
    let m = err(&p, &o);
    assert!(
        m.contains("a.jsonl") && m.contains("line 2") && m.contains("invalid JSON"),
        "{m}"
    );

    let p = write(
        d,
        "b.jsonl",
        &format!("{ok}\n{{\"messages\": [{{\"role\": \"user\"}}]}}\n"),
    );
    let m = err(&p, &o);
    assert!(
        m.contains("line 2") && m.contains("messages[0].content") && m.contains("missing"),
        "{m}"
    );

    let p = write(
        d,
        "c.jsonl",
        &format!("{ok}\n{{\"messages\": [{{\"role\": \"user\", \"content\": 5}}]}}\n"),
    );
    let m = err(&p, &o);
    assert!(
        m.contains("messages[0].content") && m.contains("must be a string"),
        "{m}"
    );

    let p = write(d, "d.jsonl", "\n\n");
    assert!(err(&p, &o).contains("no records"));

    let p = write(d, "e.jsonl", "{\"question\": \"x\", \"answer\": \"y\"}\n");
    let m = err(&p, &o);
    assert!(
        m.contains("line 1") && m.contains("cannot tell the format"),
        "{m}"
    );

    let p = write(
        d,
        "f.json",
        "[{\"instruction\": \"a\", \"output\": \"b\"}, {\"instruction\": \"a\", \"output\": 3}]",
    );
    let m = err(&p, &o);
    assert!(m.contains("record 1") && m.contains("`output`"), "{m}");

    let p = write(
        d,
        "g.jsonl",
        r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
    );
    assert!(err(&p, &o).contains("no assistant message"));

    let p = write(
        d,
        "h.jsonl",
        "{\"conversations\": [{\"from\": \"robot\", \"value\": \"x\"}]}\n",
    );
    let m = err(&p, &o);
    assert!(
        m.contains("conversations[0].from") && m.contains("robot"),
        "{m}"
    );

    // a template that raises names the record and the template file
    let tdir = d.join("tok");
    std::fs::create_dir(&tdir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("tok-mistral").join(f), tdir.join(f)).unwrap();
    }
    std::fs::copy(
        fixtures().join("tok-mistral/chat_template.jinja"),
        tdir.join("chat_template.jinja"),
    )
    .unwrap();
    let tok = TextTokenizer::load(&tdir).unwrap();
    let p = write(
        d,
        "i.jsonl",
        &format!("{ok}\n{{\"messages\": [{{\"role\": \"system\", \"content\": \"s\"}}, {{\"role\": \"assistant\", \"content\": \"a\"}}]}}\n"),
    );
    let m = encode_dataset(&p, &tok, &o).err().unwrap().to_string();
    assert!(
        m.contains("line 2") && m.contains("chat_template.jinja") && m.contains("alternate"),
        "{m}"
    );

    // a model directory without tokenizer.json
    let m = TextTokenizer::load(d).err().unwrap().to_string();
    assert!(m.contains("tokenizer.json"), "{m}");

    // an unknown format name
    let m = "yaml".parse::<qlorad::data::DataFormat>().unwrap_err();
    assert!(m.contains("unknown data format"), "{m}");
}

#[test]
fn summary_counts_examples_tokens_and_truncation() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(
        tmp.path(),
        "s.jsonl",
        "{\"prompt\": \"Translate to French: good morning ->\", \"completion\": \" bonjour\"}\n{\"prompt\": \"The Zephyr 9 kettle\", \"completion\": \" boils a litre of water in ninety seconds.\"}\n",
    );
    let tok = TextTokenizer::load(&fixtures().join("tok-llama3")).unwrap();
    let (ex, s) = encode_dataset(
        &p,
        &tok,
        &EncodeOptions {
            max_seq_len: 12,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.examples, 2);
    assert_eq!(s.format, "completion");
    assert!(ex.iter().all(|e| e.input_ids.len() <= 12));
    assert!(s.truncated >= 1, "{s:?}");
    assert_eq!(
        s.tokens,
        ex.iter().map(|e| e.input_ids.len()).sum::<usize>()
    );
}

/// Packing places examples in rows exactly as TRL's `pack_dataset(strategy="bfd")` does
/// (`scripts/gen_pack_fixture.py`, trl 1.16.0): same rows, same order, same examples in each.
#[test]
fn packing_matches_trls_best_fit_decreasing() {
    let f: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("pack-bfd.json")).unwrap()).unwrap();
    for case in f["cases"].as_array().unwrap() {
        let max_len = case["max_len"].as_u64().unwrap() as usize;
        let lengths: Vec<usize> = serde_json::from_value(case["lengths"].clone()).unwrap();
        let want: Vec<Vec<usize>> = serde_json::from_value(case["rows"].clone()).unwrap();
        let rows = qlorad::data::pack::pack_bfd(&lengths, max_len);
        assert_eq!(rows, want, "max_len {max_len}");
        let s = qlorad::data::pack::summarize(&rows, &lengths, max_len);
        assert_eq!(s.examples, lengths.len());
        assert!(s.fill <= 1.0 && s.fill > 0.5, "{s:?}");
    }
}
