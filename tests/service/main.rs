//! The service end to end over real HTTP, a real SQLite file and a tiny generated model: the
//! native routes, the OpenAI-shaped `/v1`, and keys, limits and faults. One binary, one harness.

mod chat;
#[path = "../common/mod.rs"]
mod common;
mod hardening;
mod harness;
mod hub;
mod native;
mod v1;
mod webhooks;
