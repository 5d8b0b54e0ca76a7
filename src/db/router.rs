//! Where a transaction goes. There is one node today, the primary, so every
//! transaction goes there. This is the one place that chooses: the session
//! asks once per transaction, before it takes a server connection, and the
//! replica router will answer here (by the statement, the client's last
//! write and each node's health and lag).

use crate::config::db::{DbConfig, Node};

/// What the session knows when a transaction starts.
#[derive(Debug, Clone, Copy)]
pub struct Transaction<'a> {
    pub database: &'a str,
}

/// The node for the next transaction.
pub fn pick_node<'c>(config: &'c DbConfig, _transaction: Transaction<'_>) -> &'c Node {
    &config.primary
}

/// The node pools are warmed against.
pub fn warm_node(config: &DbConfig) -> &Node {
    &config.primary
}
