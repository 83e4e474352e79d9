//! The OpenAPI 3.1 document: paths and schemas come from the handlers' `#[utoipa::path]`
//! attributes as the router registers them; this file adds the title, tags and the job spec's
//! schema (the engine's spec types stay free of HTTP concerns, and a test keeps the two in step).

use std::collections::HashMap;
use std::sync::Arc;

use axum::{Extension, Json};
use serde::Deserialize;
use utoipa::{OpenApi, ToSchema};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "qlorad",
        description = "QLoRA fine-tuning service: datasets, fine-tune jobs, live events, checkpoints and \
                       artifacts; `/v1` has the shapes of OpenAI's fine-tuning API."
    ),
    tags(
        (name = "files", description = "datasets"),
        (name = "jobs", description = "fine-tune jobs, events, checkpoints, artifacts"),
        (name = "openai", description = "OpenAI-compatible fine-tuning API"),
        (name = "service", description = "health, models, metrics, this document, the dashboard"),
    )
)]
struct ApiDoc;

/// The document before the routes add their paths.
pub fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Declare the bearer scheme and, per operation, whether it needs a key: public routes need
/// none, `/metrics` takes one or none, every other route needs one and may answer 401.
pub fn secure(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
    use utoipa::openapi::{Content, Ref, ResponseBuilder};

    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    let bearer = || SecurityRequirement::new("bearer", Vec::<String>::new());
    let unauthorized = ResponseBuilder::new()
        .description("no API key, or not a valid one")
        .content(
            "application/json",
            Content::new(Some(Ref::from_schema_name("ErrorBody"))),
        )
        .build();
    for (path, item) in doc.paths.paths.iter_mut() {
        let ops = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
            &mut item.head,
            &mut item.options,
            &mut item.trace,
        ];
        for op in ops.into_iter().flatten() {
            op.security = Some(match super::auth::public_path(path) {
                Some(true) => vec![SecurityRequirement::default()],
                Some(false) => vec![SecurityRequirement::default(), bearer()],
                None => {
                    op.responses
                        .responses
                        .insert("401".into(), unauthorized.clone().into());
                    vec![bearer()]
                }
            });
        }
    }
}

/// Store rows carry the spec as plain JSON (the store knows no API types): document it as the
/// API's `JobSpec`.
pub fn spec_schema(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{schema::Schema, Ref, RefOr};

    let Some(components) = doc.components.as_mut() else {
        return;
    };
    if let Some(RefOr::T(Schema::Object(row))) = components.schemas.get_mut("JobRow") {
        row.properties
            .insert("spec".into(), RefOr::Ref(Ref::from_schema_name("JobSpec")));
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "the OpenAPI document", content_type = "application/json", body = Object)))]
pub async fn openapi_get(
    Extension(doc): Extension<Arc<utoipa::openapi::OpenApi>>,
) -> Json<utoipa::openapi::OpenApi> {
    Json((*doc).clone())
}

/// The job spec (`POST /jobs`; `/v1/fine_tuning/jobs` takes its fields as extras). Every field
/// but `model` and `training_file` has a default; unknown fields are rejected.
#[derive(Deserialize, ToSchema)]
#[schema(as = JobSpec)]
#[allow(dead_code)]
pub struct JobSpecSchema {
    /// A name from `GET /models`, or a path inside a model root.
    model: Option<String>,
    /// A file id from `POST /files`.
    training_file: Option<String>,
    /// A file id; evaluated every `eval_every` steps and at the end.
    validation_file: Option<String>,
    hyperparameters: Option<HyperparametersSchema>,
    method: Option<MethodSchema>,
    lora: Option<LoraSchema>,
    quantization: Option<QuantizationSchema>,
    data: Option<DataSchema>,
    /// Save a checkpoint every N optimizer steps (and always at the end).
    #[schema(minimum = 1)]
    checkpoint_every: Option<u64>,
    /// Checkpoints to keep (default 3).
    #[schema(minimum = 1)]
    keep_checkpoints: Option<u64>,
    /// Evaluate every N steps.
    #[schema(minimum = 1)]
    eval_every: Option<u64>,
    /// Stop when the validation loss has not improved by `min_delta` for `patience`
    /// evaluations (needs `eval_every`).
    early_stopping: Option<EarlyStoppingSchema>,
    /// The adapter and exports of the lowest validation loss, not the last step's.
    load_best: Option<bool>,
    /// Up to 16 conversations (lists of `{"role", "content"}`) the model answers greedily at
    /// every evaluation and at the end; the answers are events.
    #[schema(value_type = Option<Vec<Vec<crate::api::v1::fine_tuning::Object>>>)]
    eval_prompts: Option<Vec<Vec<serde_json::Value>>>,
    export: Option<ExportSchema>,
    /// `cpu` or `cuda:N` (a job on `cpu` runs on whichever worker claims it).
    device: Option<String>,
    /// Higher runs first.
    priority: Option<i64>,
}

