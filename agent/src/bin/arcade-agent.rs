//! `arcade-agent` — see `arcade_agent::cli` and the README's CLI reference.
#![forbid(unsafe_code)]

/// mimalloc instead of glibc malloc: chunk buffers (up to a MiB each, allocated and
/// freed per chunk) made glibc return pages to the kernel and fault them in again,
/// zeroed, for every chunk — a quarter of the mesh's CPU (see p2p/src/mesh/DESIGN.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    arcade_agent::cli::main()
}
