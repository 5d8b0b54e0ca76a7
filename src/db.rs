//! `gatehouse db`: the PostgreSQL side. So far the wire-protocol codec
//! (`codec`), which frames and decodes what pooling and routing need and keeps
//! every frame's bytes so the rest can be forwarded untouched, and client
//! authentication (`auth`: SCRAM-SHA-256 and md5, server side). Its
//! configuration is `crate::config::db`. The pooler and router are built on
//! them in later steps (see the issue tracker).

pub mod auth;
pub mod codec;
pub mod server;
