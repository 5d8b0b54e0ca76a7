//! `gatehouse db`: the PostgreSQL side. So far the wire-protocol codec
//! (`codec`), which frames and decodes what pooling and routing need and keeps
//! every frame's bytes so the rest can be forwarded untouched. The pooler and
//! router are built on it in later steps (see the issue tracker).

pub mod codec;
