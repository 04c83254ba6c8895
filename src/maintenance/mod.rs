//! Maintenance and operator tools: partition maintenance for kept sent messages, dead
//! letters, and blocked keys (per-key ordering). (What retention a table has is store configuration: `store/retention.rs`.)

pub(crate) mod dead_letters;
pub(crate) mod ordering;
pub(crate) mod partitions;
