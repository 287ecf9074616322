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

/// Largest gRPC message either side needs to decode: a manifest of 2^20 chunks
/// (~35 MB) or a chunk of up to 64 MiB, with headroom.
pub const MAX_MESSAGE: usize = 80 << 20;

/// HTTP/2 stream receive window used by clients and the coordinator: a 1 MiB chunk
/// must not wait for a round of window updates per 64 KiB (the protocol default).
pub const STREAM_WINDOW: u32 = 4 << 20;
/// HTTP/2 connection receive window (several streams in flight).
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// TLS settings of a client (agent, `arcadectl`, tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM CA bundle that signed the coordinator's certificate (empty: the system roots).
    pub ca: std::path::PathBuf,
    /// PEM client certificate and key, for a coordinator that requires mutual TLS.
    pub cert: std::path::PathBuf,
    /// Its private key.
    pub key: std::path::PathBuf,
    /// Allow plaintext `http://` to a host that is not loopback.
    pub insecure: bool,
}

/// An endpoint that cannot be built: a bad URL, unreadable TLS files, or plaintext to a
/// remote host not explicitly allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointError(pub String);

impl std::fmt::Display for EndpointError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EndpointError {}

/// Whether `host` (from a URL) is a loopback name or address.
fn loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A client endpoint for `url` with the project's transport settings (connect timeout,
/// `TCP_NODELAY`, HTTP/2 keep-alive, receive windows sized for chunk traffic) and no
/// TLS files: `https://` verifies against the system roots; `http://` only to loopback.
pub fn client_endpoint(url: &str) -> Result<tonic::transport::Endpoint, EndpointError> {
    client_endpoint_with(url, &ClientTls::default())
}

/// [`client_endpoint`] with TLS settings: `https://` verifies the coordinator against
/// `tls.ca` (or the system roots) and presents `tls.cert` when given; `http://` to a
/// host that is not loopback is refused unless `tls.insecure`.
pub fn client_endpoint_with(
    url: &str,
    tls: &ClientTls,
) -> Result<tonic::transport::Endpoint, EndpointError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let bad = |reason: String| EndpointError(format!("coordinator URL {url:?}: {reason}"));
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
    let host = uri.host().unwrap_or_default().to_owned();
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| EndpointError(format!("tls {what} {}: {e}", path.display())))
    };
    match uri.scheme_str() {
        Some("https") => {
            let mut config = ClientTlsConfig::new().domain_name(host);
            config = if tls.ca.as_os_str().is_empty() {
                config.with_native_roots()
            } else {
                config.ca_certificate(Certificate::from_pem(read("ca", &tls.ca)?))
            };
            if !tls.cert.as_os_str().is_empty() {
                config = config.identity(Identity::from_pem(
                    read("cert", &tls.cert)?,
                    read("key", &tls.key)?,
                ));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| bad(e.to_string()))?;
        }
        Some("http") if tls.insecure || loopback_host(&host) => {}
        Some("http") => {
            return Err(bad(format!(
                "plaintext http:// to {host}, which is not loopback: use https:// or allow it with insecure = true"
            )));
        }
        _ => return Err(bad("the scheme must be http:// or https://".into())),
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_is_for_loopback_or_when_allowed() {
        for ok in [
            "http://127.0.0.1:1",
            "http://localhost:1",
            "http://[::1]:1",
            "https://h:1",
        ] {
            assert!(client_endpoint(ok).is_ok(), "{ok}");
        }
        let err = client_endpoint("http://10.0.0.1:50051").unwrap_err();
        assert!(err.0.contains("not loopback"), "{err}");
        let allowed = ClientTls {
            insecure: true,
            ..Default::default()
        };
        assert!(client_endpoint_with("http://10.0.0.1:50051", &allowed).is_ok());
        assert!(client_endpoint("ftp://h:1").is_err());
        let missing = ClientTls {
            ca: "/nonexistent/ca.pem".into(),
            ..Default::default()
        };
        assert!(
            client_endpoint_with("https://h:1", &missing)
                .unwrap_err()
                .0
                .contains("/nonexistent/ca.pem")
        );
    }
}

/// Client-side authentication: adds `authorization: Bearer <token>` to every call.
pub mod auth {
    use tonic::metadata::{Ascii, MetadataValue};

    /// A token that cannot travel as gRPC metadata.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct InvalidToken;

    impl std::fmt::Display for InvalidToken {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a token must be non-empty printable ASCII without whitespace")
        }
    }

    impl std::error::Error for InvalidToken {}

    /// The interceptor; clone it into every client of a channel. Clones share the
    /// token, so [`Bearer::replace`] (after a re-registration) reaches them all.
    #[derive(Clone)]
    pub struct Bearer(std::sync::Arc<std::sync::RwLock<MetadataValue<Ascii>>>);

    impl std::fmt::Debug for Bearer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Bearer(<redacted>)")
        }
    }

    fn value(token: &str) -> Result<MetadataValue<Ascii>, InvalidToken> {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidToken);
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| InvalidToken)?;
        value.set_sensitive(true);
        Ok(value)
    }

    impl Bearer {
        /// Checks that `token` can travel as metadata (marked sensitive).
        pub fn new(token: &str) -> Result<Self, InvalidToken> {
            Ok(Self(std::sync::Arc::new(std::sync::RwLock::new(value(
                token,
            )?))))
        }

        /// Replaces the token for this interceptor and every clone of it.
        pub fn replace(&self, token: &str) -> Result<(), InvalidToken> {
            let v = value(token)?;
            *self.0.write().unwrap_or_else(|e| e.into_inner()) = v;
            Ok(())
        }
    }

    impl tonic::service::Interceptor for Bearer {
        fn call(
            &mut self,
            mut req: tonic::Request<()>,
        ) -> Result<tonic::Request<()>, tonic::Status> {
            let v = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
            req.metadata_mut().insert(super::AUTHORIZATION, v);
            Ok(req)
        }
    }

    /// A channel whose calls carry a bearer token.
    pub type Authed =
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn tokens_are_checked() {
            assert!(Bearer::new("abc-123").is_ok());
            assert!(Bearer::new("").is_err());
            assert!(Bearer::new("has space").is_err());
            assert!(Bearer::new("tøken").is_err());
            assert!(Bearer::new("line\nbreak").is_err());
            let b = Bearer::new("first").unwrap();
            let clone = b.clone();
            b.replace("second").unwrap();
            assert!(b.replace("bad token").is_err());
            let mut c = clone;
            let req = tonic::service::Interceptor::call(&mut c, tonic::Request::new(())).unwrap();
            assert_eq!(
                req.metadata().get(crate::AUTHORIZATION).unwrap(),
                "Bearer second"
            );
        }
    }
}
