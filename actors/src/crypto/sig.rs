//! Ed25519 signatures as carried on the wire, and the one strict check every signed
//! structure goes through.
//!
//! [`SignatureBytes`] is 64 raw bytes serialized as a fixed-size tuple, which postcard
//! writes as exactly 64 bytes with no length prefix (serde has no impl for `[u8; 64]`,
//! and ed25519-dalek's `serde` feature is not enabled in this workspace).

use core::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Length of an Ed25519 signature in bytes.
pub const SIGNATURE_BYTES: usize = 64;

/// An Ed25519 signature: 64 raw bytes, as carried by frames and sealed keys.
///
/// Serialized as a 64-element tuple of `u8` (postcard: 64 bytes, no length prefix).
/// Holding one proves nothing: it is checked only when the structure carrying it is
/// verified.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SignatureBytes(pub [u8; SIGNATURE_BYTES]);

impl SignatureBytes {
    /// Signs `message` with `signer`.
    pub(crate) fn sign(signer: &SigningKey, message: &[u8]) -> Self {
        Self(signer.sign(message).to_bytes())
    }
}

impl fmt::Debug for SignatureBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SignatureBytes(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…)")
    }
}

impl Serialize for SignatureBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(SIGNATURE_BYTES)?;
        for b in &self.0 {
            tuple.serialize_element(b)?;
        }
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for SignatureBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SignatureVisitor;

        impl<'de> Visitor<'de> for SignatureVisitor {
            type Value = SignatureBytes;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = [0u8; SIGNATURE_BYTES];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| de::Error::invalid_length(i, &self))?;
                }
                Ok(SignatureBytes(out))
            }
        }

        deserializer.deserialize_tuple(SIGNATURE_BYTES, SignatureVisitor)
    }
}

/// Why [`verify_strict`] refused a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VerifyError {
    /// The public key is not a curve point, or is a small-order ("weak") point.
    InvalidKey,
    /// The signature does not verify (strictly) for that key over that message.
    BadSignature,
}

/// Strict Ed25519 verification of `signature` over `message` by the key `public`.
///
/// Refuses a key that does not decompress to a curve point, and a small-order key
/// (under which anyone could forge signatures that verify); then runs
/// `verify_strict`, which also rejects non-canonical signatures (no malleability).
pub(crate) fn verify_strict(
    public: &[u8; 32],
    message: &[u8],
    signature: &SignatureBytes,
) -> Result<(), VerifyError> {
    let key = VerifyingKey::from_bytes(public).map_err(|_| VerifyError::InvalidKey)?;
    if key.is_weak() {
        return Err(VerifyError::InvalidKey);
    }
    key.verify_strict(message, &Signature::from_bytes(&signature.0))
        .map_err(|_| VerifyError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn signed() -> (SigningKey, SignatureBytes) {
        let signer = SigningKey::generate(&mut ChaCha20Rng::seed_from_u64(5));
        let signature = SignatureBytes::sign(&signer, b"message");
        (signer, signature)
    }

    #[test]
    fn serializes_as_64_raw_bytes() {
        let (_, signature) = signed();
        let bytes = postcard::to_stdvec(&signature).expect("encode");
        assert_eq!(bytes, signature.0.to_vec());
        let back: SignatureBytes = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, signature);
        assert_eq!(
            postcard::from_bytes::<SignatureBytes>(&bytes[..63]),
            Err(postcard::Error::DeserializeUnexpectedEnd)
        );
    }

    #[test]
    fn debug_shows_a_short_prefix() {
        let (_, signature) = signed();
        let text = format!("{signature:?}");
        assert!(text.starts_with("SignatureBytes("));
        assert!(text.ends_with("…)"));
        assert_eq!(text.chars().count(), "SignatureBytes(".len() + 8 + 2);
    }

    #[test]
    fn strict_verification() {
        let (signer, signature) = signed();
        let public = signer.verifying_key().to_bytes();
        assert_eq!(verify_strict(&public, b"message", &signature), Ok(()));
        assert_eq!(
            verify_strict(&public, b"massage", &signature),
            Err(VerifyError::BadSignature)
        );
        let mut bad = signature;
        bad.0[63] ^= 0x10;
        assert_eq!(
            verify_strict(&public, b"message", &bad),
            Err(VerifyError::BadSignature)
        );

        // Non-canonical s (s + L): the same signature under plain `verify` would be
        // malleable; strict verification refuses it.
        const L: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut malleated = signature;
        let mut carry = 0u16;
        for (byte, l) in malleated.0[32..].iter_mut().zip(L) {
            let sum = u16::from(*byte) + u16::from(l) + carry;
            *byte = sum as u8;
            carry = sum >> 8;
        }
        // s < L < 2^253, so s + L still fits in 32 bytes.
        assert_eq!(carry, 0);
        assert_eq!(
            verify_strict(&public, b"message", &malleated),
            Err(VerifyError::BadSignature)
        );

        let mut identity = [0u8; 32];
        identity[0] = 1; // the neutral element: a valid encoding of a small-order point
        assert_eq!(
            verify_strict(&identity, b"message", &signature),
            Err(VerifyError::InvalidKey)
        );
        let not_point = (0u8..=255)
            .map(|b| [b; 32])
            .find(|bytes| VerifyingKey::from_bytes(bytes).is_err())
            .expect("some constant 32-byte string is not a point");
        assert_eq!(
            verify_strict(&not_point, b"message", &signature),
            Err(VerifyError::InvalidKey)
        );
    }
}
