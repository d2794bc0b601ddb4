//! Stall and leak verdicts: pure functions of a connection's observed timings, the
//! thresholds and `now`. Each episode is reported once when it starts and once when it ends.
//!
//! Timings are from the client's point of view whatever the role: `to_server` is the last
//! time request bytes moved (the client's send, or the server's receive), `from_server` the
//! last time answer bytes moved. A request is outstanding when request bytes moved after the
//! last answer bytes; it is stalled when that has lasted `stall_after`. Measuring from the
//! last request bytes keeps COPY FROM STDIN (the client streams for a long time before the
//! server answers) and pipelines from looking stalled while the client is still sending.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use tracer_common::protocol::{TX_FAILED, TX_IDLE, TX_IN_TRANSACTION};

use crate::settings;

/// The SPEC's connection states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    Active,
    Idle,
    IdleInTransaction,
    IdleInTransactionAborted,
    CloseWait,
    Unknown,
}

impl ConnState {
    pub const ALL: [ConnState; 6] = [
        Self::Active,
        Self::Idle,
        Self::IdleInTransaction,
        Self::IdleInTransactionAborted,
        Self::CloseWait,
        Self::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Idle => "idle",
            Self::IdleInTransaction => "idle_in_transaction",
            Self::IdleInTransactionAborted => "idle_in_transaction_aborted",
            Self::CloseWait => "close_wait",
            Self::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeakReason {
    CloseWait,
    IdleInTransaction,
    Idle,
}

impl LeakReason {
    pub const ALL: [LeakReason; 3] = [Self::CloseWait, Self::IdleInTransaction, Self::Idle];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::CloseWait => "close_wait",
            Self::IdleInTransaction => "idle_in_transaction",
            Self::Idle => "idle",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::CloseWait => 0,
            Self::IdleInTransaction => 1,
            Self::Idle => 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub stall_after: Duration,
    pub idle_in_transaction_after: Duration,
    pub close_wait_after: Duration,
    pub idle_after: Duration,
}

impl Thresholds {
    /// How long `reason`'s condition must last to be a leak, ns.
    fn leak_after(&self, reason: LeakReason) -> u64 {
        let limit = match reason {
            LeakReason::CloseWait => self.close_wait_after,
            LeakReason::IdleInTransaction => self.idle_in_transaction_after,
            LeakReason::Idle => self.idle_after,
        };
        limit.as_nanos() as u64
    }
}

impl Default for Thresholds {
    /// The SPEC's defaults, written once in `settings`.
    fn default() -> Self {
        Self {
            stall_after: settings::DEFAULT_STALL_AFTER,
            idle_in_transaction_after: settings::DEFAULT_IDLE_IN_TRANSACTION_AFTER,
            close_wait_after: settings::DEFAULT_CLOSE_WAIT_AFTER,
            idle_after: settings::DEFAULT_IDLE_AFTER,
        }
    }
}

/// A state learned outside the protocol reader: a Postgres backend's process title at
/// start-up, or the state file a previous daemon left. It says what the state was at
/// `known_ns` (monotonic ns), and holds until traffic after that says otherwise; a
/// ReadyForQuery the kernel reads later replaces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seeded {
    /// `Active`, `Idle`, `IdleInTransaction` or `IdleInTransactionAborted`.
    pub state: ConnState,
    pub known_ns: u64,
}

impl Seeded {
    /// Still true given the traffic in `view`: an idle state ends with the next request
    /// bytes, a running query with the next answer bytes.
    fn holds(&self, view: &ConnView) -> bool {
        match self.state {
            ConnState::Active => view.from_server_ns <= self.known_ns,
            ConnState::Idle
            | ConnState::IdleInTransaction
            | ConnState::IdleInTransactionAborted => view.to_server_ns <= self.known_ns,
            ConnState::CloseWait | ConnState::Unknown => false,
        }
    }
}

/// What the detectors need to know of one connection (monotonic ns; 0 = never).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnView {
    /// When the connection began (or the lower bound for one found at start-up).
    pub born_ns: u64,
    pub to_server_ns: u64,
    pub from_server_ns: u64,
    /// ReadyForQuery status byte, 0 if none seen yet.
    pub tx_status: u8,
    /// The protocol cannot be read (TLS / GSS encryption).
    pub encrypted: bool,
    /// When the peer closed its side, if it did.
    pub peer_closed_ns: Option<u64>,
    /// The state known from outside the protocol stream, used while the kernel has read no
    /// ReadyForQuery.
    pub seeded: Option<Seeded>,
}

