//! Hot reload of the configuration file, on `SIGHUP` and by polling it.
//!
//! The poll reads the whole file every `CONFIG_POLL_MS` (default 2 s) and
//! compares a hash of its bytes with the configuration in use, rather than
//! watching file-system events: a Kubernetes-style `..data` symlink swap,
//! a rename over the file and an edit in place all change what a read
//! returns, while each of them fools some event watcher. Reading a small
//! file every two seconds costs nothing measurable.
//!
//! A new document is parsed and validated in full, and the new live state is
//! built, before anything changes; then it replaces the old one in a single
//! atomic swap ([`crate::proxy::Gateway::replace`]). Requests and streams
//! already running keep the state they started with; new requests use the
//! new one at once.
//!
//! What carries over, for every instance whose name and URL are unchanged:
//! cooldown, breaker, in-flight count, latency average, recent activity and
//! the stateful-object ids it holds. An instance whose URL changed starts
//! fresh. A removed instance takes no new request; those it is serving
//! finish (it shows as draining on the status page until then). The
//! upstream connection pools are kept.
//!
//! What cannot change without a restart: the listeners (addresses come from
//! flags and the environment, not the document), everything under `server`
//! and `upstream`, and `timeouts.connect_ms` (built into the connection
//! pools). When a new document changes those, one warning line names them
//! and the running values stay; the rest of the document is applied.
//!
//! A bad document leaves the running configuration alone, with one error
//! line naming the field, once per distinct content. Content the poll finds
//! invalid is reported only once the same bytes are read twice in a row, so
//! a file caught half-written by an editor is not reported as an error.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::config::{self, Config, InstanceConfig};
use crate::error::GatewayError;
use crate::log::rfc3339_ms;
use crate::proxy::Gateway;
use crate::select::{MAX_INSTANCES, Selector};
use crate::state::GatewayState;
use crate::status::{ConfigInfo, ReloadStatus};

/// Default time between two reads of the configuration file.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Instances that are new (by name and URL).
    pub added: Vec<String>,
    /// Instances that are gone; they drain.
    pub removed: Vec<String>,
    /// Instances kept with new settings (priority, weight, deployments or
    /// key); their live state carried over.
    pub changed: Vec<String>,
    /// Fields that differ from the running values but need a restart; the
    /// running values were kept.
    pub restart_needed: Vec<&'static str>,
}

/// The fields of `next` that differ from `running` and cannot change while
/// the process runs.
pub fn restart_only_changes(running: &Config, next: &Config) -> Vec<&'static str> {
    let (a, b) = (&running.server, &next.server);
    let (ua, ub) = (&running.upstream, &next.upstream);
    [
        (
            a.max_connections != b.max_connections,
            "server.max_connections",
        ),
        (
            a.header_read_timeout != b.header_read_timeout,
            "server.header_read_timeout_ms",
        ),
        (
            a.keep_alive_timeout != b.keep_alive_timeout,
            "server.keep_alive_timeout_ms",
        ),
        (a.max_headers != b.max_headers, "server.max_headers"),
        (a.drain_delay != b.drain_delay, "server.drain_delay_ms"),
        (
            a.shutdown_grace != b.shutdown_grace,
            "server.shutdown_grace_ms",
        ),
        (running.redis != next.redis, "redis"),
        (
            ua.extra_ca_file != ub.extra_ca_file,
            "upstream.extra_ca_file",
        ),
        (
            ua.pool_idle_timeout != ub.pool_idle_timeout,
            "upstream.pool_idle_timeout_ms",
        ),
        (
            ua.pool_max_idle_per_host != ub.pool_max_idle_per_host,
            "upstream.pool_max_idle_per_host",
        ),
        (
            running.timeouts.connect != next.timeouts.connect,
            "timeouts.connect_ms",
        ),
    ]
    .into_iter()
    .filter_map(|(differs, name)| differs.then_some(name))
    .collect()
}

fn settings_differ(a: &InstanceConfig, b: &InstanceConfig) -> bool {
    a.priority != b.priority
        || a.weight.to_bits() != b.weight.to_bits()
        || a.deployments != b.deployments
        || a.credential != b.credential
}

