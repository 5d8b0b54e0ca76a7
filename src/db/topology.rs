//! The nodes as they are now, observed rather than configured: every
//! `router.topology_interval`, each node is asked over a small connection of
//! gatehouse's own whether it is in recovery, how far its WAL goes (written
//! on a primary, replayed on a replica), how old its last replayed
//! transaction is, its timeline and whether it is streaming. From the
//! answers: which node is the primary (the one not in recovery; of two, the
//! higher timeline), and how far each replica is behind it. Each round is
//! published as a [`Snapshot`] that sessions read without a lock.
//!
//! A node's circuit breaker ([`Health`]) is shared by the monitor and the
//! sessions: `failures_to_ban` consecutive connect or query failures open
//! it for `ban_time`; the next poll after that is the half-open probe, and
//! closes it when it succeeds.
//!
//! With one node there is nothing to discover: it is the primary, and the
//! poll only says whether it can be reached.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};

use super::server::{Login, ServerConn, ServerError};
use crate::config::db::{DbConfig, Node};

/// What a node is, as last observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Never answered.
    Unknown,
    Primary,
    Replica,
    /// Claims to be a primary while another (on a higher timeline) is:
    /// gets nothing.
    Refused,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Unknown => "unknown",
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Refused => "refused",
        }
    }
}

/// A node's circuit breaker, kept across snapshots and reloads.
#[derive(Debug, Default)]
pub struct Health {
    failures: AtomicU32,
    /// Milliseconds since the topology's epoch until which it is banned;
    /// 0 = closed.
    banned_until: AtomicU64,
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Closed,
    Open,
    /// The ban is over; the next poll decides.
    HalfOpen,
}

impl Circuit {
    pub fn name(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half_open",
        }
    }
}

/// One node in a snapshot.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub node: Arc<Node>,
    pub weight: u32,
    pub health: Arc<Health>,
    pub role: Role,
    /// The last poll reached it.
    pub up: bool,
    /// WAL written (primary) or replayed (replica), at the last poll.
    pub lsn: u64,
    /// How far behind the primary, for a replica.
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub timeline: Option<u32>,
    /// False for a replica that is not streaming from the primary's
    /// timeline (a replica left behind by a failover); `None` when the
    /// monitor's role may not see it.
    pub streaming: Option<bool>,
}

/// The nodes as the last round saw them.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub nodes: Vec<NodeView>,
    pub primary: Option<usize>,
    /// The primary's WAL position at the last poll that reached it.
    pub primary_lsn: u64,
    /// Rounds published so far.
    pub round: u64,
}

impl Snapshot {
    pub fn index_of(&self, node: &Node) -> Option<usize> {
        self.nodes.iter().position(|n| *n.node == *node)
    }
}

