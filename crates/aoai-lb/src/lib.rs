//! aoai-lb: a load-balancing gateway for Azure OpenAI.
//!
//! A request goes through explicit phases, each in its own module:
//! authenticate → route → select a backend → rewrite → send (with retries)
//! → stream back → log.

pub mod config;
pub mod secret;
pub mod admin;
pub mod logging;
pub mod metrics;
pub mod server;
pub mod auth;
pub mod backend;
pub mod error;
pub mod log;
pub mod proxy;
pub mod rewrite;
pub mod route;
pub mod select;
pub mod send;
pub mod stream;
pub mod cli;
pub mod demo;
