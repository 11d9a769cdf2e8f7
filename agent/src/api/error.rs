//! Errors as the client expects them: `{"error": "..."}`, never an empty body, a 4xx for
//! the caller's mistakes.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use protocol::local::ErrorBody;

use crate::inventory::InventoryError;

/// What a 503 for a full pool asks the client to wait, in seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    /// 503 with `Retry-After`: a bounded pool (streams, async creates) is full.
    #[error("{0}")]
    Full(String),
    /// 408: the request body stalled.
    #[error("{0}")]
    Timeout(String),
    /// 502: another worker (a P2P stream's destination) failed or refused.
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    Internal(String),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) | ApiError::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        if let ApiError::Full(_) = self {
            resp.insert_header((
                actix_web::http::header::RETRY_AFTER,
                RETRY_AFTER_SECS.to_string(),
            ));
        }
        resp.json(ErrorBody {
            error: self.to_string(),
        })
    }
}

impl From<InventoryError> for ApiError {
    fn from(e: InventoryError) -> Self {
        let msg = e.to_string();
        match e {
            InventoryError::NotFound(_) => ApiError::NotFound(msg),
            InventoryError::AlreadyExists(_)
            | InventoryError::ParentDestroying(_)
            | InventoryError::HasChildren { .. }
            | InventoryError::InvalidTransition { .. }
            | InventoryError::Busy { .. }
            | InventoryError::Streaming { .. } => ApiError::Conflict(msg),
            InventoryError::ParentNotFound(_)
            | InventoryError::ParentNotInitialized { .. }
            | InventoryError::ParentMissing(_)
            | InventoryError::Import(_)
            | InventoryError::Populate { .. } => ApiError::Unprocessable(msg),
            _ => ApiError::Internal(msg),
        }
    }
}

impl From<crate::inventory::actor::InventoryGone> for ApiError {
    fn from(e: crate::inventory::actor::InventoryGone) -> Self {
        ApiError::Unavailable(format!("{e}; retry once the agent is back"))
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(e: actix_web::error::BlockingError) -> Self {
        ApiError::Internal(format!("worker thread failed: {e}"))
    }
}

pub fn json_error(err: actix_web::error::JsonPayloadError, _: &HttpRequest) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as J;
    match err {
        J::Overflow { limit } | J::OverflowKnownLength { limit, .. } => {
            ApiError::TooLarge(format!("request body is larger than {limit} bytes")).into()
        }
        J::Deserialize(e) => ApiError::BadRequest(format!("invalid JSON body: {e}")).into(),
        other => ApiError::BadRequest(format!("invalid request body: {other}")).into(),
    }
}

pub fn path_error(err: actix_web::error::PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::BadRequest(format!("invalid path: {err}")).into()
}

pub fn query_error(err: actix_web::error::QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    ApiError::BadRequest(format!("invalid query: {err}")).into()
}

pub async fn not_found(req: HttpRequest) -> HttpResponse {
    ApiError::NotFound(format!("no route for {} {}", req.method(), req.path())).error_response()
}
