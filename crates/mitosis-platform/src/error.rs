//! The platform's typed errors, and how each becomes an HTTP answer as Fn gives it: a status
//! code and `{"message": "..."}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mitosis_client::ErrorKind;

/// An error of the store (SQLite or etcd).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store: etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// etcd did not answer in time (a request is bounded so a slow etcd never stalls the API).
    #[error("store: etcd did not answer {0} in time")]
    Timeout(&'static str),
    /// A seed's host has no entry (no lease) in the shared store to attach the seed to.
    #[error("store: host {0} is not registered")]
    Unregistered(String),
    /// A record changed under a transaction too many times in a row.
    #[error("store: {0} kept changing, gave up")]
    Contended(&'static str),
    #[error("store: a stored record does not decode: {0}")]
    Corrupt(#[from] serde_json::Error),
    /// The store's thread went away (a panic in a query).
    #[error("store: the query did not finish")]
    Lost,
}

/// Why one call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No host is up (or every one failed this call).
    #[error("no host can run the function: {0}")]
    NoHost(String),
    /// The function's seed could not be made (the bundle is wrong, or no host can start it).
    #[error("the function could not be started: {0}")]
    Seed(String),
    /// A host's daemon refused or failed the resume, or could not be reached.
    #[error("host {host}: {err}")]
    Daemon {
        host: String,
        #[source]
        err: mitosis_client::Error,
    },
    /// The connection to the daemon running the child broke: the child may have run.
    #[error("host {host} went away during the call: {err}")]
    HostLost {
        host: String,
        #[source]
        err: mitosis_client::Error,
    },
    /// The function exited with a failure, or was killed (its reason if the daemon knows it).
    #[error("the function failed: {0}")]
    Crashed(String),
    /// Past the function's timeout: it was killed.
    #[error("timed out after {0} s")]
    TimedOut(u64),
    /// The answer was over the platform's limit.
    #[error("the function's answer is over {0} bytes")]
    OutputTooLarge(usize),
    /// The request does not fit the function's contract (400).
    #[error("{0}")]
    BadInput(String),
    /// Pipes, threads: this process's own trouble.
    #[error("platform: {0}")]
    Io(#[from] std::io::Error),
    /// The store (where the seed is recorded) failed or did not answer in time.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl CallError {
    /// Whether the seed itself is lost (its host dropped it, or lost its memory): make it
    /// again.
    pub fn seed_lost(&self) -> bool {
        matches!(
            self,
            CallError::Daemon { err, .. } if matches!(
                err.kind(),
                Some(ErrorKind::NoSuchSeed | ErrorKind::SeedGone)
            )
        )
    }

    /// Whether the child's host could not reach the seed's host. That alone does not mean
    /// the seed is lost (a busy host answers late): only its host being down does. Dropping a
    /// seed that still serves other calls' children would kill them.
    pub fn seed_unreachable(&self) -> bool {
        matches!(
            self,
            CallError::Daemon { err, .. } if err.kind() == Some(ErrorKind::Unreachable)
        )
    }

    /// Whether the host that was asked is at fault, not the function (its daemon is
    /// unreachable or failed before the child ran): another host may do.
    pub fn host_failed(&self) -> bool {
        match self {
            CallError::Daemon { err, .. } => {
                matches!(
                    err,
                    mitosis_client::Error::Connect { .. }
                        | mitosis_client::Error::Send(_)
                        | mitosis_client::Error::Closed
                        | mitosis_client::Error::Recv(_)
                ) || matches!(err.kind(), Some(ErrorKind::Unavailable))
            }
            _ => false,
        }
    }
}

/// An answer of the API that is not a success: Fn's status code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!("{e}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl ApiError {
    /// The status a failed call answers with.
    pub fn status_of(e: &CallError) -> StatusCode {
        match e {
            CallError::TimedOut(_) => StatusCode::GATEWAY_TIMEOUT,
            CallError::BadInput(_) => StatusCode::BAD_REQUEST,
            CallError::NoHost(_) => StatusCode::SERVICE_UNAVAILABLE,
            CallError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
            CallError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        ApiError::new(ApiError::status_of(&e), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "message": self.message })),
        )
            .into_response()
    }
}
