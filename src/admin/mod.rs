//! Looking at and tending a namespace from outside the group: `getErrors` (the drain), `status`,
//! `repair`, and the Prometheus metrics a copy serves.

pub mod errors;
pub mod metrics;
pub mod repair;
pub mod status;
