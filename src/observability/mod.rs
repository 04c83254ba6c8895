//! Observability: what is waiting in the outbox.

pub(crate) mod backlog;
