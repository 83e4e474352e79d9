//! qlorad: a QLoRA fine-tuning engine and service.
//!
//! The engine (`ops`, `quant`, `lora`, `model`, `data`, `train`, `export`, `finetune`) never
//! depends on the service (`jobs`, `api`, `server`) or the command line (`cli`); ARCHITECTURE.md
//! is the map.

/// Run `$body` with `$t` bound to the Rust type of a float dtype (f32, bf16, f16); any other
/// dtype is an error naming `$what`. For the fused ops and their kernels.
macro_rules! float_dispatch {
    ($what:expr, $dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                $body
            }
            other => candle_core::bail!("{}: dtype {other:?} is not f32, bf16 or f16", $what),
        }
    };
}

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod export;
pub mod finetune;
pub mod infer;
pub mod jobs;
pub mod lora;
pub mod model;
pub mod ops;
pub mod quant;
pub mod rng;
pub mod server;
pub mod train;
