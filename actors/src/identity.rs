//! Identities: an Ed25519 signing key and an X25519 key-exchange key.
//!
//! Nodes and users each have one. The Ed25519 public key *is* the id
//! ([`NodeId`], [`UserId`]); the X25519 public key is what epoch keys are sealed to.
//! This module only encodes and decodes the identity file's bytes; reading and
//! writing the file (mode 0600, load-or-create) is the runtime's job, since actors
//! never touch the file system.

use core::fmt;

use ed25519_dalek::{SigningKey, VerifyingKey};
use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey as ExchangePublic, StaticSecret};
use zeroize::Zeroizing;

use crate::crypto::SignatureBytes;
use crate::ids::{NodeId, UserId};

/// The first bytes of an identity file: a magic tag and the format version.
const FILE_MAGIC: &[u8; 7] = b"CNCLVID";
/// The identity file format version.
const FILE_VERSION: u8 = 1;
/// magic ‖ version ‖ ed25519 secret ‖ x25519 secret ‖ ed25519 public ‖ x25519 public.
/// The public halves are stored so that a damaged secret is detected on load.
pub const IDENTITY_FILE_BYTES: usize = 7 + 1 + 32 * 4;

/// Why identity bytes were refused. Each one means the file is damaged or is not an
/// identity file: it is never silently replaced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The file is shorter or longer than an identity file.
    #[error("identity file is {len} bytes, expected {IDENTITY_FILE_BYTES} (truncated or not an identity file)")]
    WrongLength {
        /// Bytes found.
        len: usize,
    },
    /// The file does not start with the identity magic.
    #[error("not a conclave identity file (bad magic)")]
    BadMagic,
    /// The file is of a format version this build does not read.
    #[error(
        "identity file version {0} is not supported (this build reads version {FILE_VERSION})"
    )]
    UnsupportedVersion(u8),
    /// The stored keys are inconsistent: a public key does not derive from its
    /// secret, or the X25519 secret is not in its clamped form.
    #[error("identity file is corrupt: its public keys do not match its secret keys")]
    KeyMismatch,
}

/// Clamps an X25519 secret as RFC 7748 §5 does before every use.
fn clamp(mut secret: [u8; 32]) -> [u8; 32] {
    secret[0] &= 248;
    secret[31] &= 127;
    secret[31] |= 64;
    secret
}

/// A secret identity. Its secrets are zeroized on drop and never printed.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    exchange: StaticSecret,
}

/// The public half of an identity: what others need to verify its signatures and to
/// seal keys to it. The X25519 key is bound to the identity by the identity's own
/// signature over it ([`PublicIdentity::check`]): nobody seals to, registers or
/// invites a key its owner did not sign.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublicIdentity {
    /// Ed25519 public key: the node or user id.
    pub signing: [u8; 32],
    /// X25519 public key: epoch keys are sealed to it.
    pub exchange: [u8; 32],
    /// The Ed25519 signature of `signing` over [`EXCHANGE_BINDING_TAG`] ‖ `exchange`.
    pub binding: SignatureBytes,
}

/// Domain separation for the signature that binds an X25519 key to an identity.
pub const EXCHANGE_BINDING_TAG: &[u8] = b"conclave/exchange-key/v1";

/// Why a public identity cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// The Ed25519 half is not a valid (or is a weak) key.
    #[error("the identity's Ed25519 key is not a valid key")]
    InvalidSigningKey,
    /// The X25519 key is not signed by the identity.
    #[error("the X25519 key is not bound to the identity (its signature does not verify)")]
    Unbound,
    /// The X25519 key is of low order: anything sealed to it is readable by anyone.
    #[error("the X25519 key is of low order")]
    LowOrder,
}

/// The message an identity signs to bind its X25519 key.
fn binding_message(exchange: &[u8; 32]) -> Vec<u8> {
    let mut message = EXCHANGE_BINDING_TAG.to_vec();
    message.extend_from_slice(exchange);
    message
}

