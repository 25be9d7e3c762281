//! Identifiers of nodes, users, rooms and messages.

use core::fmt;

use serde::{Deserialize, Serialize};

/// Formats bytes as lowercase hex without allocating per byte.
fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// Parses exactly `N` bytes of hex.
fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], ParseIdError> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return Err(ParseIdError::Length {
            expected: 2 * N,
            got: s.len(),
        });
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16).ok_or(ParseIdError::NotHex)?;
        let lo = (pair[1] as char).to_digit(16).ok_or(ParseIdError::NotHex)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Ok(out)
}

/// Why a textual id did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseIdError {
    /// The text has the wrong number of hex digits.
    #[error("expected {expected} hex digits, got {got}")]
    Length {
        /// Digits expected.
        expected: usize,
        /// Digits found.
        got: usize,
    },
    /// Not a ULID (a message id): 26 Crockford base-32 characters.
    #[error("not a message id (a ULID)")]
    NotUlid,
    /// A character is not a hex digit.
    #[error("not a hex string")]
    NotHex,
}

macro_rules! key_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Eight hex digits identify an id in logs without drowning them.
                write!(f, concat!(stringify!($name), "("))?;
                write_hex(f, &self.0[..4])?;
                write!(f, "…)")
            }
        }

        impl core::str::FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex::<$len>(s).map(Self)
            }
        }
    };
}

key_id!(
    /// A node: its Ed25519 public key.
    NodeId,
    32
);
key_id!(
    /// A user: their Ed25519 public key.
    UserId,
    32
);
key_id!(
    /// A room: derived from its creation ([`RoomId::derive`]), so that nobody can
    /// claim another room's id.
    RoomId,
    16
);

impl RoomId {
    /// The id of the room that `creator` creates on `home` with `nonce`: the first
    /// 16 bytes of SHA-256 over a domain-separation tag, the creator, the home and
    /// the nonce. Every node checks a creation against it, so a room id names one
    /// creator and one home: another user, or another node, cannot create a room
    /// with an existing room's id.
    pub fn derive(creator: UserId, home: NodeId, nonce: [u8; 16]) -> RoomId {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        hash.update(ROOM_ID_TAG);
        hash.update(creator.0);
        hash.update(home.0);
        hash.update(nonce);
        let digest = hash.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        RoomId(id)
    }
}

/// Domain separation for [`RoomId::derive`].
const ROOM_ID_TAG: &[u8] = b"conclave/room-id/v1";

/// A message id: a ULID (48-bit millisecond time, 80 random bits), drawn from the
/// actor context's clock and random source, never from the OS.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId(pub u128);

impl MessageId {
    /// Builds a ULID from a millisecond timestamp and random bits (the low 80 are used).
    pub fn from_parts(unix_ms: u64, random: u128) -> Self {
        Self(ulid::Ulid::from_parts(unix_ms, random).0)
    }

    /// The millisecond timestamp embedded in the id.
    pub fn unix_ms(&self) -> u64 {
        ulid::Ulid(self.0).timestamp_ms()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", ulid::Ulid(self.0))
    }
}

impl core::str::FromStr for MessageId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ulid::Ulid::from_string(s)
            .map(|u| Self(u.0))
            .map_err(|_| ParseIdError::NotUlid)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", ulid::Ulid(self.0))
    }
}

/// A room's key epoch; it advances on every rekey (for example when a member is removed).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Epoch(pub u64);

/// A frame's position in its room, assigned by the room's home node.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_hex() {
        let id = NodeId([0xab; 32]);
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<NodeId>(), Ok(id));
        assert_eq!(
            "abc".parse::<RoomId>(),
            Err(ParseIdError::Length {
                expected: 32,
                got: 3
            })
        );
        assert_eq!("zz".repeat(16).parse::<RoomId>(), Err(ParseIdError::NotHex));
    }

    #[test]
    fn message_ids_order_by_time() {
        let a = MessageId::from_parts(1_000, u128::MAX);
        let b = MessageId::from_parts(1_001, 0);
        assert!(a < b);
        assert_eq!(b.unix_ms(), 1_001);
    }
}