/// The shared view of the nodes, and the means to ask for a fresh one.
pub struct Topology {
    snapshot: ArcSwap<Snapshot>,
    published: watch::Sender<u64>,
    recheck: Notify,
    epoch: Instant,
    /// Breakers by node, across reloads.
    health: std::sync::Mutex<HashMap<Node, Arc<Health>>>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            published: watch::channel(0).0,
            recheck: Notify::new(),
            epoch: Instant::now(),
            health: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

impl Topology {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Poll every node now rather than at the next interval: a primary
    /// refused a write as read-only, or could not be reached.
    pub fn recheck(&self) {
        self.recheck.notify_one();
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    pub fn circuit(&self, health: &Health) -> Circuit {
        match health.banned_until.load(Ordering::Relaxed) {
            0 => Circuit::Closed,
            until if self.now_ms() < until => Circuit::Open,
            _ => Circuit::HalfOpen,
        }
    }

    /// A connect or query failure on `node`: the breaker opens after
    /// `failures_to_ban` in a row, and again after a failed probe.
    pub fn failed(&self, health: &Health, node: &Node, config: &DbConfig) {
        let failures = health.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < config.router.failures_to_ban || self.circuit(health) == Circuit::Open {
            return;
        }
        let ban = u64::try_from(config.router.ban_time.as_millis()).unwrap_or(u64::MAX);
        let was = health
            .banned_until
            .swap(self.now_ms().saturating_add(ban), Ordering::Relaxed);
        if was == 0 {
            tracing::warn!(node = %node, failures, ban = ?config.router.ban_time, "node failing: circuit open");
        }
    }

    /// A success on `node`: the failure count starts again, and a
    /// half-open breaker closes.
    pub fn succeeded(&self, health: &Health, node: &Node) {
        health.failures.store(0, Ordering::Relaxed);
        if self.circuit(health) == Circuit::HalfOpen {
            health.banned_until.store(0, Ordering::Relaxed);
            tracing::info!(node = %node, "node answering again: circuit closed");
        }
    }

    fn health_of(&self, node: &Node) -> Arc<Health> {
        let mut known = self.health.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(known.entry(node.clone()).or_default())
    }

    /// Wait until a round names a primary, at most until `deadline`.
    pub async fn primary_by(
        &self,
        deadline: tokio::time::Instant,
    ) -> Option<(usize, Arc<Snapshot>)> {
        let mut rounds = self.published.subscribe();
        loop {
            let snapshot = self.snapshot();
            if let Some(primary) = snapshot.primary.filter(|p| snapshot.nodes[*p].up) {
                return Some((primary, snapshot));
            }
            self.recheck();
            if tokio::time::timeout_at(deadline, rounds.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Wait for the next round to be published, at most `timeout`.
    pub async fn next_round(&self, timeout: Duration) {
        let mut rounds = self.published.subscribe();
        let _ = tokio::time::timeout(timeout, rounds.changed()).await;
    }

    fn publish(&self, snapshot: Snapshot) {
        let round = snapshot.round;
        self.snapshot.store(Arc::new(snapshot));
        self.published.send_replace(round);
    }
}

/// One node's answer to a poll.
#[derive(Debug, Clone)]
struct Observation {
    in_recovery: bool,
    lsn: u64,
    /// Seconds since the last replayed transaction committed (replicas).
    replay_age: Option<f64>,
    timeline: Option<u32>,
    /// Whether a WAL receiver runs; its status and timeline when visible.
    receiver: bool,
    receiver_status: Option<String>,
    receiver_timeline: Option<u32>,
}

/// One round trip: role, WAL position, replay age, timeline, receiver.
const POLL: &str = "SELECT pg_is_in_recovery(), \
    CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END, \
    extract(epoch FROM now() - pg_last_xact_replay_timestamp()), \
    CASE WHEN pg_is_in_recovery() THEN NULL \
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
    (SELECT count(*) FROM pg_stat_wal_receiver), \
    (SELECT status FROM pg_stat_wal_receiver), \
    (SELECT received_tli FROM pg_stat_wal_receiver)";

/// `16/B374D848` as a number.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

/// WAL pages (`XLOG_BLCKSZ`) and the longest page header.
const WAL_PAGE: u64 = 8192;
const WAL_PAGE_HEADER: u64 = 40;

/// A primary's insert position as a replica's replay position will show
/// it: when the last record ended at a page boundary, the insert position
/// is already past the next page's header, which no replica replays.
pub fn replayable(lsn: u64) -> u64 {
    if lsn % WAL_PAGE <= WAL_PAGE_HEADER {
        lsn - lsn % WAL_PAGE
    } else {
        lsn
    }
}

fn observation(row: &[Option<String>]) -> Option<Observation> {
    let text = |i: usize| row.get(i).and_then(Option::as_deref);
    Some(Observation {
        in_recovery: text(0)? == "t",
        lsn: text(1).and_then(parse_lsn).map_or(0, replayable),
        replay_age: text(2).and_then(|s| s.parse().ok()),
        timeline: text(3).and_then(|s| s.parse().ok()),
        receiver: text(4).is_some_and(|n| n != "0"),
        receiver_status: text(5).map(str::to_string),
        receiver_timeline: text(6).and_then(|s| s.parse().ok()),
    })
}

/// Who the monitor logs in as.
#[derive(Clone)]
struct MonitorLogin {
    user: String,
    password: Option<String>,
    database: String,
}

fn monitor_login(config: &DbConfig) -> MonitorLogin {
    let user = config
        .users
        .iter()
        .find(|u| u.name == config.router.monitor_user)
        .or_else(|| config.users.first());
    let database = if config.router.monitor_database.is_empty() {
        config
            .databases
            .iter()
            .find(|d| config.lists(&d.name))
            .map_or_else(|| "postgres".to_string(), |d| d.name.clone())
    } else {
        config.router.monitor_database.clone()
    };
    MonitorLogin {
        user: user.map(|u| u.name.clone()).unwrap_or_default(),
        password: user.and_then(|u| u.server_password.clone()),
        database,
    }
}

/// What a poll found.
enum Polled {
    Answered(Observation),
    /// Reached, but the login or the query was refused: up, role unknown.
    Refused(String),
    Unreachable(String),
}

async fn poll(
    node: Arc<Node>,
    conn: Option<ServerConn>,
    login: MonitorLogin,
    timeout: Duration,
) -> (Arc<Node>, Option<ServerConn>, Polled) {
    let attempt = async {
        let mut conn = match conn {
            Some(conn) if conn.is_usable() => conn,
            _ => {
                let login = Login {
                    user: &login.user,
                    database: &login.database,
                    password: login.password.as_deref(),
                    params: &[],
                };
                ServerConn::open(&node, &login, timeout).await?
            }
        };
        let row = conn.query_row(POLL).await?;
        Ok::<_, ServerError>((conn, row))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok((conn, Some(row)))) => match observation(&row) {
            Some(found) => (node, Some(conn), Polled::Answered(found)),
            None => (node, None, Polled::Refused("an unexpected answer".into())),
        },
        Ok(Ok((_, None))) => (node, None, Polled::Refused("no row".into())),
        Ok(Err(ServerError::Refused { sqlstate, message })) => (
            node,
            None,
            Polled::Refused(format!("{message} ({sqlstate})")),
        ),
        Ok(Err(
            e @ (ServerError::Connect { .. } | ServerError::Timeout(_) | ServerError::Io(_)),
        )) => (node, None, Polled::Unreachable(e.to_string())),
        // It answered, but not as asked (no password for the monitor's
        // user, an authentication it does not offer): reached.
        Ok(Err(e)) => (node, None, Polled::Refused(e.to_string())),
        Err(_) => (node, None, Polled::Unreachable("timed out".into())),
    }
}

/// Poll every node each interval (or at once when asked) and publish what
/// was found, until the process ends.
pub async fn monitor(shared: Arc<super::DbShared>) {
    let topology = &shared.topology;
    let mut conns: HashMap<Arc<Node>, ServerConn> = HashMap::new();
    let mut previous: HashMap<Node, (Role, bool)> = HashMap::new();
    let mut last_primary: Option<Node> = None;
    let mut conflict_logged: Option<Vec<String>> = None;
    let mut refusal_logged: HashMap<Node, String> = HashMap::new();
    let mut round = 0u64;
    // The primary's WAL position at each round, for how long ago it was
    // where a replica is now.
    let mut history: std::collections::VecDeque<(Instant, u64)> = Default::default();
    loop {
        let config = shared.config.load_full();
        let login = monitor_login(&config);
        let timeout = config
            .router
            .topology_interval
            .max(Duration::from_secs(1))
            .min(config.pool.connect_timeout);
        let mut polls = tokio::task::JoinSet::new();
        for weighted in &config.nodes {
            let conn = conns.remove(&weighted.node);
            polls.spawn(poll(
                Arc::clone(&weighted.node),
                conn,
                login.clone(),
                timeout,
            ));
        }
        conns.clear();
        let mut found: HashMap<Arc<Node>, Polled> = HashMap::new();
        while let Some(joined) = polls.join_next().await {
            if let Ok((node, conn, polled)) = joined {
                if let Some(conn) = conn {
                    conns.insert(Arc::clone(&node), conn);
                }
                found.insert(node, polled);
            }
        }
        round += 1;
        let old = topology.snapshot();
        let mut snapshot = Snapshot {
            nodes: Vec::with_capacity(config.nodes.len()),
            primary: None,
            primary_lsn: old.primary_lsn,
            round,
        };
        let mut observations: Vec<Option<Observation>> = Vec::new();
        for weighted in &config.nodes {
            let health = topology.health_of(&weighted.node);
            let polled = found.remove(&weighted.node);
            let was = old.index_of(&weighted.node).map(|i| &old.nodes[i]);
            let (up, observed) = match polled {
                Some(Polled::Answered(o)) => {
                    refusal_logged.remove(&*weighted.node);
                    (true, Some(o))
                }
                Some(Polled::Refused(why)) => {
                    // With one node its role is known: nothing to say.
                    if config.nodes.len() > 1 && refusal_logged.get(&*weighted.node) != Some(&why) {
                        tracing::error!(node = %weighted.node, user = %login.user, database = %login.database, reason = %why,
                            "the topology monitor cannot ask this node its role (see router.monitor_user)");
                        refusal_logged.insert((*weighted.node).clone(), why);
                    }
                    (true, None)
                }
                Some(Polled::Unreachable(why)) => {
                    tracing::debug!(node = %weighted.node, reason = %why, "node not reached");
                    (false, None)
                }
                None => (false, None),
            };
            if up {
                topology.succeeded(&health, &weighted.node);
            } else {
                topology.failed(&health, &weighted.node, &config);
            }
            let role = match &observed {
                Some(o) if o.in_recovery => Role::Replica,
                Some(_) => Role::Primary,
                None => was.map_or(Role::Unknown, |w| w.role),
            };
            snapshot.nodes.push(NodeView {
                node: Arc::clone(&weighted.node),
                weight: weighted.weight,
                health,
                role,
                up,
                lsn: observed
                    .as_ref()
                    .map_or(was.map_or(0, |w| w.lsn), |o| o.lsn),
                lag_bytes: None,
                lag_seconds: None,
                timeline: observed.as_ref().and_then(|o| o.timeline),
                streaming: None,
            });
            observations.push(observed);
        }
        choose_primary(
            &mut snapshot,
            &observations,
            last_primary.as_ref(),
            &mut conflict_logged,
        );
        if let Some(p) = snapshot.primary.filter(|p| observations[*p].is_some()) {
            history.push_back((Instant::now(), snapshot.nodes[p].lsn));
            // Enough to tell any lag up to ten minutes at one round a second.
            if history.len() > 600 {
                history.pop_front();
            }
        }
        measure_lag(&mut snapshot, &observations, &history);
        report_changes(&snapshot, &mut previous, &mut last_primary, &shared.metrics);
        record(&shared.metrics, &snapshot, topology);
        topology.publish(snapshot);
        tokio::select! {
            () = tokio::time::sleep(config.router.topology_interval) => {}
            () = topology.recheck.notified() => {
                // Not more often than every 100 ms, however often asked.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The primary: with one node, that node; else the node not in recovery,
/// and of several, the one on the highest timeline (the others are
/// refused and said so loudly). With none answering, none.
fn choose_primary(
    snapshot: &mut Snapshot,
    observations: &[Option<Observation>],
    last: Option<&Node>,
    conflict_logged: &mut Option<Vec<String>>,
) {
    if snapshot.nodes.len() == 1 {
        snapshot.nodes[0].role = Role::Primary;
        snapshot.primary = Some(0);
        if let Some(o) = &observations[0] {
            snapshot.primary_lsn = o.lsn;
        }
        return;
    }
    let claims: Vec<usize> = (0..snapshot.nodes.len())
        .filter(|i| observations[*i].as_ref().is_some_and(|o| !o.in_recovery))
        .collect();
    let rank = |i: usize| {
        (
            snapshot.nodes[i].timeline.unwrap_or(0),
            last.is_some_and(|l| *snapshot.nodes[i].node == *l),
            std::cmp::Reverse(i),
        )
    };
    let chosen = claims.iter().copied().max_by_key(|i| rank(*i));
    if claims.len() > 1 {
        let names: Vec<String> = claims
            .iter()
            .map(|i| {
                format!(
                    "{} (timeline {:?})",
                    snapshot.nodes[*i].node, snapshot.nodes[*i].timeline
                )
            })
            .collect();
        if conflict_logged.as_ref() != Some(&names) {
            tracing::error!(nodes = ?names, chosen = %chosen.map(|i| snapshot.nodes[i].node.to_string()).unwrap_or_default(),
                "SPLIT BRAIN: several nodes claim to be the primary; the highest timeline is used, the others get nothing");
            *conflict_logged = Some(names);
        }
    } else {
        *conflict_logged = None;
    }
    for i in claims.iter().copied().filter(|i| Some(*i) != chosen) {
        snapshot.nodes[i].role = Role::Refused;
    }
    // A primary that stopped answering is not one any more once another
    // is found; until then it is what it was.
    for (i, node) in snapshot.nodes.iter_mut().enumerate() {
        if node.role == Role::Primary && chosen.is_some_and(|c| c != i) && observations[i].is_none()
        {
            node.role = Role::Unknown;
        }
    }
    if let Some(primary) = chosen {
        snapshot.primary = Some(primary);
        if let Some(o) = &observations[primary] {
            snapshot.primary_lsn = o.lsn;
        }
        return;
    }
    // Nobody answered with a role (the monitor's login is refused, or
    // nothing has answered yet): the configured primary, if it is up.
    let answered = observations.iter().any(Option::is_some);
    if !answered && snapshot.nodes[0].up && snapshot.nodes[0].role != Role::Replica {
        snapshot.primary = Some(0);
        snapshot.nodes[0].role = Role::Primary;
    }
}

/// Each replica's distance behind the primary: bytes of WAL against the
/// primary's last known position, and seconds since its last replayed
/// commit while it is behind. With a primary on a known timeline, a
/// replica that is not streaming that timeline is left behind
/// (`streaming = Some(false)`).
fn measure_lag(
    snapshot: &mut Snapshot,
    observations: &[Option<Observation>],
    history: &std::collections::VecDeque<(Instant, u64)>,
) {
    let primary_timeline = snapshot
        .primary
        .filter(|p| snapshot.nodes[*p].up)
        .and_then(|p| snapshot.nodes[p].timeline);
    let primary_lsn = snapshot.primary_lsn;
    for (node, observed) in snapshot.nodes.iter_mut().zip(observations) {
        if node.role != Role::Replica {
            continue;
        }
        let Some(o) = observed else {
            continue;
        };
        let behind = primary_lsn.saturating_sub(o.lsn);
        node.lag_bytes = Some(behind);
        // Behind: since the first round at which the primary was past
        // where the replica is now (the oldest WAL it lacks is that old).
        node.lag_seconds = if behind == 0 {
            Some(0.0)
        } else {
            history
                .iter()
                .find(|(_, lsn)| *lsn > o.lsn)
                .map(|(at, _)| at.elapsed().as_secs_f64())
                .or(o.replay_age.map(|age| age.max(0.0)))
        };
        node.streaming = match (primary_timeline, o.receiver, &o.receiver_status) {
            (None, _, _) => None,
            (Some(_), false, _) => Some(false),
            // The monitor's role may not see the receiver's details.
            (Some(_), true, None) => None,
            (Some(timeline), true, Some(status)) => {
                Some(status == "streaming" && o.receiver_timeline.is_none_or(|t| t == timeline))
            }
        };
    }
}

/// Log role changes and count failovers.
fn report_changes(
    snapshot: &Snapshot,
    previous: &mut HashMap<Node, (Role, bool)>,
    last_primary: &mut Option<Node>,
    metrics: &super::metrics::DbMetrics,
) {
    for node in &snapshot.nodes {
        let now = (node.role, node.up);
        let before = previous.insert((*node.node).clone(), now);
        if before != Some(now) {
            if node.up {
                tracing::info!(node = %node.node, role = node.role.name(), "node up");
            } else {
                tracing::warn!(node = %node.node, role = node.role.name(), "node down");
            }
        }
    }
    match (snapshot.primary, last_primary.as_ref()) {
        (Some(p), Some(last)) if *snapshot.nodes[p].node != *last => {
            tracing::warn!(from = %last, to = %snapshot.nodes[p].node, "failover: a new primary");
            metrics.failovers.inc();
            *last_primary = Some((*snapshot.nodes[p].node).clone());
        }
        (Some(p), None) => {
            tracing::info!(primary = %snapshot.nodes[p].node, "primary found");
            *last_primary = Some((*snapshot.nodes[p].node).clone());
        }
        _ => {}
    }
}

/// The node gauges as a round of the monitor found them.
fn record(metrics: &super::metrics::DbMetrics, snapshot: &Snapshot, topology: &Topology) {
    for (i, node) in snapshot.nodes.iter().enumerate() {
        let label = node.node.to_string();
        let label = [label.as_str()];
        metrics
            .node_up
            .with_label_values(&label)
            .set(i64::from(node.up));
        metrics
            .node_primary
            .with_label_values(&label)
            .set(i64::from(snapshot.primary == Some(i)));
        let open = topology.circuit(&node.health) != Circuit::Closed;
        metrics
            .node_circuit_open
            .with_label_values(&label)
            .set(i64::from(open));
        match node.lag_bytes {
            Some(lag) => metrics
                .node_lag_bytes
                .with_label_values(&label)
                .set(i64::try_from(lag).unwrap_or(i64::MAX)),
            None => {
                let _ = metrics.node_lag_bytes.remove_label_values(&label);
            }
        }
        match node.lag_seconds.filter(|s| s.is_finite()) {
            Some(lag) => metrics.node_lag_seconds.with_label_values(&label).set(lag),
            None => {
                let _ = metrics.node_lag_seconds.remove_label_values(&label);
            }
        }
    }
    let reachable = snapshot.primary.is_some_and(|p| snapshot.nodes[p].up);
    metrics
        .primary_reachable
        .store(reachable, Ordering::Relaxed);
    metrics.primary_up.set(i64::from(reachable));
}

#[cfg(test)]
mod tests {
    use super::{parse_lsn, replayable};

    #[test]
    fn lsns_read_as_numbers() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("16"), None);
        assert_eq!(parse_lsn("x/1"), None);
        // Past a page header: the page boundary.
        assert_eq!(replayable(0x500_0028), 0x500_0000);
        assert_eq!(replayable(0x500_0018), 0x500_0000);
        assert_eq!(replayable(0x500_0000), 0x500_0000);
        assert_eq!(replayable(0x500_0100), 0x500_0100);
    }
}
