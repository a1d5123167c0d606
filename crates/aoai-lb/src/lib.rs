//! aoai-lb: a load-balancing gateway for Azure OpenAI.
//!
//! A request goes through explicit phases over one request context (see
//! [`pipeline`]): identify the client → classify the request → admit it
//! against the client's limits → forward it (rewrite, select, send with
//! failover) → respond (stream back) → account (usage, limits, access log)
//! when the response ends.

pub mod activity;
pub mod admin;
pub mod affinity;
pub mod auth;
pub mod backend;
pub mod cli;
pub mod client_cert;
pub mod clients;
pub mod config;
pub mod cpus;
pub mod credential;
pub mod demo;
pub mod entra;
pub mod error;
pub mod jwt;
pub mod lane;
pub mod limits;
pub mod log;
pub mod logging;
pub mod metrics;
pub mod otel;
pub mod pipeline;
pub mod pool;
pub mod proxy;
pub mod relay;
pub mod reload;
pub mod rewrite;
pub mod route;
pub mod secret;
pub mod select;
pub mod send;
pub mod server;
pub mod shared;
pub mod state;
pub mod status;
pub mod steer;
pub mod stream;
pub mod upstream;
pub mod usage;
