//! A tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata, splitting and merging as
//! llama.cpp does: byte-level BPE with the pre-tokenizer regexes of `tokenizer.ggml.pre`, or
//! SentencePiece (merges ranked by piece score, byte fallback, `▁` for spaces).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
    Tokenizer,
};

use super::{DataError, Result};
use crate::model::gguf::GgufModel;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_UNKNOWN: i32 = 2;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_BYTE: i32 = 6;

/// What a GGUF says about its tokenizer, beyond the vocabulary.
pub struct GgufVocab {
    pub tokenizer: Tokenizer,
    pub bos: Option<(String, u32)>,
    pub eos: Option<(String, u32)>,
    pub pad_id: Option<u32>,
    pub chat_template: Option<String>,
    /// Whether llama.cpp puts BOS before a text it tokenizes (`tokenizer.ggml.add_bos_token`,
    /// else its default for the vocabulary type and pre-tokenizer).
    pub add_bos: bool,
}

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The regexes llama.cpp splits text with before BPE, applied in order, for `tokenizer.ggml.pre`
/// (llama.cpp's `llm_tokenizer_bpe`), and whether whole words in the vocabulary skip merging.
fn pre_tokenizer(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match pre {
        "default" => (
            vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => (vec![LLAMA3], true),
        "dbrx" | "smaug-bpe" => (vec![LLAMA3], false),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "hunyuan" | "kormo" => (vec![QWEN2], false),
        "qwen35" => (vec![QWEN35], false),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva" => {
            (vec![r"\p{N}", GPT2], false)
        }
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" | "roberta-bpe" | "gigachat" | "mellum"
        | "trillion" => (vec![GPT2], false),
        "falcon" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|`]+",
                r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                r"[0-9][0-9][0-9]",
            ],
            false,
        ),
        "deepseek-coder" => (
            vec![
                r"[\r\n]",
                r"\s?\p{L}+",
                r"\s?\p{P}+",
                r"[一-龥ࠀ-一가-퟿]+",
                r"\p{N}",
            ],
            false,
        ),
        _ => return None,
    })
}

fn strings<'a>(g: &'a GgufModel, key: &str) -> Result<Option<Vec<&'a str>>> {
    match g.meta(key) {
        None => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(bad(g, format!("{key}[{i}] is not a string: {other:?}"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(other) => Err(bad(g, format!("{key} is not an array: {other:?}"))),
    }
}

fn numbers(g: &GgufModel, key: &str) -> Result<Option<Vec<f64>>> {
    match g.meta(key) {
        None => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(x) => Ok(*x as f64),
                Value::F64(x) => Ok(*x),
                Value::I32(x) => Ok(*x as f64),
                Value::U32(x) => Ok(*x as f64),
                Value::I8(x) => Ok(*x as f64),
                Value::U8(x) => Ok(*x as f64),
                other => Err(bad(g, format!("{key}[{i}] is not a number: {other:?}"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(other) => Err(bad(g, format!("{key} is not an array: {other:?}"))),
    }
}

fn bad(g: &GgufModel, message: impl Into<String>) -> DataError {
    DataError::Tokenizer {
        path: g.path.clone(),
        message: message.into(),
    }
}

fn model_err(g: &GgufModel) -> impl Fn(crate::model::ModelError) -> DataError + '_ {
    move |e| bad(g, e.to_string())
}

fn tk_err(g: &GgufModel) -> impl Fn(tokenizers::Error) -> DataError + '_ {
    move |e| bad(g, e.to_string())
}

/// Rebuild the tokenizer of a GGUF file from its metadata.
pub fn gguf_vocab(g: &GgufModel) -> Result<GgufVocab> {
    let kind = g
        .meta_str("tokenizer.ggml.model")
        .map_err(model_err(g))?
        .ok_or_else(|| bad(g, "metadata tokenizer.ggml.model is missing: no tokenizer"))?
        .to_string();
    let tokens = strings(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| bad(g, "metadata tokenizer.ggml.tokens is missing"))?;
    let types: Vec<i32> = match numbers(g, "tokenizer.ggml.token_type")? {
        Some(t) if t.len() == tokens.len() => t.into_iter().map(|x| x as i32).collect(),
        Some(t) => {
            return Err(bad(
                g,
                format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    t.len(),
                    tokens.len()
                ),
            ))
        }
        None => vec![1; tokens.len()],
    };
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.to_string()).or_insert(i as u32);
    }
    let mut tokenizer = match kind.as_str() {
        "gpt2" => bpe_tokenizer(g, &vocab)?,
        "llama" => spm_tokenizer(g, &tokens, &types, &vocab)?,
        other => {
            return Err(bad(
                g,
                format!("tokenizer.ggml.model {other:?} is not supported (gpt2, llama)"),
            ))
        }
    };
    // Control and user-defined tokens match whole, before any splitting, as in llama.cpp.
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &ty)| {
            ty == TOKEN_CONTROL
                || ty == TOKEN_USER_DEFINED
                || (ty == TOKEN_UNKNOWN && kind == "llama")
        })
        .map(|(t, &ty)| AddedToken::from(t.to_string(), ty != TOKEN_USER_DEFINED))
        .collect();
    tokenizer.add_special_tokens(&added);
    let token = |key: &str| -> Result<Option<(String, u32)>> {
        match g.meta_u64(key).map_err(model_err(g))? {
            None => Ok(None),
            Some(id) => match tokens.get(id as usize) {
                Some(t) => Ok(Some((t.to_string(), id as u32))),
                None => Err(bad(
                    g,
                    format!("{key} {id} is outside the vocabulary of {}", tokens.len()),
                )),
            },
        }
    };
    let add_bos = match g
        .meta_bool("tokenizer.ggml.add_bos_token")
        .map_err(model_err(g))?
    {
        Some(b) => b,
        None => default_add_bos(&kind, g.meta_str("tokenizer.ggml.pre").ok().flatten()),
    };
    Ok(GgufVocab {
        add_bos,
        bos: token("tokenizer.ggml.bos_token_id")?,
        eos: token("tokenizer.ggml.eos_token_id")?,
        pad_id: token("tokenizer.ggml.padding_token_id")?.map(|p| p.1),
        chat_template: g
            .meta_str("tokenizer.chat_template")
            .map_err(model_err(g))?
            .map(String::from),
        tokenizer,
    })
}

/// llama.cpp's `add_bos` when the file does not say (`llama_vocab::impl::load`): SentencePiece
/// and WordPiece vocabularies add it, and so do BPE ones with Llama 3's, Mistral's Tekken or
/// Chameleon's pre-tokenizer.
fn default_add_bos(kind: &str, pre: Option<&str>) -> bool {
    match kind {
        "llama" | "bert" => true,
        "gpt2" => matches!(
            pre,
            Some(
                "llama3"
                    | "llama-v3"
                    | "llama-bpe"
                    | "falcon3"
                    | "falcon-h1"
                    | "pixtral"
                    | "midm-2.0"
                    | "lfm2"
                    | "jina-v5-nano"
                    | "tekken"
                    | "chameleon"
            )
        ),
        _ => false,
    }
}

fn bpe_tokenizer(g: &GgufModel, vocab: &HashMap<String, u32>) -> Result<Tokenizer> {
    let merges = strings(g, "tokenizer.ggml.merges")?.ok_or_else(|| {
        bad(
            g,
            "metadata tokenizer.ggml.merges is missing (a BPE vocabulary needs it)",
        )
    })?;
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    bad(
                        g,
                        format!("tokenizer.ggml.merges[{i}] {m:?} is not \"a b\""),
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let pre = g
        .meta_str("tokenizer.ggml.pre")
        .map_err(model_err(g))?
        .unwrap_or("default");
    let (regexes, ignore_merges) = pre_tokenizer(pre).ok_or_else(|| {
        bad(
            g,
            format!("tokenizer.ggml.pre {pre:?} is not supported (llama-bpe, qwen2, qwen35, smollm, gpt-2, starcoder, falcon, deepseek-coder, default, ...)"),
        )
    })?;
    let bpe = BPE::builder()
        .vocab_and_merges(to_vocab(vocab), merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(tk_err(g))?;
    let mut pre_tokenizers = Vec::with_capacity(regexes.len() + 1);
    for r in regexes {
        let split = Split::new(
            SplitPattern::Regex(r.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tk_err(g))?;
        pre_tokenizers.push(PreTokenizerWrapper::Split(split));
    }
    pre_tokenizers.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, false, false,
    )));
    let mut t = Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreSequence::new(
        pre_tokenizers,
    ))));
    t.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    Ok(t)
}

/// SentencePiece as llama.cpp runs it: the pair whose joined piece scores highest merges first,
/// which is BPE with merges ranked by that score (transformers' `SentencePieceExtractor`).
fn spm_tokenizer(
    g: &GgufModel,
    tokens: &[&str],
    types: &[i32],
    vocab: &HashMap<String, u32>,
) -> Result<Tokenizer> {
    let scores = numbers(g, "tokenizer.ggml.scores")?.ok_or_else(|| {
        bad(
            g,
            "metadata tokenizer.ggml.scores is missing (SentencePiece needs it)",
        )
    })?;
    if scores.len() != tokens.len() {
        return Err(bad(
            g,
            format!(
                "tokenizer.ggml.scores has {} entries for {} tokens",
                scores.len(),
                tokens.len()
            ),
        ));
    }
    let mut ranked: Vec<(f64, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if matches!(types[id], TOKEN_CONTROL | TOKEN_BYTE | TOKEN_UNKNOWN) {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                ranked.push((scores[id], li, ri));
            }
        }
    }
    // Highest score first; ties in vocabulary order of the parts.
    ranked.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then((a.1, a.2).cmp(&(b.1, b.2)))
    });
    let merges: Vec<(String, String)> = ranked
        .iter()
        .map(|&(_, l, r)| {
            (
                tokens[l as usize].to_string(),
                tokens[r as usize].to_string(),
            )
        })
        .collect();
    let unk = types
        .iter()
        .position(|&t| t == TOKEN_UNKNOWN)
        .map(|i| tokens[i].to_string());
    let mut builder = BPE::builder()
        .vocab_and_merges(to_vocab(vocab), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(u) = unk {
        builder = builder.unk_token(u);
    }
    let bpe = builder.build().map_err(tk_err(g))?;
    let prefix = g
        .meta_bool("tokenizer.ggml.add_space_prefix")
        .map_err(model_err(g))?
        .unwrap_or(true);
    let mut normalizers = Vec::new();
    if prefix {
        normalizers.push(NormalizerWrapper::Prepend(Prepend::new("▁".into())));
    }
    normalizers.push(NormalizerWrapper::Replace(
        Replace::new(" ", "▁").map_err(tk_err(g))?,
    ));
    let mut t = Tokenizer::new(bpe);
    t.with_normalizer(Some(NormalizerWrapper::Sequence(NormalizerSequence::new(
        normalizers,
    ))));
    let mut decoders = vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").map_err(tk_err(g))?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    t.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(
        decoders,
    ))));
    Ok(t)
}

fn to_vocab(vocab: &HashMap<String, u32>) -> tokenizers::models::bpe::Vocab {
    vocab.iter().map(|(k, &v)| (k.clone(), v)).collect()
}
