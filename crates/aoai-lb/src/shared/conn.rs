//! The connection behind [`super::Shared`]: one Redis server (through the
//! connection manager) or a Redis Cluster (the OSS cluster protocol that
//! Azure Cache for Redis and Azure Managed Redis speak with the *OSS
//! cluster* policy), chosen by `redis.cluster`.
//!
//! The rest of the shared-state code sends commands to a [`Conn`] without
//! knowing which it is: both follow the same timeouts, and every script's
//! keys share one hash tag, so each script runs on one slot. What differs
//! is handled here:
//!
//! - **Detection** (`"cluster": "auto"`, the default): `INFO cluster` on
//!   the configured endpoint says `cluster_enabled:1` or not. It runs in the
//!   background at the first successful connect, so a replica started while
//!   Redis is down still serves at once and settles the mode later.
//! - **Redirections.** The cluster client learns the slot map with
//!   `CLUSTER SLOTS`, follows `MOVED` (and refreshes the map) and `ASK`,
//!   and reconnects to nodes that come back.
//! - **Pipelines** must stay within one slot in a cluster, and cannot
//!   follow `ASK` while a slot migrates: [`Conn::each`] sends a batch as
//!   one pipeline to a single server and as separate commands to a
//!   cluster.
//! - **Pub/sub.** A classic `PUBLISH` is broadcast to every node over the
//!   cluster bus, so the subscriber listens on any one node;
//!   [`Conn::nodes`] lists them so that it can move to another when its
//!   node goes away.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ConnectionAddr, ConnectionInfo, Pipeline, RedisFuture, Value};

use super::OpError;

/// A connection to Redis, standalone or clustered. Cheap to clone: both
/// variants are handles onto one multiplexed connection (per node).
#[derive(Clone)]
pub enum Conn {
    /// One server (or a proxy in front of several, like the Enterprise
    /// cluster policy of Azure Managed Redis).
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl Conn {
    /// `standalone` or `cluster`, for `/admin/redis`.
    pub fn mode(&self) -> &'static str {
        match self {
            Conn::Single(_) => "standalone",
            Conn::Cluster(_) => "cluster",
        }
    }

    /// Every node's address (`host`, `port`) from `CLUSTER SLOTS`, masters
    /// and replicas alike, in the order Redis lists them; empty for a
    /// single server. The caller bounds the time.
    pub async fn nodes(&self) -> redis::RedisResult<Vec<(String, u16)>> {
        let Conn::Cluster(c) = self else {
            return Ok(Vec::new());
        };
        let mut c = c.clone();
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut c)
            .await?;
        Ok(slot_nodes(&reply))
    }
}

impl Conn {
    /// Sends `cmds` (whose keys share one slot) and returns their replies
    /// in order: one pipeline to a single server; to a cluster, every
    /// command on its own, all at once on the same multiplexed
    /// connections. A cluster pipeline cannot follow `ASK` while its slot
    /// migrates (`ASKING` covers only the next command), so each command
    /// is redirected alone.
    pub async fn each<T: redis::FromRedisValue>(
        &self,
        cmds: Vec<Cmd>,
    ) -> redis::RedisResult<Vec<T>> {
        match self {
            Conn::Single(c) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                let mut c = c.clone();
                pipe.query_async::<Vec<T>>(&mut c).await
            }
            Conn::Cluster(_) => {
                // Through `Conn`, so that each goes with `ASKING`.
                let sent = cmds.into_iter().map(|cmd| {
                    let mut c = self.clone();
                    async move { cmd.query_async::<T>(&mut c).await }
                });
                futures_util::future::try_join_all(sent).await
            }
        }
    }
}

/// The commands this module sends with a key (so to one slot's node);
/// everything else (`PING`, `SCRIPT LOAD` to every master, `CLUSTER
/// SLOTS`, `INFO`) goes as it is.
const KEYED: &[&[u8]] = &[b"PTTL", b"GET", b"SET", b"DEL", b"EVALSHA", b"EVAL"];

fn keyed(cmd: &Cmd) -> bool {
    matches!(
        cmd.args_iter().next(),
        Some(redis::Arg::Simple(name)) if KEYED.iter().any(|k| name.eq_ignore_ascii_case(k))
    )
}