impl GatewayState {
    /// The state for `next`, carrying over this one's live state (see the
    /// module documentation). `self` is left as it is, for the requests
    /// still using it.
    ///
    /// # Errors
    /// More instances than supported, or a host/key that cannot be a header
    /// value: the reload is refused and nothing changes.
    pub fn reloaded(&self, mut next: Config) -> Result<(GatewayState, ReloadReport), GatewayError> {
        let mut report = ReloadReport {
            restart_needed: restart_only_changes(&self.config, &next),
            ..ReloadReport::default()
        };
        next.server = self.config.server;
        next.upstream = self.config.upstream.clone();
        next.timeouts.connect = self.config.timeouts.connect;
        if next.instances.len() > MAX_INSTANCES {
            return Err(GatewayError::TooManyInstances { max: MAX_INSTANCES });
        }
        // Entra ID credentials the running state already has keep their
        // cache (and token); new ones start fetching now.
        let caches =
            crate::state::token_caches(&next, &self.azure_env, &self.client, &self.backends)?;
        let entra = crate::state::entra_validator(
            &next,
            &self.azure_env,
            &self.client,
            self.entra.as_ref(),
        )?;
        // Old index → new index, for the instances that stay.
        let mut moved: Vec<Option<usize>> = vec![None; self.backends.len()];
        let mut backends = Vec::with_capacity(next.instances.len());
        for (i, c) in next.instances.iter().enumerate() {
            let previous = self
                .backends
                .iter()
                .position(|b| b.same_endpoint(c) && moved[b.index].is_none());
            let built = match previous {
                Some(j) => {
                    let old = &self.backends[j];
                    moved[j] = Some(i);
                    if settings_differ(&old.config, c) {
                        report.changed.push(c.name.clone());
                    }
                    Backend::carry_over(i, c.clone(), &next.circuit_breaker, old)
                }
                None => {
                    report.added.push(c.name.clone());
                    Backend::new(i, c.clone(), &next.circuit_breaker)
                }
            };
            let mut built =
                built.map_err(|field| GatewayError::InvalidHeader { index: i, field })?;
            built.token = caches[i].clone();
            backends.push(Arc::new(built));
        }
        let mut draining: Vec<Arc<Backend>> = self
            .draining
            .iter()
            .filter(|b| b.in_flight() > 0)
            .cloned()
            .collect();
        for (j, b) in self.backends.iter().enumerate() {
            if moved[j].is_none() {
                report.removed.push(b.name().to_owned());
                draining.push(Arc::clone(b));
            }
        }
        let affinity = self.affinity.remapped(|j| moved.get(j).copied().flatten());
        let selector = Selector::new(&backends);
        let open = self.client_key.is_none() && next.clients.is_empty();
        let any_principal = next.entra.as_ref().is_some_and(|e| e.allow_any_principal);
        let clients = crate::clients::Clients::with_principals(
            &next.clients,
            self.client_key.as_ref(),
            open,
            any_principal,
            &backends,
            Some(&self.clients),
        )
        .map_err(|e| GatewayError::Clients(e.to_string()))?;
        Ok((
            GatewayState {
                config: Arc::new(next),
                client_key: self.client_key.clone(),
                clients,
                backends,
                selector,
                client: self.client.clone(),
                client_h1: self.client_h1.clone(),
                upstream: Arc::clone(&self.upstream),
                clock: self.clock.clone(),
                affinity: Arc::new(affinity),
                draining,
                azure_env: self.azure_env.clone(),
                entra,
                rates: Arc::clone(&self.rates),
                // Tracing is process-wide: a reload keeps the exporter.
                tracing: self.tracing.clone(),
                // One connection per process: a changed `redis` block
                // applies at the next start.
                shared: self.shared.clone(),
            },
            report,
        ))
    }
}

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `SIGHUP` (or [`crate::server::ServerControl::reload`]).
    Signal,
    /// The periodic read found new content.
    Poll,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::Poll => "poll",
        }
    }
}

/// Reloads one configuration file into one gateway.
pub struct Reloader {
    path: PathBuf,
    gateway: Gateway,
    info: Arc<ArcSwap<ConfigInfo>>,
    /// Hash of the document in use.
    current: String,
    /// Hash of the last document rejected and reported.
    rejected: Option<String>,
    /// Hash of invalid content the poll saw once, not reported yet.
    unsettled: Option<String>,
    /// The last read error reported.
    read_error: Option<String>,
}