impl ConnView {
    pub fn outstanding(&self) -> bool {
        self.to_server_ns > self.from_server_ns
    }

    /// Last time any bytes moved (or the birth when none did).
    pub fn last_activity_ns(&self) -> u64 {
        self.to_server_ns.max(self.from_server_ns).max(self.born_ns)
    }

    pub fn state(&self) -> ConnState {
        if self.peer_closed_ns.is_some() {
            ConnState::CloseWait
        } else if self.outstanding() {
            ConnState::Active
        } else if let Some(state) = self.protocol_state() {
            state
        } else {
            match self.seeded {
                Some(seeded) if seeded.holds(self) => seeded.state,
                _ => ConnState::Unknown,
            }
        }
    }

    /// The state the kernel's protocol reader saw (its last ReadyForQuery), if it could read.
    fn protocol_state(&self) -> Option<ConnState> {
        if self.encrypted {
            return None;
        }
        match self.tx_status {
            TX_IDLE => Some(ConnState::Idle),
            TX_IN_TRANSACTION => Some(ConnState::IdleInTransaction),
            TX_FAILED => Some(ConnState::IdleInTransactionAborted),
            _ => None,
        }
    }

    /// What a later daemon may take over of the transaction state at `now`: the protocol
    /// reader's state while no request is in flight, else a seed that still holds.
    pub fn known_state(&self, now: u64) -> Option<Seeded> {
        if self.outstanding() {
            // The last status predates the request in flight; its answer will tell.
            return self.seeded.filter(|s| s.holds(self));
        }
        match self.protocol_state() {
            Some(state) => Some(Seeded {
                state,
                known_ns: now,
            }),
            None => self.seeded.filter(|s| s.holds(self)),
        }
    }

    /// The leak condition that holds now (regardless of thresholds), with its onset.
    fn leak_condition(&self) -> Option<(LeakReason, u64)> {
        match self.state() {
            ConnState::CloseWait => Some((LeakReason::CloseWait, self.peer_closed_ns.unwrap_or(0))),
            ConnState::IdleInTransaction | ConnState::IdleInTransactionAborted => {
                Some((LeakReason::IdleInTransaction, self.last_activity_ns()))
            }
            ConnState::Idle | ConnState::Unknown => {
                Some((LeakReason::Idle, self.last_activity_ns()))
            }
            ConnState::Active => None,
        }
    }
}

/// A verdict change to report.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Finding {
    Stall {
        waiting_s: f64,
    },
    StallEnd {
        waited_s: f64,
    },
    Leak {
        reason: LeakReason,
        age_s: f64,
        idle_s: f64,
    },
    LeakEnd {
        reason: LeakReason,
        lasted_s: f64,
    },
}

/// The episodes open on one connection: when each began (monotonic ns).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Episodes {
    stall_since: Option<u64>,
    leak_since: [Option<u64>; 3],
    /// The view the last `evaluate` judged, and the first time at which the same view can
    /// give another verdict: until then, with that view, `evaluate` has nothing to do. Most
    /// connections are quiet most ticks, so the tick judges only the few that moved or are
    /// due.
    judged: Option<(ConnView, u64)>,
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

impl Episodes {
    pub fn stalled(&self) -> bool {
        self.stall_since.is_some()
    }

    /// When the open stall began (monotonic ns), if one is open.
    pub fn stall_since(&self) -> Option<u64> {
        self.stall_since
    }

    /// The open leak verdicts with their onsets (monotonic ns).
    pub fn leaks(&self) -> Vec<(LeakReason, u64)> {
        LeakReason::ALL
            .into_iter()
            .filter_map(|r| Some((r, self.leak_since[r.index()]?)))
            .collect()
    }

    /// Episodes a previous daemon reported as open, so that their end can be reported.
    pub fn reported_before(stall_since: Option<u64>, leaks: &[(LeakReason, u64)]) -> Self {
        let mut episodes = Self {
            stall_since,
            ..Self::default()
        };
        for &(reason, since) in leaks {
            episodes.leak_since[reason.index()] = Some(since);
        }
        episodes
    }

