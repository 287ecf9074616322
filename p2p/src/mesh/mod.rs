//! The mesh: agents fetching plugin chunks from each other.
//!
//! - [`bitfield`] — which chunks a peer holds, and its wire form.
//! - [`buffers`] — reused chunk buffers (no zeroed allocation per chunk).
//! - [`have`] — the `/arcade/have/1` protocol: chunk announcements and cancels.
//! - [`host`] — the libp2p host: transport, DHT, and serving/requesting chunks.
//! - [`protocol`] — the `/arcade/chunks/1` wire format and its limits.
//! - [`scheduler`] — the sans-IO swarm scheduler (which chunk from whom, when to fall
//!   back to the coordinator), driven by the agent runtime and by the simulator alike.
//! - [`limiter`] — the node-wide upload/download rate limiter and upload slots.
//! - [`ticket`] — coordinator-signed tickets that admit a peer to the mesh.
//! - [`tls`] — transport security: libp2p's TLS handshake with AES-GCM first.

pub mod bitfield;
pub mod buffers;
pub mod have;
pub mod host;
pub mod limiter;
pub mod protocol;
pub mod scheduler;
pub mod ticket;
pub mod tls;
