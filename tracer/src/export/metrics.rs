//! Prometheus metrics: owns the registry (names, types and labels of the SPEC's "Metrics"
//! section) and the cap on connection label sets; [`crate::export::http`] serves them.
//!
//! Counters and the duration histogram move as connections open, stall and close. Every gauge
//! is rebuilt each tick from the full set of open connections ([`Metrics::set_open`]), so the
//! gauges cannot drift from the connection table, and the gauge series of a label set with no
//! open connection left disappear. Counter series stay (Prometheus semantics: a counter that
//! vanished and came back would look like a reset); the label-set cap is what bounds them.

use std::{
    borrow::Cow,
    sync::{Mutex, MutexGuard, PoisonError},
};

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder, core::Collector,
};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::model::{
    conn_table::ClosedBy,
    detectors::{ConnState, LeakReason},
};

/// The labels of every connection metric. No pid, port or conn_id: those are in events.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnLabels {
    /// `"client"` or `"server"`.
    pub role: &'static str,
    pub comm: String,
    /// Short (12-hex) container id, or `""` outside containers. See [`short_container_id`].
    pub container: String,
    /// `ip:port`, `[v6]:port` or the socket path.
    pub remote: String,
}

/// The labels of `pgconn_pooler_server_connections`: a pooler's server connection, its
/// state, and the client holding it (`""` each when none, or not on this host).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolerServerLabels {
    /// The pooler's `comm`.
    pub comm: String,
    pub state: &'static str,
    pub client_comm: String,
    /// Short container id of the client, or `""`.
    pub client_container: String,
    /// The client's IP as the pooler sees it, without port, or `""`.
    pub client_ip: String,
}

/// `comm` of the label set that connections beyond the label-set cap are folded into.
pub const OVERFLOW_COMM: &str = "~other";

impl ConnLabels {
    /// The label set that takes the connections of `role` once the cap is reached.
    pub fn overflow(role: &'static str) -> Self {
        Self {
            role,
            comm: OVERFLOW_COMM.to_owned(),
            container: String::new(),
            remote: String::new(),
        }
    }

    fn values(&self) -> [&str; 4] {
        [self.role, &self.comm, &self.container, &self.remote]
    }

    fn values_with<'a>(&'a self, extra: &'a str) -> [&'a str; 5] {
        [self.role, &self.comm, &self.container, &self.remote, extra]
    }
}

/// The `container` label value for a full container id (`None` outside containers): the
/// 12-character short form `docker ps` and `crictl ps` show.
pub fn short_container_id(full: Option<&str>) -> String {
    match full {
        Some(id) => id.get(..12).unwrap_or(id).to_owned(),
        None => String::new(),
    }
}

pub const LOSS_WHERE: [&str; 4] = ["kernel_ring", "kernel_table", "user_queue", "decode"];

/// Connection lifetimes span from a failed handshake (milliseconds) to pooled connections that
/// live for days; the buckets cover that range with one bucket per order of magnitude or
/// operational step (minute, 5 min, 15 min, hour, ...).
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 43_200.0, 86_400.0,
];

const CONN_LABEL_NAMES: [&str; 4] = ["role", "comm", "container", "remote"];

/// One open connection as the detectors see it at a tick.
pub struct ConnSnapshot<'a> {
    pub labels: &'a ConnLabels,
    pub state: ConnState,
    pub age_s: f64,
    pub idle_s: f64,
    pub stalled: bool,
    /// While a leak verdict holds.
    pub leak_reason: Option<LeakReason>,
}

/// Which label sets may appear, and which have gauge series right now.
struct LabelSets {
    max: usize,
    /// Label sets that got in under the cap. Never shrinks: a label set's counters must not
    /// move to the overflow set half-way through its life.
    admitted: FxHashSet<ConnLabels>,
    /// Label sets (overflow sets included) whose gauge series the last `set_open` exported.
    exported: FxHashSet<ConnLabels>,
}

impl LabelSets {
    /// The label set a connection's samples go to, and whether it was folded into overflow.
    fn resolve<'l>(&mut self, labels: &'l ConnLabels) -> (Cow<'l, ConnLabels>, bool) {
        if self.admitted.contains(labels) {
            return (Cow::Borrowed(labels), false);
        }
        if self.admitted.len() < self.max {
            self.admitted.insert(labels.clone());
            return (Cow::Borrowed(labels), false);
        }
        (Cow::Owned(ConnLabels::overflow(labels.role)), true)
    }
}

/// Gauge values of one label set at a tick.
#[derive(Default)]
struct Aggregate {
    states: [i64; ConnState::ALL.len()],
    oldest_age_s: f64,
    max_idle_s: f64,
    stalled: i64,
    leaks: [i64; LeakReason::ALL.len()],
}