/// Whether `exchange` is of low order (or the identity point): a Diffie-Hellman
/// with any clamped scalar (a multiple of the cofactor) gives the all-zero secret
/// exactly for those points.
pub fn is_low_order(exchange: &[u8; 32]) -> bool {
    let probe = StaticSecret::from(clamp([1u8; 32]));
    !probe
        .diffie_hellman(&ExchangePublic::from(*exchange))
        .was_contributory()
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for PublicIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicIdentity({:?})", UserId(self.signing))
    }
}

impl PublicIdentity {
    /// The Ed25519 verifying key, or `None` if the bytes are not a valid point.
    pub fn verifying_key(&self) -> Option<VerifyingKey> {
        VerifyingKey::from_bytes(&self.signing).ok()
    }

    /// The X25519 public key.
    pub fn exchange_key(&self) -> ExchangePublic {
        ExchangePublic::from(self.exchange)
    }

    /// Checks that the identity is usable: a valid Ed25519 key that signed its
    /// X25519 key, and that key not of low order.
    pub fn check(&self) -> Result<(), BindingError> {
        check_binding(&self.signing, &self.exchange, &self.binding)
    }
}

/// Checks that `signing` bound `exchange` with `binding`, and that `exchange` is not
/// of low order (see [`PublicIdentity::check`]).
pub fn check_binding(
    signing: &[u8; 32],
    exchange: &[u8; 32],
    binding: &SignatureBytes,
) -> Result<(), BindingError> {
    if VerifyingKey::from_bytes(signing).map_or(true, |k| k.is_weak()) {
        return Err(BindingError::InvalidSigningKey);
    }
    crate::crypto::verify_signature(signing, &binding_message(exchange), binding)
        .map_err(|_| BindingError::Unbound)?;
    if is_low_order(exchange) {
        return Err(BindingError::LowOrder);
    }
    Ok(())
}

