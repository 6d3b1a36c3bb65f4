//! The one error type every request can fail with, as it travels on the wire.
//!
//! Each [`ErrorCode`] has a fixed number that is part of the protocol: numbers are never reused or
//! renumbered, new codes are appended. The numbers, not bincode's variant indices, are what is
//! encoded, so reordering the enum in source can never change the wire.

use bincode::de::{Decode, Decoder};
use bincode::enc::{Encode, Encoder};
use bincode::error::{DecodeError, EncodeError};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Stable error codes. The number after `=` is the wire value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The pool, model or lease named in the request does not exist.
    NotFound = 1,
    /// The pool exists but is not ready to take work.
    NotReady = 2,
    /// The pool is draining: no new leases.
    Draining = 3,
    /// Every slot of the pool (or of every pool serving the model) is leased.
    NoCapacity = 4,
    /// The peer is not allowed to make this request.
    Unauthorized = 5,
    /// The request or frame is malformed or out of range.
    BadRequest = 6,
    /// Client and server speak different protocol versions.
    VersionMismatch = 7,
    /// A bug or an unexpected failure inside the server.
    Internal = 8,
    /// The request is valid but this server does not implement it (yet).
    Unsupported = 9,
    /// The server is shutting down and takes no new work.
    ShuttingDown = 10,
    /// The peer's uid already holds as many leased slots as pool-managerd lets one uid hold
    /// (`server.max_leased_slots_per_uid`); retry when one of its own leases ends.
    LeaseCapReached = 11,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::NotFound,
        ErrorCode::NotReady,
        ErrorCode::Draining,
        ErrorCode::NoCapacity,
        ErrorCode::Unauthorized,
        ErrorCode::BadRequest,
        ErrorCode::VersionMismatch,
        ErrorCode::Internal,
        ErrorCode::Unsupported,
        ErrorCode::ShuttingDown,
        ErrorCode::LeaseCapReached,
    ];

    /// The wire number of this code.
    pub fn number(self) -> u16 {
        self as u16
    }

    pub fn from_number(number: u16) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| code.number() == number)
    }

    /// The snake_case name used in JSON and logs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::Draining => "draining",
            ErrorCode::NoCapacity => "no_capacity",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::Internal => "internal",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::LeaseCapReached => "lease_cap_reached",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.number())
    }
}

impl Encode for ErrorCode {
    fn encode<E: Encoder>(&self, encoder: &mut E) -> Result<(), EncodeError> {
        self.number().encode(encoder)
    }
}

impl<Context> Decode<Context> for ErrorCode {
    fn decode<D: Decoder<Context = Context>>(decoder: &mut D) -> Result<Self, DecodeError> {
        let number = u16::decode(decoder)?;
        ErrorCode::from_number(number).ok_or(DecodeError::OtherString(format!(
            "unknown error code {number}"
        )))
    }
}

impl<'de, Context> bincode::BorrowDecode<'de, Context> for ErrorCode {
    fn borrow_decode<D: bincode::de::BorrowDecoder<'de, Context = Context>>(
        decoder: &mut D,
    ) -> Result<Self, DecodeError> {
        <ErrorCode as Decode<Context>>::decode(decoder)
    }
}

/// A typed error with a human message, as returned by pool-managerd.
#[derive(
    Debug, Clone, PartialEq, Eq, thiserror::Error, bincode::Encode, bincode::Decode, Serialize,
)]
#[error("{code}: {message}")]
pub struct IpcError {
    pub code: ErrorCode,
    pub message: String,
}

impl IpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> IpcError {
        IpcError {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_number() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_number(code.number()), Some(code));
        }
        assert_eq!(ErrorCode::from_number(0), None);
        assert_eq!(ErrorCode::from_number(12), None);
    }

    #[test]
    fn code_numbers_are_pinned() {
        let numbers: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.number()).collect();
        assert_eq!(numbers, (1..=11).collect::<Vec<u16>>());
    }
}
