//! The Arcade Mesh wire protocol: messages and gRPC services generated from the
//! `.proto` files under `proto/proto/arcade/v1/`.
//!
//! - `Agent` — what agents call: register, heartbeat, fetch jobs, report results,
//!   manifests and streamed chunk downloads.
//! - `Jobs` — job creation and inspection (admin).
//! - `PluginAdmin` — plugin push, list, get, enable/disable, delete (admin).
#![deny(rust_2018_idioms)]

/// Version 1 of the protocol (`arcade.v1`).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("arcade.v1");
}

/// Encoded `FileDescriptorSet` of every proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("arcade_descriptor");

/// The metadata key carrying `Bearer <token>` on every authenticated call.
pub const AUTHORIZATION: &str = "authorization";
