//! Sealing epoch keys to members with HPKE (RFC 9180), signed by the member who
//! sealed them.
//!
//! # Confidentiality
//!
//! Suite: base mode, DHKEM(X25519, HKDF-SHA256) (KEM 0x0020), HKDF-SHA256 (KDF 0x0001),
//! ChaCha20-Poly1305 (AEAD 0x0003). The room, epoch and sealer go into the HPKE `info`
//! (see [`epoch_key_info`]), so the key schedule itself differs per (room, epoch,
//! sealer): a ciphertext moved to another room or epoch, or claimed by another sealer,
//! fails to open rather than being accepted.
//!
//! # Authentication
//!
//! HPKE base mode authenticates nobody: anyone who knows a member's X25519 public key
//! (every node that routes keys does) can seal a key of their own choosing to it. So
//! every [`SealedKey`] names its `sealer` (the Ed25519 key of the member whose client
//! created and sealed it) and carries that member's signature over the fixed-layout
//! message
//!
//! ```text
//! b"conclave/epoch-key-sig/v1" ‖ room (16) ‖ epoch (u64 BE) ‖ sealer (32)
//!     ‖ recipient X25519 public key (32) ‖ enc (32) ‖ ciphertext (48)
//! ```
//!
//! Every field has a fixed length, so the encoding is unambiguous. Signing the
//! recipient's public key means a sealed key cannot be re-targeted at another member;
//! signing `enc` and the ciphertext means a node cannot substitute its own.
//!
//! [`open_epoch_key`] checks the signature (strictly: the sealer must be a valid,
//! non-small-order Ed25519 key and the signature canonical) *before* it opens anything.
//! [`verify_sealed_key`] runs the same check with only the recipient's public key,
//! which is what a node, holding no secret, does before it stores or routes a bundle.
//!
//! **What this does not decide:** a valid signature proves *who* sealed the key, not
//! that they were allowed to. The caller must still check that `sealed.sealer` is
//! authorized to set keys for this room at this epoch (for example, is a member with
//! the right role in the room's state); that is the room/keys actors' decision.
//! Without that check, any identity at all — including a node's own — could sign a
//! key and have it accepted.

use ed25519_dalek::SigningKey;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::sig::{verify_strict, SignatureBytes, VerifyError};
use super::{EpochKey, EPOCH_KEY_BYTES};
use crate::ids::{Epoch, RoomId, UserId};

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

/// Length of a sealed epoch key's ciphertext: the 32 key bytes plus the 16-byte tag.
pub const SEALED_KEY_CIPHERTEXT_BYTES: usize = EPOCH_KEY_BYTES + 16;

/// Domain tag at the front of every epoch-key `info`; bump the version on any format
/// change. (v2: the sealer was added.)
const INFO_TAG: &[u8] = b"conclave/epoch-key/v2";

/// Length of [`epoch_key_info`]: tag ‖ room (16) ‖ epoch (8, big-endian) ‖ sealer (32).
pub const EPOCH_KEY_INFO_BYTES: usize = INFO_TAG.len() + 16 + 8 + 32;

/// Domain tag at the front of every signed sealed-key message.
const SIG_TAG: &[u8] = b"conclave/epoch-key-sig/v1";

/// Length of the signed message: tag ‖ room ‖ epoch ‖ sealer ‖ recipient ‖ enc ‖
/// ciphertext, all fixed-length.
const SIGNED_BYTES: usize = SIG_TAG.len() + 16 + 8 + 32 + 32 + 32 + SEALED_KEY_CIPHERTEXT_BYTES;

/// Upper bound on `info` for the low-level helpers. HPKE itself panics when
/// `info` approaches 2¹⁶ bytes, so the helpers refuse long inputs up front.
const HPKE_INFO_BYTES_MAX: usize = 1024;

