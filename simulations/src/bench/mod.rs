//! Benchmarks that print figures (`--json`), never timed assertions:
//! - [`coordinator`] — push and streamed-download throughput, coordinator peak RSS.
//! - [`agent`] — job-received → `before`-started latency with a cached plugin, and the
//!   agent's peak RSS while fetching plugins of growing size.
//! - [`mesh`] — a fleet fetching one plugin with and without the mesh: coordinator
//!   egress ÷ size, fleet time ÷ the physical bound, CPU per GiB.

pub mod agent;
pub mod coordinator;
pub mod mesh;
