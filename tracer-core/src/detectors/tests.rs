use super::*;

const S: u64 = 1_000_000_000;

fn limits() -> Thresholds {
    Thresholds {
        stall_after: Duration::from_secs(5),
        idle_in_transaction_after: Duration::from_secs(30),
        close_wait_after: Duration::from_secs(10),
        idle_after: Duration::from_secs(60),
    }
}

fn idle_view() -> ConnView {
    ConnView {
        born_ns: 100 * S,
        to_server_ns: 101 * S,
        from_server_ns: 102 * S,
        tx_status: TX_IDLE,
        ..ConnView::default()
    }
}

#[test]
fn states_follow_the_protocol_and_timings() {
    let mut v = idle_view();
    assert_eq!(v.state(), ConnState::Idle);
    v.tx_status = TX_IN_TRANSACTION;
    assert_eq!(v.state(), ConnState::IdleInTransaction);
    v.tx_status = TX_FAILED;
    assert_eq!(v.state(), ConnState::IdleInTransactionAborted);
    v.to_server_ns = 103 * S;
    assert_eq!(v.state(), ConnState::Active);
    v.encrypted = true;
    v.to_server_ns = 0;
    assert_eq!(v.state(), ConnState::Unknown);
    v.peer_closed_ns = Some(110 * S);
    assert_eq!(v.state(), ConnState::CloseWait);
    assert_eq!(ConnView::default().state(), ConnState::Unknown);
}

#[test]
fn stall_is_reported_once_then_ends_when_the_answer_arrives() {
    let mut e = Episodes::default();
    let mut v = idle_view();
    v.to_server_ns = 200 * S; // request sent, no answer
    assert!(e.evaluate(&v, 204 * S, &limits()).is_empty(), "not yet");
    assert_eq!(
        e.evaluate(&v, 205 * S, &limits()),
        vec![Finding::Stall { waiting_s: 5.0 }]
    );
    assert!(
        e.evaluate(&v, 206 * S, &limits()).is_empty(),
        "reported once"
    );
    assert!(e.stalled());
    v.from_server_ns = 209 * S;
    assert_eq!(
        e.evaluate(&v, 210 * S, &limits()),
        vec![Finding::StallEnd { waited_s: 9.0 }]
    );
    assert!(!e.stalled());
}

#[test]
fn a_client_still_streaming_copy_data_is_not_stalled() {
    let mut e = Episodes::default();
    let mut v = idle_view();
    for t in 200..230 {
        v.to_server_ns = t * S; // a send every second
        assert!(e.evaluate(&v, t * S + S / 2, &limits()).is_empty());
    }
}

#[test]
fn idle_in_transaction_leak_starts_after_the_threshold_and_ends_on_commit() {
    let mut e = Episodes::default();
    let mut v = idle_view();
    v.tx_status = TX_IN_TRANSACTION;
    assert!(e.evaluate(&v, 131 * S, &limits()).is_empty());
    let f = e.evaluate(&v, 132 * S, &limits());
    assert_eq!(
        f,
        vec![Finding::Leak {
            reason: LeakReason::IdleInTransaction,
            age_s: 32.0,
            idle_s: 30.0
        }]
    );
    assert_eq!(e.leak(), Some(LeakReason::IdleInTransaction));
    assert!(e.evaluate(&v, 140 * S, &limits()).is_empty());
    // COMMIT: a request, then ReadyForQuery 'I'.
    v.to_server_ns = 150 * S;
    v.from_server_ns = 150 * S + 1000;
    v.tx_status = TX_IDLE;
    assert_eq!(
        e.evaluate(&v, 151 * S, &limits()),
        vec![Finding::LeakEnd {
            reason: LeakReason::IdleInTransaction,
            lasted_s: 49.0
        }]
    );
    assert_eq!(e.leak(), None);
}

#[test]
fn close_wait_leak_ends_when_the_connection_closes() {
    let mut e = Episodes::default();
    let mut v = idle_view();
    v.peer_closed_ns = Some(200 * S);
    assert!(e.evaluate(&v, 209 * S, &limits()).is_empty());
    assert!(matches!(
        e.evaluate(&v, 210 * S, &limits())[..],
        [Finding::Leak {
            reason: LeakReason::CloseWait,
            ..
        }]
    ));
    assert_eq!(
        e.close(&v, 215 * S),
        vec![Finding::LeakEnd {
            reason: LeakReason::CloseWait,
            lasted_s: 15.0
        }]
    );
    assert!(e.close(&v, 216 * S).is_empty(), "ends once");
}

