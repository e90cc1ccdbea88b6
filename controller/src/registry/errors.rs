//! The registry's errors: the OCI Distribution error codes, their HTTP
//! statuses and the JSON body the spec defines
//! (`{"errors":[{"code","message","detail"}]}`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::images::manifests::ManifestError;
use crate::images::ImageStoreError;

/// One error code of the distribution spec (and the two auth ones every
/// registry uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    RangeInvalid,
    Unavailable,
}

impl Code {
    pub fn as_str(&self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Code::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Code::ManifestInvalid => "MANIFEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::SizeInvalid => "SIZE_INVALID",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Denied => "DENIED",
            Code::Unsupported => "UNSUPPORTED",
            // Not a spec code: the spec answers 416 with no code defined.
            Code::RangeInvalid => "RANGE_INVALID",
            Code::Unavailable => "UNAVAILABLE",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Code::BlobUnknown
            | Code::BlobUploadUnknown
            | Code::ManifestUnknown
            | Code::NameUnknown => StatusCode::NOT_FOUND,
            Code::BlobUploadInvalid
            | Code::DigestInvalid
            | Code::ManifestBlobUnknown
            | Code::ManifestInvalid
            | Code::NameInvalid
            | Code::SizeInvalid => StatusCode::BAD_REQUEST,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::Denied => StatusCode::FORBIDDEN,
            Code::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            Code::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// An error answer: code, message, and (for 401) the challenge to send.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct RegistryError {
    pub code: Code,
    pub message: String,
    pub challenge: Option<String>,
    /// Overrides the code's usual status (e.g. 413 for a manifest too big).
    pub status: Option<StatusCode>,
}

impl RegistryError {
    pub fn new(code: Code, message: impl Into<String>) -> RegistryError {
        RegistryError {
            code,
            message: message.into(),
            challenge: None,
            status: None,
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> RegistryError {
        self.status = Some(status);
        self
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let status = self.status.unwrap_or_else(|| self.code.status());
        let body = serde_json::json!({
            "errors": [{"code": self.code.as_str(), "message": self.message, "detail": {}}]
        });
        let mut resp = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        if let Some(c) = self.challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, c);
        }
        resp
    }
}

impl From<ManifestError> for RegistryError {
    fn from(e: ManifestError) -> RegistryError {
        let code = match &e {
            ManifestError::NameInvalid(_) => Code::NameInvalid,
            ManifestError::TagInvalid(_) => Code::ManifestInvalid,
            ManifestError::DigestInvalid(_) => Code::DigestInvalid,
            ManifestError::ManifestUnknown { .. } => Code::ManifestUnknown,
            ManifestError::NameUnknown(_) => Code::NameUnknown,
            ManifestError::ManifestInvalid(_) => Code::ManifestInvalid,
            ManifestError::BlobUnknown(_) => Code::ManifestBlobUnknown,
            ManifestError::TooLarge(_) => {
                return RegistryError::new(Code::SizeInvalid, e.to_string())
                    .with_status(StatusCode::PAYLOAD_TOO_LARGE)
            }
            ManifestError::Io(_) | ManifestError::Store(_) | ManifestError::Conflict => {
                tracing::error!(error = %e, "registry: image store failed");
                Code::Unavailable
            }
        };
        RegistryError::new(code, e.to_string())
    }
}

impl From<ImageStoreError> for RegistryError {
    fn from(e: ImageStoreError) -> RegistryError {
        tracing::error!(error = %e, "registry: image store I/O failed");
        RegistryError::new(Code::Unavailable, e.to_string())
    }
}
