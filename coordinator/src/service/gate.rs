//! The admission gate: a tower layer in front of every gRPC service that refuses a call
//! whose bearer token the coordinator does not know **before its body is read**.
//!
//! Without it, tonic buffered and decoded a message of up to 8 MiB before the handler
//! checked the token, so a client with no token could pin memory with stalled requests.
//! The gate only tells known tokens from unknown ones (admin, enrolment — fleet-wide or
//! admin-created —, a registered agent's); which token a call needs is still decided by the handlers, so a known token
//! of the wrong kind gets the handler's `PERMISSION_DENIED`. Health and reflection stay
//! public. The check is a SHA-256 and a map lookup — no I/O, no body.
//!
//! Admitted calls get their request body wrapped in an [`IdleBody`]: a body that sends
//! nothing for `grpc.request_idle_timeout` fails, which ends the call and frees what it
//! held (a push's staging, a decode buffer) — a known token cannot stall them either.

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

impl<S> tower_service::Service<http::Request<tonic::body::Body>> for AuthGate<S>
where
    S: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        >,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
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
        let idle = self.shared.config.raw.grpc.request_idle_timeout.get();
        let req = req.map(|body| tonic::body::Body::new(IdleBody::new(body, idle)));
        Box::pin(self.inner.call(req))
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails when the client sends nothing (no frame, no end) for
    /// `idle` while the handler waits for it (time the handler spends elsewhere does
    /// not count).
    pub(crate) struct IdleBody<B> {
        #[pin]
        inner: B,
        #[pin]
        timer: tokio::time::Sleep,
        idle: std::time::Duration,
        waiting: bool,
    }
}

impl<B> IdleBody<B> {
    pub(crate) fn new(inner: B, idle: std::time::Duration) -> Self {
        Self {
            inner,
            timer: tokio::time::sleep(idle),
            idle,
            waiting: false,
        }
    }
}

impl<B> http_body::Body for IdleBody<B>
where
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = bytes::Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                if !*this.waiting {
                    *this.waiting = true;
                    let until = tokio::time::Instant::now() + *this.idle;
                    this.timer.as_mut().reset(until);
                }
                match this.timer.poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Some(Err(Box::new(Status::deadline_exceeded(format!(
                            "the request body sent nothing for {:?} (grpc.request_idle_timeout)",
                            this.idle
                        ))))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
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