impl Aggregate {
    fn count(&mut self, conn: &ConnSnapshot<'_>) {
        self.states[conn.state as usize] += 1;
        self.oldest_age_s = self.oldest_age_s.max(seconds(conn.age_s));
        self.max_idle_s = self.max_idle_s.max(seconds(conn.idle_s));
        self.stalled += i64::from(conn.stalled);
        if let Some(reason) = conn.leak_reason {
            self.leaks[reason as usize] += 1;
        }
    }

    fn merge(&mut self, other: &Self) {
        for (total, n) in self.states.iter_mut().zip(other.states) {
            *total += n;
        }
        self.oldest_age_s = self.oldest_age_s.max(other.oldest_age_s);
        self.max_idle_s = self.max_idle_s.max(other.max_idle_s);
        self.stalled += other.stalled;
        for (total, n) in self.leaks.iter_mut().zip(other.leaks) {
            *total += n;
        }
    }
}

/// Every metric the tracer exports, in one registry.
pub struct Metrics {
    registry: Registry,
    counters: ConnCounters,
    gauges: ConnGauges,
    tracer: TracerMetrics,
    label_sets: Mutex<LabelSets>,
}

/// Connection metrics that move as connections open, stall and close.
struct ConnCounters {
    opened_total: IntCounterVec,
    closed_total: IntCounterVec,
    duration: HistogramVec,
    stalls_total: IntCounterVec,
    bytes_sent: IntCounterVec,
    bytes_received: IntCounterVec,
}

/// Connection gauges, rebuilt each tick by [`Metrics::set_open`].
struct ConnGauges {
    open_connections: IntGaugeVec,
    oldest_age: GaugeVec,
    max_idle: GaugeVec,
    stalled: IntGaugeVec,
    leak_suspected: IntGaugeVec,
}

/// The tracer's own health, and the pooler view.
struct TracerMetrics {
    events_lost: IntCounterVec,
    tracked: IntGauge,
    pooler_servers: IntGaugeVec,
    label_sets_overflow: IntCounter,
}

const STATIC_DEFINITION: &str = "static metric definitions are valid and registered once";

/// Creates metrics and registers them in one registry.
struct Registrar<'r>(&'r Registry);

impl Registrar<'_> {
    fn add<C: Collector + Clone + 'static>(&self, collector: Result<C, prometheus::Error>) -> C {
        let collector = collector.expect(STATIC_DEFINITION);
        self.0
            .register(Box::new(collector.clone()))
            .expect(STATIC_DEFINITION);
        collector
    }

    fn int_gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels))
    }

    fn gauges(&self, name: &str, help: &str) -> GaugeVec {
        self.add(GaugeVec::new(Opts::new(name, help), &CONN_LABEL_NAMES))
    }

    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels))
    }
}

fn conn_labels_and(extra: &'static str) -> [&'static str; 5] {
    let [role, comm, container, remote] = CONN_LABEL_NAMES;
    [role, comm, container, remote, extra]
}

/// Finite and not negative: `inf`/`NaN` would make the exposition invalid, and a negative age
/// can only come from a clock step.
fn seconds(value: f64) -> f64 {
    if value.is_finite() {
        value.max(0.0)
    } else {
        0.0
    }
}

impl ConnCounters {
    fn register(r: &Registrar<'_>) -> Self {
        Self {
            opened_total: r.counters(
                "pgconn_connections_opened_total",
                "Postgres connections opened (or found open at start-up).",
                &CONN_LABEL_NAMES,
            ),
            closed_total: r.counters(
                "pgconn_connections_closed_total",
                "Postgres connections closed, by who closed them.",
                &conn_labels_and("closed_by"),
            ),
            duration: r.add(HistogramVec::new(
                HistogramOpts::new(
                    "pgconn_connection_duration_seconds",
                    "Lifetime of closed Postgres connections.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &CONN_LABEL_NAMES,
            )),
            stalls_total: r.counters(
                "pgconn_stalls_total",
                "Requests that waited longer than stall-after for an answer.",
                &CONN_LABEL_NAMES,
            ),
            bytes_sent: r.counters(
                "pgconn_bytes_sent_total",
                "Payload bytes sent by the owning process, counted at close.",
                &CONN_LABEL_NAMES,
            ),
            bytes_received: r.counters(
                "pgconn_bytes_received_total",
                "Payload bytes received by the owning process, counted at close.",
                &CONN_LABEL_NAMES,
            ),
        }
    }
}

impl ConnGauges {
    fn register(r: &Registrar<'_>) -> Self {
        Self {
            open_connections: r.int_gauges(
                "pgconn_open_connections",
                "Open Postgres connections, by protocol state.",
                &conn_labels_and("state"),
            ),
            oldest_age: r.gauges(
                "pgconn_oldest_connection_age_seconds",
                "Age of the oldest open connection.",
            ),
            max_idle: r.gauges(
                "pgconn_max_idle_seconds",
                "Longest silence (no traffic either way) among open connections.",
            ),
            stalled: r.int_gauges(
                "pgconn_stalled_connections",
                "Open connections with a request waiting longer than stall-after for an answer.",
                &CONN_LABEL_NAMES,
            ),
            leak_suspected: r.int_gauges(
                "pgconn_leak_suspected_connections",
                "Open connections under a leak verdict, by reason.",
                &conn_labels_and("reason"),
            ),
        }
    }

