//! The typed wire format.
//!
//! Everything that crosses a node boundary is an [`Envelope`]: one version byte, then
//! the postcard encoding of the envelope body. Decoding is bounded: input longer than
//! [`ENVELOPE_BYTES_MAX`] is refused before it is parsed, a sequence never reserves
//! room for more elements than the remaining bytes could hold, and trailing bytes are
//! an error. A decode never panics; it returns a [`WireError`]. Memory use is
//! proportional to the input: at most a small multiple of it (the in-memory size of
//! an element per encoded byte), which `tests/wire_decode.rs` measures.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::actor::ActorRef;

/// The wire version this build speaks. Bumped on any incompatible change (2: epoch
/// keys travel as updates of their room, and snapshots carry `members_version`; 3:
/// membership changes carry signed chain links, and rooms send their chain; 4:
/// deliveries carry their outbox's stream and acknowledgements its incarnation; 5:
/// a room's home reports late outcomes to the asking node, and clients ask for them).
pub const WIRE_VERSION: u8 = 8;

/// The hard upper bound on one encoded envelope, version byte included.
pub const ENVELOPE_BYTES_MAX: usize = 1024 * 1024;

/// Why bytes did not decode (or a value did not encode).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The input is longer than the limit for its kind.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Bytes offered.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The input is empty.
    #[error("empty message")]
    Empty,
    /// The envelope names a version this build does not speak.
    #[error("unsupported wire version {got} (this build speaks {WIRE_VERSION})")]
    UnsupportedVersion {
        /// Version byte found.
        got: u8,
    },
    /// The input ended before the value did.
    #[error("message truncated")]
    Truncated,
    /// Bytes are left over after a complete value.
    #[error("{0} trailing bytes after a complete message")]
    TrailingBytes(usize),
    /// The bytes are not a valid encoding of the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
}

impl From<postcard::Error> for WireError {
    fn from(e: postcard::Error) -> Self {
        match e {
            postcard::Error::DeserializeUnexpectedEnd => WireError::Truncated,
            other => WireError::Malformed(other.to_string()),
        }
    }
}

/// Encodes `value` with postcard, refusing results longer than `max` bytes.
pub fn encode_bounded<T: Serialize + ?Sized>(value: &T, max: usize) -> Result<Vec<u8>, WireError> {
    let bytes = postcard::to_stdvec(value)?;
    within(bytes.len(), max)?;
    Ok(bytes)
}

/// The one size check of this module: `len` bytes against the limit `max`.
fn within(len: usize, max: usize) -> Result<(), WireError> {
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    Ok(())
}

/// Decodes exactly one `T` from `bytes`, which must be at most `max` bytes long.
///
/// Allocation is bounded by the input: postcard does not reserve space for a
/// sequence whose claimed length exceeds the bytes that remain, so a forged length
/// cannot make it reserve more. (Maps are `BTreeMap`s, which never reserve.)
pub fn decode_bounded<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, WireError> {
    within(bytes.len(), max)?;
    let (value, rest) = postcard::take_from_bytes::<T>(bytes)?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

/// What can travel between nodes: a serializable message that says which stream
/// class it travels on, so that a large transfer does not hold up small control
/// messages.
pub trait WireMessage: Serialize + DeserializeOwned + Send + 'static {
    /// The stream class of this message.
    fn class(&self) -> MessageClass {
        MessageClass::Data
    }
}

/// Which long-lived stream a message travels on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MessageClass {
    /// Small, latency-sensitive messages (membership, keys, acknowledgements).
    Control,
    /// Frames and other bulk traffic.
    Data,
}

/// One message between two actors on different nodes.
///
/// `M` is the message universe of the system (see [`crate::actor::System`]). The
/// sending node is not in the envelope: the transport attributes every envelope to
/// the peer it authenticated, so a body can never claim another sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<M> {
    /// The sending actor (its node is checked against the authenticated peer).
    pub from: ActorRef,
    /// The receiving actor.
    pub to: ActorRef,
    /// The message.
    pub msg: M,
}

impl<M: Serialize + DeserializeOwned> Envelope<M> {
    /// Encodes the envelope: the version byte, then the postcard body.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut out = vec![WIRE_VERSION];
        postcard::to_io(self, &mut out).map_err(WireError::from)?;
        within(out.len(), ENVELOPE_BYTES_MAX)?;
        Ok(out)
    }

    /// Decodes an envelope produced by [`Envelope::encode`], of any origin.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        within(bytes.len(), ENVELOPE_BYTES_MAX)?;
        let (&version, body) = bytes.split_first().ok_or(WireError::Empty)?;
        if version != WIRE_VERSION {
            return Err(WireError::UnsupportedVersion { got: version });
        }
        decode_bounded(body, ENVELOPE_BYTES_MAX - 1)
    }
}