#[test]
fn healthy_patterns_never_leak_or_stall() {
    let mut e = Episodes::default();
    let mut v = idle_view();
    // Quick queries every 10 s for 10 minutes (idle limit is 60 s here).
    for i in 0..60u64 {
        let t = 200 * S + i * 10 * S;
        v.to_server_ns = t;
        v.from_server_ns = t + 2_000_000;
        assert!(e.evaluate(&v, t + 9 * S, &limits()).is_empty());
    }
    // LISTEN: notifications arrive, the client sends nothing.
    let mut listen = idle_view();
    for i in 0..50u64 {
        listen.from_server_ns = 300 * S + i * 20 * S;
        assert!(
            e.evaluate(&listen, listen.from_server_ns + S, &limits())
                .iter()
                .all(|f| !matches!(f, Finding::Stall { .. }))
        );
    }
}

#[test]
fn idle_leak_needs_the_long_threshold_and_traffic_ends_it() {
    let mut e = Episodes::default();
    let mut v = idle_view();
    assert!(e.evaluate(&v, 161 * S, &limits()).is_empty());
    assert!(matches!(
        e.evaluate(&v, 162 * S, &limits())[..],
        [Finding::Leak {
            reason: LeakReason::Idle,
            ..
        }]
    ));
    v.to_server_ns = 170 * S;
    v.from_server_ns = 170 * S + 1;
    assert_eq!(
        ended_leaks(&e.evaluate(&v, 171 * S, &limits())),
        [LeakReason::Idle]
    );
}

#[test]
fn stall_ends_when_an_answer_arrives_even_if_the_next_request_is_in_flight() {
    let mut e = Episodes::default();
    let mut v = idle_view();
    v.to_server_ns = 200 * S;
    v.from_server_ns = 199 * S;
    assert!(matches!(
        e.evaluate(&v, 205 * S, &limits())[..],
        [Finding::Stall { .. }]
    ));
    v.from_server_ns = 210 * S;
    v.to_server_ns = 210 * S + 100_000;
    assert_eq!(
        e.evaluate(&v, 211 * S, &limits()),
        vec![Finding::StallEnd { waited_s: 10.0 }]
    );
}

#[test]
fn stall_open_at_close_ends_with_the_close() {
    let mut e = Episodes::default();
    let mut v = idle_view();
    v.to_server_ns = 200 * S;
    e.evaluate(&v, 206 * S, &limits());
    assert_eq!(
        e.close(&v, 210 * S),
        vec![Finding::StallEnd { waited_s: 10.0 }]
    );
}

fn seeded(state: ConnState, known_ns: u64) -> Option<Seeded> {
    Some(Seeded { state, known_ns })
}

#[test]
fn a_seeded_state_holds_until_traffic_or_the_kernel_says_otherwise() {
    // Found at start-up (t = 100 s) with no timings: the title said idle in transaction.
    let mut v = ConnView {
        born_ns: 100 * S,
        seeded: seeded(ConnState::IdleInTransaction, 100 * S),
        ..ConnView::default()
    };
    assert_eq!(v.state(), ConnState::IdleInTransaction);
    // The verdict counts from the seed time (a lower bound) and needs the threshold.
    let mut e = Episodes::default();
    assert!(e.evaluate(&v, 129 * S, &limits()).is_empty());
    assert_eq!(
        e.evaluate(&v, 130 * S, &limits()),
        vec![Finding::Leak {
            reason: LeakReason::IdleInTransaction,
            age_s: 30.0,
            idle_s: 30.0
        }]
    );
    // A request after the seed: the seed no longer says anything (in flight: active).
    v.to_server_ns = 131 * S;
    assert_eq!(v.state(), ConnState::Active);
    v.from_server_ns = 131 * S + 1;
    assert_eq!(v.state(), ConnState::Unknown, "answered, status not read");
    // The kernel's ReadyForQuery replaces it.
    v.tx_status = TX_IDLE;
    assert_eq!(v.state(), ConnState::Idle);
    assert_eq!(
        ended_leaks(&e.evaluate(&v, 132 * S, &limits())),
        [LeakReason::IdleInTransaction]
    );
}

