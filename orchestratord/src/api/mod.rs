//! HTTP handlers: `openai` (the OpenAI-compatible /v1 API), `anthropic` (Anthropic's Messages
//! API), `tasks` (the native /v2 task API and sessions), `control` (pools, drain, reload),
//! `health` (liveness, readiness, metrics, fallbacks), and `validate` (reading the few members of
//! a client's JSON body that orchestratord needs).

pub mod anthropic;
pub mod control;
pub mod health;
pub mod openai;
pub mod tasks;
pub mod validate;
