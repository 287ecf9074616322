//! The mesh: agents fetching plugin chunks from each other.
//!
//! - [`limiter`] — the node-wide upload/download rate limiter and upload slots.
//! - [`ticket`] — coordinator-signed tickets that admit a peer to the mesh.

pub mod limiter;
pub mod ticket;