impl Identity {
    /// A fresh identity from `rng` (the actor context's, or OS entropy in the runtime).
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let signing = Zeroizing::new(SigningKey::generate(rng).to_bytes());
        let mut exchange = [0u8; 32];
        rng.fill_bytes(&mut exchange);
        Self::from_secrets(&signing, exchange)
    }

    /// An identity from its two 32-byte secrets. The X25519 secret is stored
    /// clamped (RFC 7748), so that every bit of an identity file is significant and
    /// a damaged bit can be detected.
    pub fn from_secrets(signing: &[u8; 32], exchange: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(signing),
            exchange: StaticSecret::from(clamp(exchange)),
        }
    }

    /// The public half.
    pub fn public(&self) -> PublicIdentity {
        let exchange = ExchangePublic::from(&self.exchange).to_bytes();
        // Ed25519 signatures are deterministic: the binding is the same every time.
        let binding = SignatureBytes::sign(&self.signing, &binding_message(&exchange));
        PublicIdentity {
            signing: self.signing.verifying_key().to_bytes(),
            exchange,
            binding,
        }
    }

    /// This identity as a node id.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.signing.verifying_key().to_bytes())
    }

    /// This identity as a user id.
    pub fn user_id(&self) -> UserId {
        UserId(self.signing.verifying_key().to_bytes())
    }

    /// The Ed25519 signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The X25519 secret that opens keys sealed to this identity.
    pub fn exchange_secret(&self) -> &StaticSecret {
        &self.exchange
    }

    /// The identity file's bytes (secret: zeroized when dropped).
    pub fn to_file_bytes(&self) -> Zeroizing<Vec<u8>> {
        let public = self.public();
        let mut out = Zeroizing::new(Vec::with_capacity(IDENTITY_FILE_BYTES));
        out.extend_from_slice(FILE_MAGIC);
        out.push(FILE_VERSION);
        out.extend_from_slice(&self.signing.to_bytes());
        out.extend_from_slice(self.exchange.as_bytes());
        out.extend_from_slice(&public.signing);
        out.extend_from_slice(&public.exchange);
        debug_assert_eq!(out.len(), IDENTITY_FILE_BYTES);
        out
    }

    /// Parses an identity file's bytes, checking that the stored public keys derive
    /// from the stored secrets.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<Self, IdentityError> {
        if bytes.len() != IDENTITY_FILE_BYTES {
            return Err(IdentityError::WrongLength { len: bytes.len() });
        }
        let (magic, rest) = bytes.split_at(FILE_MAGIC.len());
        if magic != FILE_MAGIC {
            return Err(IdentityError::BadMagic);
        }
        let (&version, rest) = rest
            .split_first()
            .ok_or(IdentityError::WrongLength { len: bytes.len() })?;
        if version != FILE_VERSION {
            return Err(IdentityError::UnsupportedVersion(version));
        }
        let chunk = |i: usize| -> [u8; 32] {
            let mut out = [0u8; 32];
            out.copy_from_slice(&rest[32 * i..32 * (i + 1)]);
            out
        };
        let signing_secret = Zeroizing::new(chunk(0));
        let exchange_secret = Zeroizing::new(chunk(1));
        if clamp(*exchange_secret) != *exchange_secret {
            // Clamping would hide the damage: the bits it fixes do not change the key.
            return Err(IdentityError::KeyMismatch);
        }
        let identity = Self::from_secrets(&signing_secret, *exchange_secret);
        let public = identity.public();
        if public.signing != chunk(2) || public.exchange != chunk(3) {
            return Err(IdentityError::KeyMismatch);
        }
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> Identity {
        Identity::from_secrets(&[7u8; 32], [9u8; 32])
    }

    #[test]
    fn an_identity_binds_its_exchange_key_and_low_order_keys_are_refused() {
        let public = fixed().public();
        assert_eq!(public.check(), Ok(()));
        assert_eq!(public, fixed().public(), "the binding is deterministic");
        let other = Identity::from_secrets(&[8u8; 32], [10u8; 32]).public();
        let swapped = PublicIdentity {
            exchange: other.exchange,
            ..public
        };
        assert_eq!(swapped.check(), Err(BindingError::Unbound));
        let zero = [0u8; 32];
        let signed_zero = PublicIdentity {
            exchange: zero,
            binding: SignatureBytes::sign(fixed().signing_key(), &binding_message(&zero)),
            ..public
        };
        assert_eq!(signed_zero.check(), Err(BindingError::LowOrder));
        assert!(!is_low_order(&public.exchange));
        let bad_signer = PublicIdentity {
            signing: [0u8; 32],
            ..public
        };
        assert_eq!(bad_signer.check(), Err(BindingError::InvalidSigningKey));
    }

    #[test]
    fn file_bytes_round_trip() {
        let id = fixed();
        let bytes = id.to_file_bytes();
        let back = Identity::from_file_bytes(&bytes).expect("valid file");
        assert_eq!(back.public(), id.public());
        assert_eq!(back.signing_key().to_bytes(), id.signing_key().to_bytes());
    }

    #[test]
    fn truncated_and_extended_files_are_refused() {
        let bytes = fixed().to_file_bytes();
        for len in [0, 1, 8, IDENTITY_FILE_BYTES - 1] {
            assert_eq!(
                Identity::from_file_bytes(&bytes[..len]).unwrap_err(),
                IdentityError::WrongLength { len }
            );
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(
            Identity::from_file_bytes(&longer).unwrap_err(),
            IdentityError::WrongLength {
                len: IDENTITY_FILE_BYTES + 1
            }
        );
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = fixed().to_file_bytes();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut bad = bytes.to_vec();
                bad[i] ^= 1 << bit;
                let err = Identity::from_file_bytes(&bad).unwrap_err();
                let expected = match i {
                    0..=6 => IdentityError::BadMagic,
                    7 => IdentityError::UnsupportedVersion(FILE_VERSION ^ (1 << bit)),
                    _ => IdentityError::KeyMismatch,
                };
                assert_eq!(err, expected, "flipped bit {bit} of byte {i}");
            }
        }
    }

    #[test]
    fn debug_never_prints_secrets() {
        let id = fixed();
        let text = format!("{id:?}");
        let secret_hex: String = id
            .signing_key()
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!text.contains(&secret_hex[..8]));
        assert!(text.contains("PublicIdentity"));
    }
}
