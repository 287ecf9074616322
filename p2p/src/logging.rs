//! Log setup for the binaries: `tracing` to stderr, human-readable or one JSON object
//! per line, filtered by `RUST_LOG` (default `info`).

/// Installs the global subscriber (a second call is a no-op).
pub fn init(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
