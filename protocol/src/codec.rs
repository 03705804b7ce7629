//! The wire codec: the only module that calls `bincode`.
//!
//! bincode 2 (serde mode, standard config: little-endian varints) is unmaintained, so it is
//! kept behind these two functions; swapping it changes this file and the golden vectors only.
//! Every decode is bounded by an explicit byte limit, rejects trailing bytes and non-canonical
//! encodings, and returns a typed error instead of panicking.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Hard ceiling on any single decoded value, whatever limit the caller passes.
pub const MAX_DECODE_BYTES: usize = 1 << 20;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_DECODE_BYTES>,
>;

fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_DECODE_BYTES>()
}

/// Encoding failed. Only happens for values that do not fit the format (e.g. over the limit).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode value: {0}")]
pub struct EncodeError(String);

/// Decoding failed: the bytes are not a valid encoding of the expected type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input is longer than the limit for this kind of value.
    #[error("input of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Length of the input.
        len: usize,
        /// The limit that applied.
        limit: usize,
    },
    /// The input is not a valid encoding (truncated, bad tag, bad length, invalid UTF-8, …).
    #[error("malformed input: {0}")]
    Malformed(String),
    /// A valid value was followed by extra bytes.
    #[error("{0} trailing bytes after the value")]
    TrailingBytes(usize),
}

/// Encodes `value` into bytes.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| EncodeError(e.to_string()))
}

/// Decodes exactly one `T` from `bytes`, which must not be longer than `limit` and must be
/// the canonical encoding of the value (what [`encode`] produces for it).
pub fn decode<T: Serialize + DeserializeOwned>(
    bytes: &[u8],
    limit: usize,
) -> Result<T, DecodeError> {
    let limit = limit.min(MAX_DECODE_BYTES);
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(DecodeError::TrailingBytes(bytes.len() - used));
    }
    // bincode also reads over-long varints (7 as `fb 07 00`), so several byte strings could
    // decode to one value. Ids (`MessageId` = hash of the bytes), deduplication and invite
    // links rely on one value having one encoding, so accept only the canonical one.
    if encode(&value).map_err(|e| DecodeError::Malformed(e.to_string()))? != bytes {
        return Err(DecodeError::Malformed("non-canonical encoding".to_owned()));
    }
    Ok(value)
}