impl Reloader {
    /// A reloader of `path`, whose current content hashes to `current`.
    pub fn new(
        path: PathBuf,
        gateway: Gateway,
        info: Arc<ArcSwap<ConfigInfo>>,
        current: String,
    ) -> Self {
        Self {
            path,
            gateway,
            info,
            current,
            rejected: None,
            unsettled: None,
            read_error: None,
        }
    }

    /// Runs until `stop`: a reload on each `trigger` notification and, with
    /// `poll`, a read of the file at that interval.
    pub async fn run(
        mut self,
        trigger: Arc<Notify>,
        poll: Option<Duration>,
        stop: CancellationToken,
    ) {
        let mut ticker = poll.filter(|d| !d.is_zero()).map(|d| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            let tick = async {
                match &mut ticker {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                () = trigger.notified() => self.check(Trigger::Signal).await,
                () = tick => self.check(Trigger::Poll).await,
            }
        }
    }

    fn source(&self) -> String {
        format!("configuration file {}", self.path.display())
    }

    /// Reads the file and applies it if it changed and is valid.
    pub async fn check(&mut self, trigger: Trigger) {
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(b) => b,
            Err(e) => {
                let msg = format!("cannot read {}: {e}", self.source());
                if self.read_error.as_deref() != Some(msg.as_str()) {
                    self.reject(trigger, msg.clone());
                    self.read_error = Some(msg);
                }
                return;
            }
        };
        self.read_error = None;
        let hash = config::digest(&bytes);
        if hash == self.current {
            if trigger == Trigger::Signal {
                tracing::info!(
                    hash = %hash,
                    "SIGHUP: the configuration file is unchanged; nothing to reload"
                );
                count(OUTCOME_UNCHANGED);
            }
            self.unsettled = None;
            return;
        }
        if self.rejected.as_deref() == Some(hash.as_str()) {
            if trigger == Trigger::Signal {
                tracing::info!(
                    hash = %hash,
                    "SIGHUP: the configuration file still holds the document rejected before; keeping the running configuration"
                );
            }
            return;
        }
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|e| format!("{} is not UTF-8 text: {e}", self.source()))
            .and_then(|text| Config::from_json(text).map_err(|e| e.describe(&self.source())));
        let next = match parsed {
            Ok(c) => c,
            Err(msg) => {
                // A file caught half-written: wait for a second read of the
                // same bytes before calling it an error.
                if trigger == Trigger::Poll && self.unsettled.as_deref() != Some(hash.as_str()) {
                    self.unsettled = Some(hash);
                    return;
                }
                self.unsettled = None;
                self.rejected = Some(hash);
                self.reject(trigger, msg);
                return;
            }
        };
        self.unsettled = None;
        let running = self.gateway.state();
        match running.reloaded(next) {
            Ok((state, report)) => {
                self.gateway.replace(state);
                self.current = hash.clone();
                self.rejected = None;
                self.applied(trigger, &hash, &report);
            }
            Err(e) => {
                self.rejected = Some(hash);
                self.reject(trigger, format!("invalid configuration: {e}"));
            }
        }
    }

    fn generation(&self) -> u64 {
        self.info.load().generation
    }

    fn reject(&self, trigger: Trigger, msg: String) {
        let generation = self.generation();
        tracing::error!(
            trigger = trigger.as_str(),
            "configuration reload rejected, keeping generation {generation}: {msg}"
        );
        count(OUTCOME_REJECTED);
        let mut info = ConfigInfo::clone(&self.info.load());
        info.last_reload = Some(ReloadStatus {
            outcome: OUTCOME_REJECTED,
            at: rfc3339_ms(SystemTime::now()),
            trigger: trigger.as_str(),
            error: Some(msg),
            restart_needed: None,
        });
        self.info.store(Arc::new(info));
    }

    fn applied(&self, trigger: Trigger, hash: &str, report: &ReloadReport) {
        let previous = self.info.load_full();
        let generation = previous.generation + 1;
        let now = SystemTime::now();
        tracing::info!(
            trigger = trigger.as_str(),
            generation,
            hash,
            added = report.added.join(","),
            removed = report.removed.join(","),
            changed = report.changed.join(","),
            "configuration reloaded"
        );
        if !report.restart_needed.is_empty() {
            tracing::warn!(
                "configuration reload: {} cannot change while the process runs; the running values are kept until a restart",
                report.restart_needed.join(", ")
            );
        }
        count(OUTCOME_APPLIED);
        // A removed instance is no longer available; its series would
        // otherwise keep its last value for ever.
        for name in &report.removed {
            metrics::gauge!(crate::metrics::INSTANCE_AVAILABLE, "instance" => name.clone())
                .set(0.0);
        }
        let info = ConfigInfo {
            hash: hash.to_owned(),
            loaded_at: rfc3339_ms(now),
            generation,
            source: previous.source.clone(),
            last_reload: Some(ReloadStatus {
                outcome: OUTCOME_APPLIED,
                at: rfc3339_ms(now),
                trigger: trigger.as_str(),
                error: None,
                restart_needed: (!report.restart_needed.is_empty())
                    .then(|| report.restart_needed.clone()),
            }),
        };
        publish(&info, Some(&previous.hash), now);
        self.info.store(Arc::new(info));
    }
}

