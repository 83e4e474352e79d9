//! qlorad: a QLoRA fine-tuning engine and service.
//!
//! The engine layers (`quant`, `model`) never depend on the service; see DESIGN.md for the map.

pub mod api;
pub mod bench;
pub mod client;
pub mod commands;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod export;
pub mod jobs;
pub mod lora;
pub mod model;
pub mod ops;
pub mod quant;
pub mod rng;
pub mod server;
pub mod train;