impl ConnectionLike for Conn {
    /// To a cluster, a keyed command goes as the pipeline `ASKING; cmd`
    /// (the reply to `ASKING` dropped). `ASKING` lets the next command
    /// through on a node importing the slot, and does nothing anywhere
    /// else. The cluster client follows an `ASK` redirection by sending
    /// `ASKING` and then the command as two writes on a connection that
    /// other tasks share, so another command can slip in between and use
    /// up the flag: the command bounces back as `MOVED` to the old owner,
    /// which answers `ASK` again, until the retries run out. Sent as one
    /// pipeline, `ASKING` and the command stay together on the wire.
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => {
                if !keyed(cmd) {
                    return c.req_packed_command(cmd);
                }
                Box::pin(async move {
                    let mut pipe = redis::pipe();
                    pipe.add_command(redis::cmd("ASKING"))
                        .add_command(cmd.clone());
                    let mut replies = c.req_packed_commands(&pipe, 1, 1).await?;
                    replies.pop().ok_or_else(|| {
                        redis::RedisError::from((redis::ErrorKind::Client, "no reply"))
                    })
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The node addresses in a `CLUSTER SLOTS` reply (`[[start, end, [host,
/// port, id, ..], ..], ..]`), each once. A node announcing an empty host
/// (or `?`) is skipped: it means "the node you asked", which the caller
/// already knows.
pub fn slot_nodes(reply: &Value) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = Vec::new();
    let Value::Array(ranges) = reply else {
        return out;
    };
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        for node in parts.iter().skip(2) {
            let Value::Array(fields) = node else { continue };
            let host = match fields.first() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Value::SimpleString(s)) => s.clone(),
                _ => continue,
            };
            let port = match fields.get(1) {
                Some(Value::Int(p)) => u16::try_from(*p).ok(),
                _ => None,
            };
            let Some(port) = port else { continue };
            if host.is_empty() || host == "?" {
                continue;
            }
            if !out.iter().any(|(h, p)| *h == host && *p == port) {
                out.push((host, port));
            }
        }
    }
    out
}

/// Whether the server at `client` runs in cluster mode (`INFO cluster`
/// reports `cluster_enabled:1`). A server that answers `INFO` with an
/// error (an ACL without it, a proxy that does not know it) is taken as
/// standalone.
///
/// # Errors
/// Connecting failed or timed out, or the connection broke.
pub async fn is_cluster(
    client: &redis::Client,
    limit: std::time::Duration,
) -> Result<bool, OpError> {
    let probe = async {
        let mut c = client.get_multiplexed_async_connection().await?;
        match redis::cmd("INFO")
            .arg("cluster")
            .query_async::<String>(&mut c)
            .await
        {
            Ok(info) => Ok(info.lines().any(|l| l.trim() == "cluster_enabled:1")),
            Err(e) if matches!(e.kind(), redis::ErrorKind::Server(_)) => Ok(false),
            Err(e) => Err(e),
        }
    };
    match tokio::time::timeout(limit, probe).await {
        Err(_) => Err(OpError::Timeout(
            u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
        )),
        Ok(Err(e)) => Err(OpError::Redis(e.to_string())),
        Ok(Ok(v)) => Ok(v),
    }
}

/// `info` on database 0, the only one a cluster has.
pub fn db0(info: &ConnectionInfo) -> ConnectionInfo {
    let settings = info.redis_settings().clone().set_db(0);
    info.clone().set_redis_settings(settings)
}

/// `info` with its address replaced by `host:port` (same TLS settings,
/// same credentials) on database 0: a client for one node of a cluster.
pub fn at_node(info: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match info.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    db0(info).set_addr(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn lists_each_node_of_a_cluster_slots_reply_once() {
        let node = |h: &str, p: i64| Value::Array(vec![bulk(h), Value::Int(p), bulk("id")]);
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("10.0.0.2", 7001),
            ]),
            Value::Array(vec![Value::Int(10923), Value::Int(16000), node("?", 7002)]),
            Value::Array(vec![
                Value::Int(16001),
                Value::Int(16383),
                node("10.0.0.1", 7000),
            ]),
        ]);
        assert_eq!(
            slot_nodes(&reply),
            vec![
                ("10.0.0.1".to_owned(), 7000),
                ("10.0.0.4".to_owned(), 7003),
                ("10.0.0.2".to_owned(), 7001),
            ]
        );
        assert!(slot_nodes(&Value::Nil).is_empty());
    }

    #[test]
    fn only_commands_with_a_key_go_with_asking() {
        for name in ["PTTL", "get", "SET", "DEL", "EVALSHA", "EVAL"] {
            assert!(keyed(&redis::cmd(name)), "{name}");
        }
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg("return 1");
        for cmd in [redis::cmd("PING"), load, redis::cmd("INFO")] {
            assert!(!keyed(&cmd));
        }
    }

    #[test]
    fn a_node_client_keeps_tls_and_credentials() {
        use redis::IntoConnectionInfo as _;
        let info = "rediss://cache.example.com:6380/3"
            .into_connection_info()
            .unwrap();
        let settings = info.redis_settings().clone().set_password("pw");
        let info = info.set_redis_settings(settings);
        let node = at_node(&info, "10.0.0.2", 15001);
        assert!(matches!(
            node.addr(),
            ConnectionAddr::TcpTls { host, port: 15001, insecure: false, .. } if host == "10.0.0.2"
        ));
        assert_eq!(node.redis_settings().password(), Some("pw"));
        assert_eq!(node.redis_settings().db(), 0);
    }
}