/// `outcome` of a reload that replaced the configuration.
pub const OUTCOME_APPLIED: &str = "applied";
/// `outcome` of a reload that kept the running configuration (bad or
/// unreadable document).
pub const OUTCOME_REJECTED: &str = "rejected";
/// `outcome` of a `SIGHUP` that found the file unchanged.
pub const OUTCOME_UNCHANGED: &str = "unchanged";

fn count(outcome: &'static str) {
    metrics::counter!(crate::metrics::CONFIG_RELOADS_TOTAL, "outcome" => outcome).increment(1);
}

/// Sets the configuration metrics for `info`, loaded at `at`; the series
/// of the `previous` hash drops to 0.
pub fn publish(info: &ConfigInfo, previous: Option<&str>, at: SystemTime) {
    if let Some(old) = previous.filter(|h| *h != info.hash) {
        metrics::gauge!(crate::metrics::CONFIG_INFO, "hash" => old.to_owned()).set(0.0);
    }
    metrics::gauge!(crate::metrics::CONFIG_INFO, "hash" => info.hash.clone()).set(1.0);
    metrics::gauge!(crate::metrics::CONFIG_GENERATION).set(info.generation as f64);
    let secs = at
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    metrics::gauge!(crate::metrics::CONFIG_LOADED_TIMESTAMP_SECONDS).set(secs);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Clock, Outcome};

    fn doc(instances: &[(&str, &str, u32)]) -> Config {
        let list: Vec<serde_json::Value> = instances
            .iter()
            .map(|(name, url, priority)| {
                serde_json::json!({"name": name, "url": url, "api_key": "k", "priority": priority})
            })
            .collect();
        Config::from_json(&serde_json::json!({ "instances": list }).to_string()).unwrap()
    }

    fn state(c: Config) -> GatewayState {
        GatewayState::new(Arc::new(c), None, Clock::new()).unwrap()
    }

    #[test]
    fn keeps_cooldown_breaker_and_in_flight_of_an_instance_with_the_same_name_and_url() {
        let s = state(doc(&[
            ("a", "http://127.0.0.1:1", 1),
            ("b", "http://127.0.0.1:2", 1),
        ]));
        let now = s.clock.now_ms();
        s.backends[0].cool_down(now, 60_000);
        for _ in 0..3 {
            s.backends[1].record_failure(now, false, &s.config.circuit_breaker);
        }
        let slot = s.backends[1].try_acquire(now);
        assert!(slot.is_none(), "breaker open");
        s.backends[0].count_attempt(Outcome::Throttled);

        // b moves first and gets a new priority; a stays.
        let (n, report) = s
            .reloaded(doc(&[
                ("b", "http://127.0.0.1:2", 2),
                ("a", "http://127.0.0.1:1", 1),
            ]))
            .unwrap();
        assert_eq!(report.changed, vec!["b".to_owned()]);
        assert!(report.added.is_empty() && report.removed.is_empty());
        let (b, a) = (&n.backends[0], &n.backends[1]);
        assert_eq!((b.index, a.index), (0, 1));
        assert_eq!(b.config.priority, 2);
        assert!(a.cooling_until(now).is_some(), "cooldown carried over");
        assert_eq!(
            b.breaker_state(now).as_str(),
            "open",
            "breaker carried over"
        );
        let throttled: u32 = a
            .activity()
            .history(crate::activity::history_now_ms())
            .iter()
            .map(|c| c.throttled)
            .sum();
        assert_eq!(throttled, 1, "activity carried over");
    }

    #[test]
    fn in_flight_counts_are_shared_with_the_old_generation() {
        let s = state(doc(&[("a", "http://127.0.0.1:1", 1)]));
        let now = s.clock.now_ms();
        let slot = s.backends[0].try_acquire(now).unwrap();
        let (n, _) = s.reloaded(doc(&[("a", "http://127.0.0.1:1", 1)])).unwrap();
        assert_eq!(n.backends[0].in_flight(), 1);
        // The request that started before the reload ends on the old one.
        drop(slot);
        assert_eq!(n.backends[0].in_flight(), 0);
    }

    #[test]
    fn a_new_url_is_a_new_instance_and_the_old_one_drains() {
        let s = state(doc(&[("a", "http://127.0.0.1:1", 1)]));
        let now = s.clock.now_ms();
        s.backends[0].cool_down(now, 60_000);
        let slot = s.backends[0].try_acquire(now + 60_001);
        let (n, report) = s.reloaded(doc(&[("a", "http://127.0.0.1:9", 1)])).unwrap();
        assert_eq!(report.added, vec!["a".to_owned()]);
        assert_eq!(report.removed, vec!["a".to_owned()]);
        assert!(n.backends[0].cooling_until(now).is_none(), "fresh state");
        assert_eq!(n.draining.len(), 1);
        drop(slot);
        // A later reload forgets drained instances.
        let (m, _) = n.reloaded(doc(&[("a", "http://127.0.0.1:9", 1)])).unwrap();
        assert!(m.draining.is_empty());
    }

    #[test]
    fn moves_affinity_to_the_new_index_and_drops_removed_instances() {
        let s = state(doc(&[
            ("a", "http://127.0.0.1:1", 1),
            ("b", "http://127.0.0.1:2", 1),
        ]));
        s.affinity.remember("file-a", 0, 1);
        s.affinity.remember("file-b", 1, 1);
        let (n, _) = s.reloaded(doc(&[("b", "http://127.0.0.1:2", 1)])).unwrap();
        assert_eq!(n.affinity.get("file-b", 2), Some(0));
        assert_eq!(n.affinity.get("file-a", 2), None);
    }

    #[test]
    fn keeps_process_settings_and_names_them() {
        let s = state(doc(&[("a", "http://127.0.0.1:1", 1)]));
        let mut next = doc(&[("a", "http://127.0.0.1:1", 1)]);
        next.server.max_connections = 7;
        next.timeouts.connect = Duration::from_millis(5);
        next.timeouts.stream_idle = Duration::from_millis(6);
        let (n, report) = s.reloaded(next).unwrap();
        assert_eq!(
            report.restart_needed,
            vec!["server.max_connections", "timeouts.connect_ms"]
        );
        assert_eq!(
            n.config.server.max_connections,
            s.config.server.max_connections
        );
        assert_eq!(n.config.timeouts.connect, s.config.timeouts.connect);
        assert_eq!(
            n.config.timeouts.stream_idle,
            Duration::from_millis(6),
            "applied"
        );
    }

    #[test]
    fn refuses_too_many_instances_without_changing_anything() {
        let s = state(doc(&[("a", "http://127.0.0.1:1", 1)]));
        let many: Vec<(String, String)> = (0..=MAX_INSTANCES)
            .map(|i| (format!("i{i}"), format!("http://127.0.0.1:{}", 1000 + i)))
            .collect();
        let list: Vec<(&str, &str, u32)> = many
            .iter()
            .map(|(n, u)| (n.as_str(), u.as_str(), 1))
            .collect();
        assert!(s.reloaded(doc(&list)).is_err());
    }
}