    /// Drops the gauge series of a label set with no open connection left.
    #[allow(
        clippy::let_underscore_must_use,
        reason = "a series that is already gone is fine: removal is all that is wanted"
    )]
    fn remove(&self, labels: &ConnLabels) {
        for state in ConnState::ALL {
            let _ = self
                .open_connections
                .remove_label_values(&labels.values_with(state.as_str()));
        }
        for reason in LeakReason::ALL {
            let _ = self
                .leak_suspected
                .remove_label_values(&labels.values_with(reason.as_str()));
        }
        let values = labels.values();
        let _ = self.oldest_age.remove_label_values(&values);
        let _ = self.max_idle.remove_label_values(&values);
        let _ = self.stalled.remove_label_values(&values);
    }

    fn set(&self, labels: &ConnLabels, agg: &Aggregate) {
        for (state, count) in ConnState::ALL.iter().zip(agg.states) {
            self.open_connections
                .with_label_values(&labels.values_with(state.as_str()))
                .set(count);
        }
        for (reason, count) in LeakReason::ALL.iter().zip(agg.leaks) {
            self.leak_suspected
                .with_label_values(&labels.values_with(reason.as_str()))
                .set(count);
        }
        let values = labels.values();
        self.oldest_age
            .with_label_values(&values)
            .set(agg.oldest_age_s);
        self.max_idle.with_label_values(&values).set(agg.max_idle_s);
        self.stalled.with_label_values(&values).set(agg.stalled);
    }
}

impl TracerMetrics {
    fn register(r: &Registrar<'_>) -> Self {
        let events_lost = r.counters(
            "pgconn_tracer_events_lost_total",
            "Events the tracer dropped, by where they were lost.",
            &["where"],
        );
        // Losses are alerted on with rate(); the series must exist before the first loss.
        for location in LOSS_WHERE {
            events_lost.with_label_values(&[location]).inc_by(0);
        }
        Self {
            events_lost,
            tracked: r.add(IntGauge::new(
                "pgconn_tracer_tracked_connections",
                "Connections in the tracer's table.",
            )),
            pooler_servers: r.int_gauges(
                "pgconn_pooler_server_connections",
                "A pooler's connections to Postgres, by state and by the client holding them.",
                &[
                    "comm",
                    "state",
                    "client_comm",
                    "client_container",
                    "client_ip",
                ],
            ),
            label_sets_overflow: r.add(IntCounter::new(
                "pgconn_tracer_label_sets_overflow_total",
                "Connections folded into comm=\"~other\" because the label-set cap was reached.",
            )),
        }
    }
}

impl Metrics {
    /// Registers every metric. At most `max_label_sets` distinct [`ConnLabels`] appear on the
    /// connection metrics; the overflow sets (`comm="~other"`, one per role) come on top.
    pub fn new(max_label_sets: usize, version: &str) -> Self {
        let registry = Registry::new();
        let r = Registrar(&registry);
        let build_info = r.int_gauges(
            "pgconn_tracer_build_info",
            "Always 1; the tracer's version is in the label.",
            &["version"],
        );
        build_info.with_label_values(&[version]).set(1);
        Self {
            counters: ConnCounters::register(&r),
            gauges: ConnGauges::register(&r),
            tracer: TracerMetrics::register(&r),
            label_sets: Mutex::new(LabelSets {
                max: max_label_sets,
                admitted: FxHashSet::default(),
                exported: FxHashSet::default(),
            }),
            registry,
        }
    }

