//! The mesh: agents fetching plugin chunks from each other.
//!
//! - [`ticket`] — coordinator-signed tickets that admit a peer to the mesh.

pub mod ticket;
