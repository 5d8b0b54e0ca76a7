//! Where a transaction goes. The session asks once per transaction, before
//! it takes a server connection, with what the transaction's first
//! messages need ([`Want`]): the primary (a write, a transaction that may
//! write, `/* gatehouse:primary */`, a pinned session), or a read that a
//! replica may answer if it replayed the client's last write. The answer
//! comes from the topology monitor's last round (`topology.rs`): roles,
//! breakers and lag, read without a lock.

use std::sync::Arc;

use rand::Rng;

use super::topology::{Circuit, Role, Snapshot, Topology};
use crate::config::db::{DbConfig, Node};

/// Why a transaction went where it went (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A read a replica may answer.
    Read,
    /// A statement that needs the primary.
    Write,
    /// A transaction that starts with `BEGIN` (not read only).
    InTransaction,
    /// A read that no caught-up replica has replayed the client's last
    /// write for.
    ReadYourWrites,
    /// A read with no replica healthy and within `max_lag`.
    LagFallback,
    /// `/* gatehouse:primary */`, or a `<db>_primary` / `<db>_replica`
    /// database.
    Forced,
    /// A client pinned to its server connection.
    Session,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Read => "read",
            Reason::Write => "write",
            Reason::InTransaction => "in_transaction",
            Reason::ReadYourWrites => "read_your_writes",
            Reason::LagFallback => "lag_fallback",
            Reason::Forced => "forced",
            Reason::Session => "session",
        }
    }
}

/// What a transaction needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The primary, for this reason.
    Primary(Reason),
    /// A replica that replayed at least `after` (a WAL position), else the
    /// primary. `forced`: the client asked for replicas (`<db>_replica`).
    Read { after: u64, forced: bool },
    /// Any node, the primary first: a new client's greeting needs a
    /// server's parameters, and a client told `in_hot_standby = on` may
    /// take itself for a standby's (libpq's `target_session_attrs`).
    Greeting,
}

/// The node a transaction goes to.
#[derive(Debug, Clone)]
pub struct Choice {
    pub node: Arc<Node>,
    pub health: Option<Arc<super::topology::Health>>,
    pub replica: bool,
    pub reason: Reason,
}

/// A replica for a read that needs WAL up to `after`, by weight among those
/// that are up, have a closed breaker, stream from the primary's timeline
/// and are within `max_lag`; none of `excluded`.
pub fn replica(
    snapshot: &Snapshot,
    topology: &Topology,
    config: &DbConfig,
    after: u64,
    excluded: &[Arc<Node>],
) -> Option<usize> {
    let max_lag = config.router.max_lag.as_secs_f64();
    let eligible = |i: &usize| {
        let n = &snapshot.nodes[*i];
        n.role == Role::Replica
            && n.up
            && n.weight > 0
            && n.lsn >= after
            && n.streaming != Some(false)
            && n.lag_bytes
                .is_some_and(|lag| lag <= config.router.max_lag_bytes)
            && n.lag_seconds.is_none_or(|lag| lag <= max_lag)
            && topology.circuit(&n.health) == Circuit::Closed
            && !excluded.iter().any(|e| **e == *n.node)
    };
    let candidates: Vec<usize> = (0..snapshot.nodes.len()).filter(eligible).collect();
    let total: u64 = candidates
        .iter()
        .map(|i| u64::from(snapshot.nodes[*i].weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut ticket = rand::rng().random_range(0..total);
    for i in candidates {
        let weight = u64::from(snapshot.nodes[i].weight);
        if ticket < weight {
            return Some(i);
        }
        ticket -= weight;
    }
    None
}

/// Where a transaction that wants `want` goes now, without waiting: a
/// replica, or the primary as the snapshot knows it (`None` when there is
/// no primary and the transaction needs one).
pub fn choose(
    snapshot: &Snapshot,
    topology: &Topology,
    config: &DbConfig,
    want: Want,
    excluded: &[Arc<Node>],
) -> Option<Choice> {
    let on = |i: usize, replica: bool, reason: Reason| Choice {
        node: Arc::clone(&snapshot.nodes[i].node),
        health: Some(Arc::clone(&snapshot.nodes[i].health)),
        replica,
        reason,
    };
    let reason = match want {
        Want::Primary(reason) => reason,
        Want::Greeting => {
            if let Some(p) = snapshot.primary.filter(|p| snapshot.nodes[*p].up) {
                return Some(on(p, false, Reason::Session));
            }
            let i = replica(snapshot, topology, config, 0, excluded)?;
            return Some(on(i, true, Reason::Session));
        }
        Want::Read { after, forced } => {
            if let Some(i) = replica(snapshot, topology, config, after, excluded) {
                return Some(on(
                    i,
                    true,
                    if forced { Reason::Forced } else { Reason::Read },
                ));
            }
            if after > 0 && replica(snapshot, topology, config, 0, excluded).is_some() {
                Reason::ReadYourWrites
            } else {
                Reason::LagFallback
            }
        }
    };
    let primary = snapshot.primary?;
    Some(on(primary, false, reason))
}