    fn label_sets(&self) -> MutexGuard<'_, LabelSets> {
        // The guarded sets stay consistent even if a holder panicked: keep going.
        self.label_sets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a connection that began or was found at start-up. A connection folded into the
    /// overflow label set is counted in `pgconn_tracer_label_sets_overflow_total` here, once.
    pub fn connection_opened(&self, labels: &ConnLabels) {
        let (labels, folded) = self.label_sets().resolve(labels);
        if folded {
            self.tracer.label_sets_overflow.inc();
        }
        let values = labels.values();
        self.counters.opened_total.with_label_values(&values).inc();
        // Create the series now so rate() sees the first increment.
        self.counters
            .bytes_sent
            .with_label_values(&values)
            .inc_by(0);
        self.counters
            .bytes_received
            .with_label_values(&values)
            .inc_by(0);
        self.counters
            .stalls_total
            .with_label_values(&values)
            .inc_by(0);
    }

    /// Counts a closed connection.
    pub fn connection_closed(
        &self,
        labels: &ConnLabels,
        closed_by: ClosedBy,
        duration_s: f64,
        bytes_sent: u64,
        bytes_received: u64,
    ) {
        let (labels, _) = self.label_sets().resolve(labels);
        let values = labels.values();
        self.counters
            .closed_total
            .with_label_values(&labels.values_with(closed_by.as_str()))
            .inc();
        self.counters
            .duration
            .with_label_values(&values)
            .observe(seconds(duration_s));
        self.counters
            .bytes_sent
            .with_label_values(&values)
            .inc_by(bytes_sent);
        self.counters
            .bytes_received
            .with_label_values(&values)
            .inc_by(bytes_received);
    }

    /// Counts a request that started to stall (`pgconn_stalls_total`).
    pub fn stall_started(&self, labels: &ConnLabels) {
        let (labels, _) = self.label_sets().resolve(labels);
        self.counters
            .stalls_total
            .with_label_values(&labels.values())
            .inc();
    }

    /// Replaces every gauge from the full set of open connections (called each tick):
    /// `pgconn_open_connections{state}` (every state, zeros included), oldest age, max idle,
    /// stalled, `pgconn_leak_suspected_connections{reason}` (every reason, zeros included) and
    /// `pgconn_tracer_tracked_connections`. Label sets absent from `snapshot` lose their gauge
    /// series.
    pub fn set_open(&self, snapshot: &[ConnSnapshot<'_>]) {
        // By address first: connections that share a label set share one `ConnLabels` (the
        // daemon keeps one copy per set), so each set's strings are hashed once, not once
        // per connection. Equal sets at different addresses meet again below.
        let mut by_address: FxHashMap<*const ConnLabels, (&ConnLabels, Aggregate)> =
            FxHashMap::default();
        for conn in snapshot {
            by_address
                .entry(std::ptr::from_ref(conn.labels))
                .or_insert_with(|| (conn.labels, Aggregate::default()))
                .1
                .count(conn);
        }
        let mut sets = self.label_sets();
        let mut current: FxHashMap<Cow<'_, ConnLabels>, Aggregate> = FxHashMap::default();
        for (labels, agg) in by_address.into_values() {
            let (labels, _) = sets.resolve(labels);
            current.entry(labels).or_default().merge(&agg);
        }

        sets.exported.retain(|labels| {
            let keep = current.contains_key(labels);
            if !keep {
                self.gauges.remove(labels);
            }
            keep
        });
        for (labels, agg) in &current {
            self.gauges.set(labels, agg);
            if !sets.exported.contains(labels.as_ref()) {
                sets.exported.insert(labels.as_ref().clone());
            }
        }
        self.tracer
            .tracked
            .set(i64::try_from(snapshot.len()).unwrap_or(i64::MAX));
    }

    /// Replaces `pgconn_pooler_server_connections` (called each tick). Its label sets are
    /// bounded by the poolers' server connections, so they need no cap.
    pub fn set_pooler_servers(&self, counts: &std::collections::HashMap<PoolerServerLabels, i64>) {
        self.tracer.pooler_servers.reset();
        for (l, count) in counts {
            self.tracer
                .pooler_servers
                .with_label_values(&[
                    l.comm.as_str(),
                    l.state,
                    &l.client_comm,
                    &l.client_container,
                    &l.client_ip,
                ])
                .set(*count);
        }
    }

    /// Counts dropped events; `location` is one of [`LOSS_WHERE`].
    pub fn events_lost(&self, location: &str, count: u64) {
        self.tracer
            .events_lost
            .with_label_values(&[location])
            .inc_by(count);
    }

    /// The text exposition format (version 0.0.4).
    pub fn try_render(&self) -> Result<String, prometheus::Error> {
        let mut text = String::new();
        TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text)?;
        Ok(text)
    }

    /// [`Self::try_render`], logging a failure and returning an empty text instead.
    pub fn render(&self) -> String {
        self.try_render().unwrap_or_else(|err| {
            log::error!("metrics: cannot render: {err}");
            String::new()
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