/// An epoch key sealed to one member's X25519 key and signed by the member who sealed
/// it. Nodes check the signature ([`verify_sealed_key`]), store and route it; only the
/// recipient can open it ([`open_epoch_key`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedKey {
    /// Who created and sealed the key: their Ed25519 public key, which the signature
    /// is checked against. Crypto proves only that this key signed; whether this
    /// member may set the room's key is for the caller to decide.
    pub sealer: UserId,
    /// The HPKE encapsulated key (the sender's ephemeral X25519 public key).
    pub enc: [u8; 32],
    /// The HPKE ciphertext of the 32 key bytes: always
    /// [`SEALED_KEY_CIPHERTEXT_BYTES`] long when well formed.
    // As bytes, not a sequence of u8: the same postcard encoding (length, then the
    // bytes), copied in one go instead of element by element.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    /// The sealer's signature over room, epoch, sealer, recipient public key, `enc`
    /// and `ciphertext`.
    pub signature: SignatureBytes,
}

/// Why an epoch key could not be sealed, verified or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The signature does not verify for the named sealer over this room, epoch,
    /// recipient, `enc` and ciphertext: the key was sealed for another recipient, room
    /// or epoch, or a signed field (sealer included) was altered.
    #[error("sealed key signature does not verify")]
    BadSignature,
    /// The sealer bytes are not a usable Ed25519 public key (not a curve point, or a
    /// small-order point).
    #[error("sealer is not a valid Ed25519 public key")]
    InvalidSealerKey,
    /// The signature verified but HPKE authentication failed: the sealer signed a
    /// ciphertext that was not sealed to this recipient for this room, epoch and
    /// sealer (for example, someone else's ciphertext claimed as their own).
    #[error("sealed key does not open")]
    Open,
    /// The ciphertext has the wrong length for a sealed epoch key.
    #[error("sealed key ciphertext is {got} bytes, expected {expected}")]
    BadLength {
        /// Bytes a sealed epoch key has.
        expected: usize,
        /// Bytes found.
        got: usize,
    },
    /// The encapsulated key is a low-order point: no shared secret can come from it.
    #[error("invalid encapsulated key")]
    InvalidEncappedKey,
    /// The recipient's X25519 public key is a low-order point: nothing sealed to it
    /// would be secret.
    #[error("invalid recipient public key")]
    InvalidRecipientKey,
    /// The recipient's X25519 key is not bound to them (their identity did not sign
    /// it): a node could have substituted a key of its own choosing.
    #[error("the recipient's X25519 key is not bound to their identity")]
    UnboundRecipient,
    /// The `info` given to a low-level helper is longer than it accepts.
    #[error("HPKE info of {len} bytes exceeds the limit of {max}")]
    InfoTooLong {
        /// Bytes offered.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// HPKE refused to seal (not expected for any input this module builds).
    #[error("HPKE seal failed")]
    Seal,
}

/// The HPKE `info` for an epoch key:
/// `b"conclave/epoch-key/v2" ‖ room (16) ‖ epoch (u64 BE) ‖ sealer (32)`.
///
/// Every field after the tag has a fixed length, so the encoding is unambiguous.
pub fn epoch_key_info(room: RoomId, epoch: Epoch, sealer: UserId) -> [u8; EPOCH_KEY_INFO_BYTES] {
    let mut info = [0u8; EPOCH_KEY_INFO_BYTES];
    let (tag, rest) = info.split_at_mut(INFO_TAG.len());
    tag.copy_from_slice(INFO_TAG);
    let (room_bytes, rest) = rest.split_at_mut(16);
    room_bytes.copy_from_slice(room.as_bytes());
    let (epoch_bytes, sealer_bytes) = rest.split_at_mut(8);
    epoch_bytes.copy_from_slice(&epoch.0.to_be_bytes());
    sealer_bytes.copy_from_slice(sealer.as_bytes());
    info
}

