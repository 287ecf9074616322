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

/// A client endpoint for `url` with the project's transport settings: connect timeout,
/// `TCP_NODELAY`, HTTP/2 keep-alive and receive windows sized for chunk traffic.
pub fn client_endpoint(url: &str) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(std::time::Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW))
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
