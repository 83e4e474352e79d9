//! `qlorad generate`: complete a prompt (or a one-message chat) with a model and an optional
//! adapter.

use std::path::PathBuf;

use crate::data::{Message, TextTokenizer};
use crate::finetune::{load_model, FinetuneError, JobSpec};
use crate::rng::Rng;

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn generate(args: &GenerateArgs, spec: &JobSpec) -> Result<String, FinetuneError> {
    let tok = TextTokenizer::load(&args.model)?;
    let mut model = load_model(&args.model, spec)?;
    if let Some(a) = &args.adapter {
        model.load_adapter(a)?;
    }
    let text = if args.chat {
        let template = tok
            .template
            .as_ref()
            .ok_or_else(|| crate::data::DataError::File {
                path: args.model.join("tokenizer_config.json"),
                message: "--chat needs a chat template, and this model has none".into(),
            })?;
        template.render(
            &[Message {
                role: "user".into(),
                content: args.prompt.clone(),
            }],
            true,
        )?
    } else {
        format!("{}{}", tok.bos_text(), args.prompt)
    };
    let (ids, _) = tok.encode(&text)?;
    let stop: Vec<u32> = tok.eos.iter().map(|e| e.1).collect();
    let out = model.generate(
        &ids,
        args.max_tokens,
        args.temperature,
        &stop,
        &mut Rng::new(args.seed),
    )?;
    Ok(tok.decode(&out)?)
}