#[test]
fn a_seeded_running_query_ends_with_its_answer_and_notifications_keep_an_idle_seed() {
    let mut v = ConnView {
        born_ns: 100 * S,
        seeded: seeded(ConnState::Active, 100 * S),
        ..ConnView::default()
    };
    assert_eq!(v.state(), ConnState::Active);
    let mut e = Episodes::default();
    assert!(e.evaluate(&v, 1000 * S, &limits()).is_empty(), "never idle");
    v.from_server_ns = 101 * S;
    assert_eq!(v.state(), ConnState::Unknown);

    let mut listen = ConnView {
        born_ns: 100 * S,
        seeded: seeded(ConnState::Idle, 100 * S),
        ..ConnView::default()
    };
    listen.from_server_ns = 150 * S; // a NotificationResponse: no request, still idle
    assert_eq!(listen.state(), ConnState::Idle);
    // Encrypted: the kernel cannot read, the seed still tells.
    listen.encrypted = true;
    listen.tx_status = TX_IN_TRANSACTION;
    assert_eq!(listen.state(), ConnState::Idle);
}

#[test]
fn known_state_is_what_a_restarted_daemon_may_take_over() {
    let mut v = idle_view();
    v.tx_status = TX_IN_TRANSACTION;
    assert_eq!(
        v.known_state(200 * S),
        seeded(ConnState::IdleInTransaction, 200 * S)
    );
    v.to_server_ns = 199 * S; // a request in flight: its answer will say
    assert_eq!(v.known_state(200 * S), None);
    v.encrypted = true;
    v.to_server_ns = 0;
    assert_eq!(v.known_state(200 * S), None);
    v.seeded = seeded(ConnState::Idle, 150 * S);
    assert_eq!(v.known_state(200 * S), seeded(ConnState::Idle, 150 * S));
}

#[test]
fn episodes_reported_before_end_on_close() {
    let mut e =
        Episodes::reported_before(Some(90 * S), &[(LeakReason::IdleInTransaction, 100 * S)]);
    assert_eq!(e.leaks(), vec![(LeakReason::IdleInTransaction, 100 * S)]);
    assert_eq!(e.stall_since(), Some(90 * S));
    let v = ConnView {
        to_server_ns: 90 * S,
        ..ConnView::default()
    };
    assert_eq!(
        e.close(&v, 130 * S),
        vec![
            Finding::StallEnd { waited_s: 40.0 },
            Finding::LeakEnd {
                reason: LeakReason::IdleInTransaction,
                lasted_s: 30.0
            }
        ]
    );
}

/// The metrics index their per-state and per-reason counts by discriminant.
#[test]
fn the_vocabularies_list_every_value_in_declaration_order() {
    for (i, state) in ConnState::ALL.iter().enumerate() {
        assert_eq!(*state as usize, i, "{state:?}");
    }
    for (i, reason) in LeakReason::ALL.iter().enumerate() {
        assert_eq!(*reason as usize, i, "{reason:?}");
    }
}

/// The reasons of the leaks that `findings` end; any other finding fails the test.
fn ended_leaks(findings: &[Finding]) -> Vec<LeakReason> {
    let reason = |f: &Finding| match f {
        Finding::LeakEnd { reason, .. } => *reason,
        other => panic!("not a leak's end: {other:?}"),
    };
    findings.iter().map(reason).collect()
}

/// The shortcut never changes a verdict: over random views (few distinct values, so that
/// they repeat) and times, `evaluate` returns and keeps exactly what judging every call
/// does.
#[test]
fn skipping_an_unchanged_view_until_it_is_due_changes_no_verdict() {
    let limits = Thresholds {
        stall_after: Duration::from_secs(2),
        idle_in_transaction_after: Duration::from_secs(3),
        close_wait_after: Duration::from_secs(4),
        idle_after: Duration::from_secs(6),
    };
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut skipped = 0;
    for _ in 0..200 {
        let (mut cached, mut every) = (Episodes::default(), Episodes::default());
        let mut view = ConnView::default();
        let mut now = 0;
        for _ in 0..200 {
            now += next(3) * S / 2;
            match next(8) {
                0 => view.to_server_ns = now.saturating_sub(next(2) * S),
                1 => view.from_server_ns = now.saturating_sub(next(2) * S),
                2 => view.tx_status = [TX_IDLE, TX_IN_TRANSACTION, TX_FAILED, 0][next(4) as usize],
                3 => view.peer_closed_ns = [None, Some(now)][next(2) as usize],
                4 => view.seeded = seeded(ConnState::IdleInTransaction, now),
                _ => {}
            }
            let before = cached.judged;
            let got = cached.evaluate(&view, now, &limits);
            skipped += usize::from(cached.judged == before && before.is_some());
            let want = every.judge(&view, now, &limits);
            assert_eq!(got, want, "at {now} with {view:?}");
            assert_eq!(
                (cached.stall_since, cached.leak_since),
                (every.stall_since, every.leak_since),
                "at {now} with {view:?}"
            );
        }
    }
    assert!(
        skipped > 1000,
        "the shortcut was taken {skipped} times only"
    );
}