    /// The open leak verdict, if any.
    pub fn leak(&self) -> Option<LeakReason> {
        LeakReason::ALL
            .into_iter()
            .find(|r| self.leak_since[r.index()].is_some())
    }

    /// Updates the episodes for `view` at `now`; returns what started or ended. `limits`
    /// must be the same on every call (the daemon's are fixed at start-up): the time an
    /// unchanged view is due again is worked out with them.
    pub fn evaluate(&mut self, view: &ConnView, now: u64, limits: &Thresholds) -> Vec<Finding> {
        if self
            .judged
            .is_some_and(|(judged, due_ns)| judged == *view && now < due_ns)
        {
            return Vec::new();
        }
        let findings = self.judge(view, now, limits);
        self.judged = Some((*view, self.due_ns(view, limits)));
        findings
    }

    /// When, with `view` unchanged, the next verdict can start: a request outstanding for
    /// `stall_after`, or a leak condition lasting its threshold. Everything else `judge`
    /// decides from the view alone, so it has already decided it.
    fn due_ns(&self, view: &ConnView, limits: &Thresholds) -> u64 {
        let mut due = u64::MAX;
        if self.stall_since.is_none() && view.outstanding() {
            due = view
                .to_server_ns
                .saturating_add(limits.stall_after.as_nanos() as u64);
        }
        if let Some((reason, onset)) = view.leak_condition()
            && self.leak_since[reason.index()].is_none()
        {
            due = due.min(onset.saturating_add(limits.leak_after(reason)));
        }
        due
    }

    /// `evaluate` without the shortcut.
    fn judge(&mut self, view: &ConnView, now: u64, limits: &Thresholds) -> Vec<Finding> {
        let mut findings = Vec::new();

        match self.stall_since {
            // Answer bytes arrived after the stalled request: over, even if the client has
            // already sent its next request (a busy connection is rarely idle at a tick).
            Some(since) if !view.outstanding() || view.from_server_ns > since => {
                self.stall_since = None;
                let answered = view.from_server_ns.max(since);
                findings.push(Finding::StallEnd {
                    waited_s: secs(answered - since),
                });
            }
            None if view.outstanding()
                && now.saturating_sub(view.to_server_ns)
                    >= limits.stall_after.as_nanos() as u64 =>
            {
                self.stall_since = Some(view.to_server_ns);
                findings.push(Finding::Stall {
                    waiting_s: secs(now - view.to_server_ns),
                });
            }
            _ => {}
        }

        let condition = view.leak_condition();
        for reason in LeakReason::ALL {
            let slot = &mut self.leak_since[reason.index()];
            let holds = condition.filter(|(r, _)| *r == reason);
            match (*slot, holds) {
                // Gone, or traffic moved the onset (the connection was used meanwhile).
                (Some(onset), None) => {
                    *slot = None;
                    findings.push(Finding::LeakEnd {
                        reason,
                        lasted_s: secs(now.saturating_sub(onset)),
                    });
                }
                (Some(onset), Some((_, current))) if current != onset => {
                    *slot = None;
                    findings.push(Finding::LeakEnd {
                        reason,
                        lasted_s: secs(current.saturating_sub(onset)),
                    });
                }
                (None, Some((_, onset)))
                    if now.saturating_sub(onset) >= limits.leak_after(reason) =>
                {
                    *slot = Some(onset);
                    findings.push(Finding::Leak {
                        reason,
                        age_s: secs(now.saturating_sub(view.born_ns)),
                        idle_s: secs(now.saturating_sub(view.last_activity_ns())),
                    });
                }
                _ => {}
            }
        }
        findings
    }

    /// The connection closed at `now`: every open episode ends.
    pub fn close(&mut self, view: &ConnView, now: u64) -> Vec<Finding> {
        self.judged = None;
        let mut findings = Vec::new();
        if let Some(since) = self.stall_since.take() {
            let answered = if view.outstanding() {
                now
            } else {
                view.from_server_ns.max(since)
            };
            findings.push(Finding::StallEnd {
                waited_s: secs(answered.saturating_sub(since)),
            });
        }
        for reason in LeakReason::ALL {
            if let Some(onset) = self.leak_since[reason.index()].take() {
                findings.push(Finding::LeakEnd {
                    reason,
                    lasted_s: secs(now.saturating_sub(onset)),
                });
            }
        }
        findings
    }
}

#[cfg(test)]
mod tests;
