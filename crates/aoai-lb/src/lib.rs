//! aoai-lb: a load-balancing gateway for Azure OpenAI.
//!
//! A request goes through explicit phases, each in its own module:
//! authenticate → route → select a backend → rewrite → send (with retries)
//! → stream back → log.

pub mod admin;
pub mod affinity;
pub mod auth;
pub mod backend;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod log;
pub mod logging;
pub mod metrics;
pub mod otel;
pub mod proxy;
pub mod rewrite;
pub mod route;
pub mod secret;
pub mod select;
pub mod send;
pub mod server;
pub mod stream;