/// The message the sealer signs (see the module docs for the layout).
fn signed_message(
    room: RoomId,
    epoch: Epoch,
    sealer: UserId,
    recipient: &PublicKey,
    enc: &[u8; 32],
    ciphertext: &[u8; SEALED_KEY_CIPHERTEXT_BYTES],
) -> [u8; SIGNED_BYTES] {
    let mut out = [0u8; SIGNED_BYTES];
    let mut at = 0;
    for field in [
        SIG_TAG,
        room.as_bytes().as_slice(),
        &epoch.0.to_be_bytes(),
        sealer.as_bytes(),
        recipient.as_bytes(),
        enc,
        ciphertext,
    ] {
        out[at..at + field.len()].copy_from_slice(field);
        at += field.len();
    }
    debug_assert_eq!(at, SIGNED_BYTES);
    out
}

/// The ciphertext as the fixed-size array it must be, or [`SealError::BadLength`].
/// The bytes `sealed`'s signature must cover, for `recipient`, `room` and `epoch`.
fn sealed_key_message(
    sealed: &SealedKey,
    recipient: &PublicKey,
    room: RoomId,
    epoch: Epoch,
) -> Result<[u8; SIGNED_BYTES], SealError> {
    let ciphertext = fixed_ciphertext(&sealed.ciphertext)?;
    Ok(signed_message(
        room,
        epoch,
        sealed.sealer,
        recipient,
        &sealed.enc,
        ciphertext,
    ))
}

fn fixed_ciphertext(ciphertext: &[u8]) -> Result<&[u8; SEALED_KEY_CIPHERTEXT_BYTES], SealError> {
    ciphertext.try_into().map_err(|_| SealError::BadLength {
        expected: SEALED_KEY_CIPHERTEXT_BYTES,
        got: ciphertext.len(),
    })
}

/// Seals `key` to `recipient` for `room` and `epoch`, drawing the ephemeral key from
/// `rng`, and signs the result with `sealer`, whose public key becomes the sealed
/// key's [`SealedKey::sealer`].
pub fn seal_epoch_key<R: CryptoRng + ?Sized>(
    rng: &mut R,
    sealer: &SigningKey,
    recipient: &PublicKey,
    room: RoomId,
    epoch: Epoch,
    key: &EpochKey,
) -> Result<SealedKey, SealError> {
    let sealer_id = UserId(sealer.verifying_key().to_bytes());
    let info = epoch_key_info(room, epoch, sealer_id);
    let (enc, ciphertext) = hpke_seal_with_info(rng, recipient, &info, &[], key.as_bytes())?;
    // A 32-byte plaintext always gives 48 bytes; stay total anyway.
    let fixed = fixed_ciphertext(&ciphertext).map_err(|_| SealError::Seal)?;
    let message = signed_message(room, epoch, sealer_id, recipient, &enc, fixed);
    let signature = SignatureBytes::sign(sealer, &message);
    Ok(SealedKey {
        sealer: sealer_id,
        enc,
        ciphertext,
        signature,
    })
}

/// Checks a sealed key's signature, without opening it: what a node, which holds no
/// secret, does before it stores or routes a sealed key addressed to the member whose
/// X25519 public key is `recipient`.
///
/// Fails with [`SealError::BadLength`] if the ciphertext has the wrong length,
/// [`SealError::InvalidSealerKey`] if the sealer is not a usable Ed25519 key, and
/// [`SealError::BadSignature`] unless `sealed.sealer` signed exactly this room, epoch,
/// recipient, `enc` and ciphertext.
///
/// Success proves only who sealed the key. The caller must still check that
/// `sealed.sealer` is authorized to set this room's key.
pub fn verify_sealed_key(
    sealed: &SealedKey,
    recipient: &PublicKey,
    room: RoomId,
    epoch: Epoch,
) -> Result<(), SealError> {
    let message = sealed_key_message(sealed, recipient, room, epoch)?;
    verify_strict(sealed.sealer.as_bytes(), &message, &sealed.signature).map_err(|e| match e {
        VerifyError::InvalidKey => SealError::InvalidSealerKey,
        VerifyError::BadSignature => SealError::BadSignature,
    })
}

