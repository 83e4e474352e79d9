//! `qlorad generate`: complete a prompt (or a one-message chat) with a model and an optional
//! adapter.

use std::path::PathBuf;

use crate::data::{Message, TextTokenizer};
use crate::finetune::{load_model, FinetuneError, JobSpec};
use crate::infer::{Engine, InferError, Prompt, Request};
use crate::model::llama::generate::Sampling;

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
    /// Sample from the most likely tokens whose probability reaches this.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sample from the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Text that ends the answer (not printed); repeat for several.
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Print the continuation as it is generated (the same engine as `/v1/chat/completions`).
pub fn generate(args: &GenerateArgs, spec: &JobSpec) -> Result<(), FinetuneError> {
    use std::io::Write;
    let tok = TextTokenizer::load(&args.model)?;
    let model = load_model(&args.model, spec)?;
    let mut engine = Engine::new(model, tok, 1);
    let req = Request {
        adapter: args.adapter.clone(),
        prompt: if args.chat {
            Prompt::Chat(vec![Message {
                role: "user".into(),
                content: args.prompt.clone(),
            }])
        } else {
            Prompt::Text(args.prompt.clone())
        },
        max_tokens: args.max_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        stop: args.stop.clone(),
        n: 1,
    };
    let mut out = std::io::stdout().lock();
    engine
        .run(&req, &mut |_, text| {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
            true
        })
        .map_err(|e| match e {
            InferError::Model(e) => FinetuneError::from(e),
            InferError::Data(e) => FinetuneError::from(e),
            InferError::Lora(e) => FinetuneError::from(e),
            InferError::Request { field, message } => {
                FinetuneError::from(crate::finetune::SpecError::new(&field, message))
            }
        })?;
    let _ = writeln!(out);
    Ok(())
}
