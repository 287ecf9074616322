//! Benchmarks that print figures (`--json`), never timed assertions:
//! - [`coordinator`] — push and streamed-download throughput, coordinator peak RSS.
//! - [`agent`] — job-received → `before`-started latency with a cached plugin, and the
//!   agent's peak RSS while fetching plugins of growing size.
//! - [`control`] — the coordinator's control plane at fleet scale: jobs/s, create →
//!   lease latency, RPC latencies, CPU, RSS and store commits with N agents.
//! - [`delta`] — bytes a version bump costs for a real pair of files: whole, zstd,
//!   per-chunk zstd, fixed-chunk reuse, patches (build and apply times).
//! - [`primitives`] — manifest building, chunk and whole-content verification MB/s, and
//!   one peer → one peer mesh transfer over loopback (MB/s, CPU per GiB).
//!
//! Fleet figures (egress ÷ size, completion ÷ bound, CPU per GiB) come from
//! `arcade-sim swarm`/`model`/`sweep` ([`crate::fleet`]).

pub mod agent;
pub mod control;
pub mod coordinator;
pub mod delta;
pub mod primitives;