/// Opens a key sealed to `recipient` for `room` and `epoch`.
///
/// First runs [`verify_sealed_key`] against the public key of `recipient` (so a key
/// sealed or signed for anyone else, or altered in any signed field, fails with
/// [`SealError::BadSignature`] before any decryption), then opens the HPKE ciphertext
/// with `info` [`epoch_key_info`]`(room, epoch, sealed.sealer)`.
///
/// The returned key is authenticated as sealed by `sealed.sealer`; the caller must
/// still check that this member is authorized to set keys for this room and epoch
/// before using it.
pub fn open_epoch_key(
    recipient: &StaticSecret,
    room: RoomId,
    epoch: Epoch,
    sealed: &SealedKey,
) -> Result<EpochKey, SealError> {
    verify_sealed_key(sealed, &PublicKey::from(recipient), room, epoch)?;
    let info = epoch_key_info(room, epoch, sealed.sealer);
    let plaintext = Zeroizing::new(hpke_open_with_info(
        recipient,
        &sealed.enc,
        &info,
        &[],
        &sealed.ciphertext,
    )?);
    // The length check fixes the plaintext at 32 bytes; stay total anyway.
    if plaintext.len() != EPOCH_KEY_BYTES {
        return Err(SealError::BadLength {
            expected: SEALED_KEY_CIPHERTEXT_BYTES,
            got: sealed.ciphertext.len(),
        });
    }
    // Copy straight into the key (zeroized on drop), with no intermediate array.
    let mut key = EpochKey([0u8; EPOCH_KEY_BYTES]);
    key.0.copy_from_slice(&plaintext);
    Ok(key)
}

/// Single-shot HPKE seal (base mode, this module's suite) with explicit `info` and
/// `aad`: the exact call [`seal_epoch_key`] makes. Private: it bypasses the domain
/// separation of [`epoch_key_info`]; the RFC 9180 known-answer test below drives it.
fn hpke_seal_with_info<R: CryptoRng + ?Sized>(
    rng: &mut R,
    recipient: &PublicKey,
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
) -> Result<([u8; 32], Vec<u8>), SealError> {
    if info.len() > HPKE_INFO_BYTES_MAX {
        return Err(SealError::InfoTooLong {
            len: info.len(),
            max: HPKE_INFO_BYTES_MAX,
        });
    }
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(recipient.as_bytes())
        .map_err(|_| SealError::InvalidRecipientKey)?;
    // hpke wants a sized `impl CryptoRng`; `&mut R` is one even when `R` is `dyn`.
    let (enc, ciphertext) = hpke::single_shot_seal_with_rng::<Aead, Kdf, Kem>(
        &OpModeS::Base,
        &pk,
        info,
        plaintext,
        aad,
        &mut &mut *rng,
    )
    .map_err(|e| match e {
        // The only encapsulation failure is an all-zero DH output: a low-order key.
        hpke::HpkeError::EncapError => SealError::InvalidRecipientKey,
        _ => SealError::Seal,
    })?;
    Ok((enc.to_bytes().into(), ciphertext))
}

/// Single-shot HPKE open matching [`hpke_seal_with_info`]; what [`open_epoch_key`]
/// calls once the signature has verified.
fn hpke_open_with_info(
    recipient: &StaticSecret,
    enc: &[u8; 32],
    info: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Vec<u8>, SealError> {
    if info.len() > HPKE_INFO_BYTES_MAX {
        return Err(SealError::InfoTooLong {
            len: info.len(),
            max: HPKE_INFO_BYTES_MAX,
        });
    }
    // Both conversions only check the length, which the array types already fix.
    let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(recipient.as_bytes())
        .map_err(|_| SealError::Open)?;
    let encapped = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc)
        .map_err(|_| SealError::InvalidEncappedKey)?;
    hpke::single_shot_open::<Aead, Kdf, Kem>(&OpModeR::Base, &sk, &encapped, info, ciphertext, aad)
        .map_err(|e| match e {
            // Decapsulation fails only on an all-zero DH output: a low-order `enc`.
            hpke::HpkeError::DecapError => SealError::InvalidEncappedKey,
            _ => SealError::Open,
        })
}

#[cfg(test)]
mod tests;
