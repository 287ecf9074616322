//! Errors of `arcadectl`. Each renders as one line; the binary prefixes `arcadectl: `.

use std::process::ExitCode;

use tonic::Code;

/// Why an `arcadectl` command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Bad command-line input, caught before any call (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The coordinator URL cannot be used.
    #[error("invalid coordinator URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// No connection to the coordinator could be made.
    #[error("cannot reach coordinator at {url}: {reason}")]
    Unreachable {
        /// The URL used.
        url: String,
        /// The transport error, with its causes.
        reason: String,
    },
    /// The coordinator answered with an error status.
    #[error("{}", status_line(.0))]
    Rpc(Box<tonic::Status>),
    /// A local file cannot be read.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `job wait`: the job failed, or did not finish in time.
    #[error("{0}")]
    Job(String),
    /// The coordinator sent an answer that cannot be used.
    #[error("unexpected answer from the coordinator: {0}")]
    BadAnswer(String),
    /// Output cannot be written.
    #[error("cannot write output: {0}")]
    Output(String),
}

impl CtlError {
    /// The process exit code for this error: 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Usage(_) | Self::BadUrl { .. } => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        }
    }

    /// The error as one line of text (newlines of server messages folded).
    pub fn one_line(&self) -> String {
        self.to_string()
            .split(['\n', '\r'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl From<tonic::Status> for CtlError {
    fn from(status: tonic::Status) -> Self {
        Self::Rpc(Box::new(status))
    }
}

/// A gRPC status code in words (`not found`, `unauthenticated`, ...).
pub fn code_words(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

fn status_line(status: &tonic::Status) -> String {
    let words = code_words(status.code());
    if status.message().is_empty() {
        words.to_owned()
    } else {
        format!("{words}: {}", status.message())
    }
}

/// An error and its causes, joined with `: ` (repeated texts skipped).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_renders_code_in_words_and_message() {
        let e = CtlError::from(tonic::Status::not_found("plugin a@1.0.0 does not exist"));
        assert_eq!(e.one_line(), "not found: plugin a@1.0.0 does not exist");
        let e = CtlError::from(tonic::Status::unauthenticated("bad\ntoken"));
        assert_eq!(e.one_line(), "unauthenticated: bad token");
        assert_eq!(
            CtlError::from(tonic::Status::internal("")).one_line(),
            "internal error"
        );
    }
}
