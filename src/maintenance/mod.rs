//! Maintenance: partition maintenance on a schedule ([`scheduler`]), for kept sent messages
//! and the inbox's duplicate window. The work itself, like every statement, is the backend's
//! (`store::postgres::partitions`, and the operator tools for dead letters and blocked keys
//! next to it); what retention a table has is store configuration (`store/retention.rs`).

pub(crate) mod scheduler;
