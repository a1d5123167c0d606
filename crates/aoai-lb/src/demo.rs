//! `aoai-lb --demo`: the gateway in front of two simulated instances.
//!
//! Two aoai-sim instances run in-process on ephemeral 127.0.0.1 ports, with
//! a little latency so that streaming is visible token by token. The
//! gateway gets the same kind of document an operator would write, so the
//! demo exercises the real start-up path, including two named clients with
//! limits ([`CLIENTS`]). Nothing leaves the machine.

use aoai_sim::SimHandle;

use crate::config::{Config, ConfigError};

/// Time to first token of the simulated instances, in ms.
const TTFT_MS: u64 = 120;
/// Gap between streamed tokens, in ms.
const PER_TOKEN_MS: u64 = 30;
/// Tokens per reply.
const REPLY_TOKENS: u32 = 24;

/// The demo's two named clients: name, key, and what they may do. Their
/// keys are printed at start, like the demo's `API_KEY`.
pub const CLIENTS: [(&str, &str, &str); 2] = [
    (
        "team-a",
        "demo-team-a-key",
        "gpt-4o only, 60 requests and 20000 tokens per minute",
    ),
    (
        "team-b",
        "demo-team-b-key",
        "any deployment, 100000 tokens per day",
    ),
];

/// The demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start the simulated instances: {0}")]
    Sim(String),
    #[error("demo configuration: {0}")]
    Config(ConfigError),
}

impl From<ConfigError> for DemoError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

/// The running simulated instances and the configuration pointing at them.
pub struct Demo {
    /// Keep alive for as long as the gateway runs.
    pub sims: Vec<SimHandle>,
    pub config: Config,
}

/// Starts the two simulated instances and builds the configuration.
///
/// # Errors
/// [`DemoError`] if an instance cannot bind.
pub async fn start() -> Result<Demo, DemoError> {
    let cfgs = ["demo-east", "demo-west"].map(|name| {
        aoai_sim::InstanceConfig::new(name)
            .api_key(format!("{name}-backend-key"))
            .latency(TTFT_MS, PER_TOKEN_MS)
            .reply_tokens(REPLY_TOKENS)
    });
    let sims = aoai_sim::start(cfgs.to_vec())
        .await
        .map_err(|e| DemoError::Sim(e.to_string()))?;
    let doc = document(&sims);
    let config = Config::from_json(&doc)?;
    Ok(Demo { sims, config })
}

fn document(sims: &[SimHandle]) -> String {
    let instances: Vec<serde_json::Value> = sims
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name(),
                "url": s.url(),
                "api_key": s.config().api_key,
            })
        })
        .collect();
    let (a, b) = (CLIENTS[0], CLIENTS[1]);
    serde_json::json!({
        "instances": instances,
        "clients": [
            {"name": a.0, "key": a.1, "deployments": ["gpt-4o"], "rpm": 60, "tpm": 20000},
            {"name": b.0, "key": b.1, "token_quota": {"tokens": 100_000, "period": "day"}}
        ],
    })
    .to_string()
}

/// The seed README's request against `base` (e.g. `http://127.0.0.1:8000`),
/// on one line, ready to paste.
pub fn curl(base: &str, key: &str, stream: bool) -> String {
    let body = if stream {
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":300,"stream":true}"#
    } else {
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":300}"#
    };
    format!(
        "curl {}-X POST \"{base}/openai/deployments/gpt-4o/chat/completions?api-version=2025-01-01-preview\" -H \"Content-Type: application/json\" -H 'Authorization: Bearer {key}' -d '{body}'",
        if stream { "-N " } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_paste_ready_curl() {
        let c = curl("http://127.0.0.1:8000", "demo-key", false);
        assert!(c.starts_with("curl -X POST \"http://127.0.0.1:8000/openai/deployments/gpt-4o/chat/completions?api-version=2025-01-01-preview\""));
        assert!(c.contains("'Authorization: Bearer demo-key'"));
        assert!(!c.contains('\n'));
        assert!(curl("http://h", "k", true).starts_with("curl -N -X POST"));
    }

    #[tokio::test]
    async fn starts_two_instances_and_a_valid_config() {
        let demo = start().await.unwrap();
        assert_eq!(demo.sims.len(), 2);
        assert_eq!(demo.config.instances.len(), 2);
        assert_eq!(demo.config.instances[0].name, "demo-east");
        let names: Vec<&str> = demo
            .config
            .clients
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["team-a", "team-b"]);
        for s in &demo.sims {
            s.stop();
        }
    }
}