/// How the adapter learns.
#[derive(Deserialize, ToSchema)]
#[schema(as = Method)]
#[allow(dead_code)]
pub struct MethodSchema {
    /// `supervised` (the default) or `dpo` (preference pairs: OpenAI's
    /// input/preferred_output/non_preferred_output or TRL's prompt/chosen/rejected).
    #[serde(rename = "type")]
    kind: Option<MethodKindSchema>,
    /// DPO: the log-ratio's scale (default 0.1).
    beta: Option<f64>,
    /// DPO: the probability that a preference is flipped, in [0, 0.5) (default 0).
    label_smoothing: Option<f64>,
}

#[derive(Deserialize, ToSchema)]
#[schema(as = MethodType)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum MethodKindSchema {
    Supervised,
    Dpo,
}

#[derive(Deserialize, ToSchema)]
#[schema(as = Hyperparameters)]
#[allow(dead_code)]
pub struct HyperparametersSchema {
    /// Passes over the training set (default 3; ignored when `max_steps` is set).
    #[schema(minimum = 1)]
    n_epochs: Option<u64>,
    /// Optimizer steps to run.
    #[schema(minimum = 1)]
    max_steps: Option<u64>,
    /// Examples per micro-batch (default 4).
    #[schema(minimum = 1)]
    batch_size: Option<u64>,
    #[schema(minimum = 1)]
    gradient_accumulation_steps: Option<u64>,
    /// Default 2e-4.
    learning_rate: Option<f64>,
    lr_scheduler: Option<LrScheduler>,
    /// In [0, 1); default 0.03.
    warmup_ratio: Option<f64>,
    warmup_steps: Option<u64>,
    weight_decay: Option<f64>,
    /// Global gradient-norm clip (default 0.3); 0 disables.
    max_grad_norm: Option<f64>,
    /// Default 2048.
    #[schema(minimum = 2)]
    max_seq_len: Option<u64>,
    seed: Option<u64>,
    gradient_checkpointing: Option<bool>,
    /// `adamw_torch` (default) or `adamw_bnb_8bit` (bitsandbytes' 8-bit AdamW; `adamw_8bit`
    /// too).
    optimizer: Option<OptimizerSchema>,
}

#[derive(Deserialize, ToSchema)]
#[schema(as = Optimizer)]
#[allow(dead_code)]
pub enum OptimizerSchema {
    #[serde(rename = "adamw_torch")]
    AdamwTorch,
    #[serde(rename = "adamw_bnb_8bit", alias = "adamw_8bit")]
    AdamwBnb8bit,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum LrScheduler {
    Constant,
    Linear,
    Cosine,
}

#[derive(Deserialize, ToSchema)]
#[schema(as = Lora)]
#[allow(dead_code)]
pub struct LoraSchema {
    /// Rank.
    #[schema(minimum = 1)]
    r: Option<u64>,
    alpha: Option<f64>,
    dropout: Option<f64>,
    /// `"all-linear"` or module names (`["q_proj", "v_proj"]`).
    target_modules: Option<TargetModulesSchema>,
    /// Scale by alpha/sqrt(r) instead of alpha/r.
    use_rslora: Option<bool>,
}

#[derive(Deserialize, ToSchema)]
#[serde(untagged)]
#[schema(as = TargetModules)]
#[allow(dead_code)]
pub enum TargetModulesSchema {
    Keyword(String),
    Names(Vec<String>),
}

/// The record shapes a dataset can have.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum DataFormat {
    Alpaca,
    Chat,
    Sharegpt,
    Completion,
    Text,
    Preference,
}

