//! Compiles `proto/arcade/v1/*.proto` with protox (pure Rust, no system `protoc`) and
//! generates prost messages and tonic services. The encoded file descriptor set is kept
//! in `OUT_DIR` for gRPC server reflection.

use std::path::PathBuf;

use prost::Message as _;

const PROTOS: &[&str] = &[
    "proto/arcade/v1/content.proto",
    "proto/arcade/v1/agent.proto",
    "proto/arcade/v1/job.proto",
    "proto/arcade/v1/plugin.proto",
    "proto/arcade/v1/mesh.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("arcade_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // A chunk received from a peer is decoded as a slice of the read buffer
        // instead of a copy of it.
        .bytes(".arcade.v1.ChunkData.data")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
