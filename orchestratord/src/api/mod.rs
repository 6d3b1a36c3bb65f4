//! HTTP handlers: `openai` (the OpenAI-compatible /v1 API), `health` (liveness, readiness,
//! fallbacks).

pub mod control;
pub mod health;
pub mod openai;
pub mod tasks;
