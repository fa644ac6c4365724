//! Status on the wire: the one map per protocol from the kind of a failure
//! to the status its answer carries (DESIGN.md, "Wire protocols").
//!
//! The gateway says which [`ErrorKind`] each of its errors is; the front ends
//! ask [`ErrorKind::http`], [`ErrorKind::grpc`] or [`ErrorKind::native`] for
//! the status to send, so the three protocols cannot drift apart.

/// gRPC status codes, which the QUIC native protocol uses too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(i32)]
#[non_exhaustive]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    ResourceExhausted = 8,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl Code {
    /// The code of a wire number; unknown numbers become [`Code::Unknown`].
    pub fn from_i32(n: i32) -> Code {
        match n {
            0 => Code::Ok,
            1 => Code::Cancelled,
            3 => Code::InvalidArgument,
            4 => Code::DeadlineExceeded,
            5 => Code::NotFound,
            8 => Code::ResourceExhausted,
            13 => Code::Internal,
            14 => Code::Unavailable,
            16 => Code::Unauthenticated,
            _ => Code::Unknown,
        }
    }

    /// The name as gRPC spells it, e.g. `INVALID_ARGUMENT`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong, as far as the wire cares: each kind has one status per
/// protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request is malformed or does not fit the model.
    InvalidArgument,
    /// No valid credentials.
    Unauthenticated,
    /// No such model (or version).
    NotFound,
    /// The request is larger than the configured limit.
    TooLarge,
    /// The model's admission lane is full: retry later.
    Overloaded,
    /// The gateway cannot take the request now (deadline unreachable, memory
    /// budget, shutting down, no upstream): retry later or elsewhere.
    Unavailable,
    /// An upstream took the request and failed it.
    BadGateway,
    /// The deadline passed before the request could be computed.
    DeadlineExceeded,
    /// The client did not send its whole request in time.
    RequestTimeout,
    /// The model or its device failed.
    Internal,
    /// The client cancelled the request.
    Cancelled,
}

/// An HTTP status with the `Retry-After` seconds where a retry later helps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpStatus {
    /// The status code.
    pub code: u16,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u32>,
}

impl ErrorKind {
    /// Every kind: the statuses an HTTP route may answer with (the OpenAPI
    /// document lists them from here).
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::InvalidArgument,
        ErrorKind::Unauthenticated,
        ErrorKind::NotFound,
        ErrorKind::TooLarge,
        ErrorKind::Overloaded,
        ErrorKind::Unavailable,
        ErrorKind::BadGateway,
        ErrorKind::DeadlineExceeded,
        ErrorKind::RequestTimeout,
        ErrorKind::Internal,
        ErrorKind::Cancelled,
    ];

    /// The HTTP status (REST over HTTP/1.1, HTTP/2 and HTTP/3).
    pub fn http(self) -> HttpStatus {
        let (code, retry_after) = match self {
            ErrorKind::InvalidArgument => (400, None),
            ErrorKind::Unauthenticated => (401, None),
            ErrorKind::NotFound => (404, None),
            ErrorKind::RequestTimeout => (408, None),
            ErrorKind::TooLarge => (413, None),
            ErrorKind::Overloaded => (429, Some(1)),
            // Nobody is left to read it; 499 is the customary log code.
            ErrorKind::Cancelled => (499, None),
            ErrorKind::Internal => (500, None),
            ErrorKind::BadGateway => (502, None),
            ErrorKind::Unavailable => (503, Some(1)),
            ErrorKind::DeadlineExceeded => (504, None),
        };
        HttpStatus { code, retry_after }
    }

    /// The gRPC status code.
    pub fn grpc(self) -> Code {
        match self {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::TooLarge | ErrorKind::Overloaded => Code::ResourceExhausted,
            ErrorKind::Unavailable | ErrorKind::BadGateway => Code::Unavailable,
            ErrorKind::DeadlineExceeded | ErrorKind::RequestTimeout => Code::DeadlineExceeded,
            ErrorKind::Internal => Code::Internal,
            ErrorKind::Cancelled => Code::Cancelled,
        }
    }

    /// The QUIC native protocol's status code: gRPC's codes, so a client
    /// handles both alike.
    pub fn native(self) -> Code {
        self.grpc()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ALL: [ErrorKind; 11] = ErrorKind::ALL;

    #[test]
    fn codes_survive_the_wire_number() {
        for kind in ALL {
            let code = kind.grpc();
            assert_eq!(Code::from_i32(code as i32), code, "{kind:?}");
        }
    }

    #[test]
    fn only_retryable_kinds_say_retry_after() {
        for kind in ALL {
            let s = kind.http();
            let retryable = matches!(kind, ErrorKind::Overloaded | ErrorKind::Unavailable);
            assert_eq!(s.retry_after.is_some(), retryable, "{kind:?}");
            assert!((400..600).contains(&s.code), "{kind:?}: {}", s.code);
        }
    }

    #[test]
    fn client_faults_are_4xx_and_capacity_is_429_or_503() {
        assert_eq!(ErrorKind::InvalidArgument.http().code, 400);
        assert_eq!(ErrorKind::TooLarge.http().code, 413);
        assert_eq!(ErrorKind::Overloaded.http().code, 429);
        assert_eq!(ErrorKind::Unavailable.http().code, 503);
        assert_eq!(ErrorKind::BadGateway.grpc(), Code::Unavailable);
        assert_eq!(ErrorKind::RequestTimeout.grpc(), Code::DeadlineExceeded);
    }
}
