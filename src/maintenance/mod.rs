//! Maintenance and operator tools: retention of sent messages, partition maintenance, and
//! dead letters.

pub(crate) mod dead_letters;
pub(crate) mod partitions;
pub(crate) mod retention;
