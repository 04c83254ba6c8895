//! Maintenance and operator tools: looking at and re-queueing dead messages.

pub(crate) mod dead_letters;
