//! Maintenance and operator tools: partition maintenance for kept sent messages, and dead
//! letters. (What retention a table has is store configuration: `store/retention.rs`.)

pub(crate) mod dead_letters;
pub(crate) mod partitions;