#[derive(Deserialize, ToSchema)]
#[schema(as = Quantization)]
#[allow(dead_code)]
pub struct QuantizationSchema {
    /// nf4 (default), fp4 or none.
    #[serde(rename = "type")]
    kind: Option<QuantKind>,
    /// Elements per absmax block: 32 ... 4096 (default 64).
    block_size: Option<u64>,
    double_quant: Option<bool>,
    compute_dtype: Option<ComputeDtype>,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum QuantKind {
    Nf4,
    Fp4,
    None,
}

#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum ComputeDtype {
    F32,
    Bf16,
}

#[derive(Deserialize, ToSchema)]
#[schema(as = DataOptions)]
#[allow(dead_code)]
pub struct DataSchema {
    /// Detected from the first record when absent.
    format: Option<DataFormat>,
    /// Also learn the prompt / user turns.
    train_on_prompt: Option<bool>,
    group_by_length: Option<bool>,
    /// Pack examples into rows of `max_seq_len` tokens by best-fit decreasing (as TRL); a
    /// micro-batch is `batch_size` rows and the loss is normalised over the whole step.
    packing: Option<bool>,
    /// Whether text and prompt/completion records start with BOS: `auto` (default) where the
    /// model's tokenizer adds it itself, as transformers and llama.cpp do; `always` as
    /// artidoro/qlora; `never`. Chat records get what their template writes.
    bos: Option<BosRule>,
}

/// When text and prompt/completion records start with the BOS token.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum BosRule {
    Auto,
    Always,
    Never,
}

#[derive(Deserialize, ToSchema)]
#[schema(as = EarlyStopping)]
#[allow(dead_code)]
pub struct EarlyStoppingSchema {
    /// Evaluations without improvement before the run stops.
    #[schema(minimum = 1)]
    patience: u64,
    /// A smaller improvement does not count (default 0).
    min_delta: Option<f64>,
}

#[derive(Deserialize, ToSchema)]
#[schema(as = Export)]
#[allow(dead_code)]
pub struct ExportSchema {
    /// Merged GGUF files of these types: f32, f16, bf16, q8_0, q4_0, q4_k_m.
    gguf: Option<Vec<String>>,
    merged_safetensors: Option<bool>,
    /// The adapter alone as a GGUF LoRA.
    gguf_lora: Option<bool>,
}

/// Property names of a schema by its component name, for the drift test.
pub fn spec_properties() -> HashMap<String, Vec<String>> {
    let doc = crate::api::openapi();
    let schemas = doc.components.map(|c| c.schemas).unwrap_or_default();
    let v = serde_json::to_value(&schemas).unwrap_or_default();
    let mut out = HashMap::new();
    if let Some(obj) = v.as_object() {
        for (name, s) in obj {
            if let Some(props) = s.get("properties").and_then(|p| p.as_object()) {
                out.insert(name.clone(), props.keys().cloned().collect());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finetune::JobSpec;

    fn keys(v: &serde_json::Value) -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    }

    /// The documented spec names exactly the fields the engine's `JobSpec` reads.
    #[test]
    fn the_spec_schema_matches_the_spec() {
        let spec = serde_json::to_value(JobSpec::default()).unwrap();
        let props = spec_properties();
        let sorted = |name: &str| {
            let mut p = props.get(name).cloned().unwrap_or_default();
            p.sort();
            p
        };
        assert_eq!(sorted("JobSpec"), keys(&spec));
        for (field, schema) in [
            ("hyperparameters", "Hyperparameters"),
            ("lora", "Lora"),
            ("quantization", "Quantization"),
            ("data", "DataOptions"),
            ("export", "Export"),
        ] {
            assert_eq!(sorted(schema), keys(&spec[field]), "{field}");
        }
    }
}
