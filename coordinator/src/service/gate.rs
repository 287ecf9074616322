//! The admission gate: a tower layer in front of every gRPC service that refuses a call
//! whose bearer token the coordinator does not know **before its body is read**.
//!
//! Without it, tonic buffered and decoded a message of up to 8 MiB before the handler
//! checked the token, so a client with no token could pin memory with stalled requests.
//! The gate only tells known tokens from unknown ones (admin, enrolment — fleet-wide or
//! admin-created —, a registered agent's); which token a call needs is still decided by the handlers, so a known token
//! of the wrong kind gets the handler's `PERMISSION_DENIED`. Health and reflection stay
//! public. The check is a SHA-256 and a map lookup — no I/O, no body.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::codegen::http;

use super::{CallerToken, SharedRef, bearer, token_hash};

/// Paths anyone may call.
const PUBLIC: [&str; 2] = ["/grpc.health.", "/grpc.reflection."];

/// The layer (see the module doc).
#[derive(Clone)]
pub(crate) struct AuthGateLayer(pub(crate) SharedRef);

impl<S> tower_layer::Layer<S> for AuthGateLayer {
    type Service = AuthGate<S>;

    fn layer(&self, inner: S) -> AuthGate<S> {
        AuthGate {
            inner,
            shared: self.0.clone(),
        }
    }
}

/// The gate in front of one service stack.
#[derive(Clone)]
pub(crate) struct AuthGate<S> {
    inner: S,
    shared: SharedRef,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for AuthGate<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match self.shared.admit(req.uri().path(), req.headers()) {
            Ok(Some(hash)) => {
                req.extensions_mut().insert(CallerToken(hash));
            }
            Ok(None) => {}
            Err(status) => {
                // Answered from the headers alone; the body is dropped unread.
                drop(req);
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        Box::pin(self.inner.call(req))
    }
}

impl super::Shared {
    /// Whether a call to `path` with these headers may reach its handler: public, or
    /// carrying a token the coordinator knows.
    /// The hash is returned for the handlers (`CallerToken`); public calls have none.
    pub(crate) fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
    ) -> Result<Option<[u8; 32]>, Status> {
        if PUBLIC.iter().any(|p| path.starts_with(p)) {
            return Ok(None);
        }
        let token = bearer(headers)?;
        let hash = token_hash(token);
        if hash == self.admin_hash
            || hash == self.enroll_hash
            || self.identity.knows_grant(&hash)
            || self
                .fleet
                .lock()
                .expect("fleet lock")
                .tokens
                .contains_key(&hash)
        {
            return Ok(Some(hash));
        }
        Err(Status::unauthenticated(
            if path == "/arcade.v1.Agent/Register" {
                "invalid enrollment token"
            } else if path.starts_with("/arcade.v1.Agent/") {
                "invalid agent token: Register again"
            } else {
                "invalid admin token"
            },
        ))
    }
}
