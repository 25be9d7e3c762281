//! Sealing epoch keys to members with HPKE (RFC 9180).
//!
//! Suite: base mode, DHKEM(X25519, HKDF-SHA256) (KEM 0x0020), HKDF-SHA256 (KDF 0x0001),
//! ChaCha20-Poly1305 (AEAD 0x0003). The room and epoch go into the HPKE `info` (see
//! [`epoch_key_info`]), so the key schedule itself differs per (room, epoch): a sealed
//! key moved to another room or epoch fails to open rather than being accepted.

use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::{EpochKey, EPOCH_KEY_BYTES};
use crate::ids::{Epoch, RoomId};

type Kem = hpke::kem::X25519HkdfSha256;
type Kdf = hpke::kdf::HkdfSha256;
type Aead = hpke::aead::ChaCha20Poly1305;

/// Length of a sealed epoch key's ciphertext: the 32 key bytes plus the 16-byte tag.
pub const SEALED_KEY_CIPHERTEXT_BYTES: usize = EPOCH_KEY_BYTES + 16;

/// Domain tag at the front of every epoch-key `info`; bump `v1` on any format change.
const INFO_TAG: &[u8] = b"conclave/epoch-key/v1";

/// Length of [`epoch_key_info`]: tag ‖ room (16) ‖ epoch (8, big-endian).
const INFO_BYTES: usize = INFO_TAG.len() + 16 + 8;

/// Upper bound on `info` for the low-level helpers. HPKE itself panics when
/// `info` approaches 2¹⁶ bytes, so the helpers refuse long inputs up front.
const HPKE_INFO_BYTES_MAX: usize = 1024;

/// An epoch key sealed to one member's X25519 key. Nodes store and route it; only
/// the member can open it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedKey {
    /// The HPKE encapsulated key (the sender's ephemeral X25519 public key).
    pub enc: [u8; 32],
    /// The HPKE ciphertext of the 32 key bytes: always
    /// [`SEALED_KEY_CIPHERTEXT_BYTES`] long when well formed.
    pub ciphertext: Vec<u8>,
}

/// Why an epoch key could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Authentication failed: the key was sealed to someone else, for another room or
    /// epoch, or the encapsulated key or ciphertext was altered.
    #[error("sealed key does not open (wrong recipient, room or epoch, or tampered)")]
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

/// The HPKE `info` for an epoch key: `b"conclave/epoch-key/v1" ‖ room ‖ epoch (u64 BE)`.
///
/// Every field after the tag has a fixed length, so the encoding is unambiguous.
pub fn epoch_key_info(room: RoomId, epoch: Epoch) -> [u8; INFO_BYTES] {
    let mut info = [0u8; INFO_BYTES];
    let (tag, rest) = info.split_at_mut(INFO_TAG.len());
    tag.copy_from_slice(INFO_TAG);
    let (room_bytes, epoch_bytes) = rest.split_at_mut(16);
    room_bytes.copy_from_slice(room.as_bytes());
    epoch_bytes.copy_from_slice(&epoch.0.to_be_bytes());
    info
}

/// Seals `key` to `recipient` for `room` and `epoch`, drawing the ephemeral key from
/// `rng`.
pub fn seal_epoch_key<R: CryptoRng + ?Sized>(
    rng: &mut R,
    recipient: &PublicKey,
    room: RoomId,
    epoch: Epoch,
    key: &EpochKey,
) -> Result<SealedKey, SealError> {
    let info = epoch_key_info(room, epoch);
    let (enc, ciphertext) = hpke_seal_with_info(rng, recipient, &info, &[], key.as_bytes())?;
    Ok(SealedKey { enc, ciphertext })
}

/// Opens a key sealed to `recipient` for `room` and `epoch`.
///
/// Fails with [`SealError::Open`] unless the key was sealed to this recipient for
/// exactly this room and epoch and arrived unaltered.
pub fn open_epoch_key(
    recipient: &StaticSecret,
    room: RoomId,
    epoch: Epoch,
    sealed: &SealedKey,
) -> Result<EpochKey, SealError> {
    if sealed.ciphertext.len() != SEALED_KEY_CIPHERTEXT_BYTES {
        return Err(SealError::BadLength {
            expected: SEALED_KEY_CIPHERTEXT_BYTES,
            got: sealed.ciphertext.len(),
        });
    }
    let info = epoch_key_info(room, epoch);
    let plaintext = Zeroizing::new(hpke_open_with_info(
        recipient,
        &sealed.enc,
        &info,
        &[],
        &sealed.ciphertext,
    )?);
    // The length check above fixes the plaintext at 32 bytes; stay total anyway.
    let bytes: [u8; EPOCH_KEY_BYTES] =
        plaintext
            .as_slice()
            .try_into()
            .map_err(|_| SealError::BadLength {
                expected: SEALED_KEY_CIPHERTEXT_BYTES,
                got: sealed.ciphertext.len(),
            })?;
    Ok(EpochKey::from_bytes(bytes))
}

/// Single-shot HPKE seal (base mode, this module's suite) with explicit `info` and
/// `aad`. This is the exact call [`seal_epoch_key`] makes; it is public only so the
/// RFC 9180 known-answer tests can drive it with the RFC's `info` and `aad`.
#[doc(hidden)]
pub fn hpke_seal_with_info<R: CryptoRng + ?Sized>(
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
/// calls after its length check.
#[doc(hidden)]
pub fn hpke_open_with_info(
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
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    const ROOM: RoomId = RoomId([0x11; 16]);
    const EPOCH: Epoch = Epoch(7);

    struct Setup {
        rng: ChaCha20Rng,
        alice: StaticSecret,
        bob: StaticSecret,
        key: EpochKey,
        sealed: SealedKey,
    }

    fn setup() -> Setup {
        let mut rng = ChaCha20Rng::seed_from_u64(42);
        let alice = StaticSecret::random_from_rng(&mut rng);
        let bob = StaticSecret::random_from_rng(&mut rng);
        let key = EpochKey::generate(&mut rng);
        let sealed =
            seal_epoch_key(&mut rng, &PublicKey::from(&alice), ROOM, EPOCH, &key).expect("seal");
        Setup {
            rng,
            alice,
            bob,
            key,
            sealed,
        }
    }

    #[test]
    fn round_trip() {
        let s = setup();
        assert_eq!(s.sealed.ciphertext.len(), SEALED_KEY_CIPHERTEXT_BYTES);
        let opened = open_epoch_key(&s.alice, ROOM, EPOCH, &s.sealed).expect("open");
        assert_eq!(opened.as_bytes(), s.key.as_bytes());
    }

    #[test]
    fn round_trip_through_a_dyn_rng_and_postcard() {
        let mut s = setup();
        let rng: &mut dyn CryptoRng = &mut s.rng;
        let sealed =
            seal_epoch_key(rng, &PublicKey::from(&s.bob), ROOM, EPOCH, &s.key).expect("seal");
        let bytes = postcard::to_stdvec(&sealed).expect("encode");
        let back: SealedKey = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(back, sealed);
        let opened = open_epoch_key(&s.bob, ROOM, EPOCH, &back).expect("open");
        assert_eq!(opened.as_bytes(), s.key.as_bytes());
    }

    #[test]
    fn wrong_recipient() {
        let s = setup();
        assert_eq!(
            open_epoch_key(&s.bob, ROOM, EPOCH, &s.sealed).unwrap_err(),
            SealError::Open
        );
    }

    #[test]
    fn wrong_room() {
        let s = setup();
        assert_eq!(
            open_epoch_key(&s.alice, RoomId([0x12; 16]), EPOCH, &s.sealed).unwrap_err(),
            SealError::Open
        );
    }

    #[test]
    fn wrong_epoch() {
        let s = setup();
        assert_eq!(
            open_epoch_key(&s.alice, ROOM, Epoch(8), &s.sealed).unwrap_err(),
            SealError::Open
        );
    }

    #[test]
    fn tampered_enc() {
        let s = setup();
        for i in [0, 15, 31] {
            let mut bad = s.sealed.clone();
            bad.enc[i] ^= 0x01;
            assert_eq!(
                open_epoch_key(&s.alice, ROOM, EPOCH, &bad).unwrap_err(),
                SealError::Open,
                "enc byte {i}"
            );
        }
    }

    #[test]
    fn low_order_enc_is_invalid() {
        let s = setup();
        let mut bad = s.sealed.clone();
        // u = 0 is a low-order point: the X25519 output is all zeros.
        bad.enc = [0u8; 32];
        assert_eq!(
            open_epoch_key(&s.alice, ROOM, EPOCH, &bad).unwrap_err(),
            SealError::InvalidEncappedKey
        );
    }

    #[test]
    fn low_order_recipient_is_refused() {
        let mut s = setup();
        assert_eq!(
            seal_epoch_key(&mut s.rng, &PublicKey::from([0u8; 32]), ROOM, EPOCH, &s.key)
                .unwrap_err(),
            SealError::InvalidRecipientKey
        );
    }

    #[test]
    fn tampered_ciphertext() {
        let s = setup();
        for i in 0..SEALED_KEY_CIPHERTEXT_BYTES {
            let mut bad = s.sealed.clone();
            bad.ciphertext[i] ^= 0x80;
            assert_eq!(
                open_epoch_key(&s.alice, ROOM, EPOCH, &bad).unwrap_err(),
                SealError::Open,
                "ciphertext byte {i}"
            );
        }
    }

    #[test]
    fn truncated_or_extended_ciphertext() {
        let s = setup();
        for len in [0, 1, 16, SEALED_KEY_CIPHERTEXT_BYTES - 1] {
            let mut bad = s.sealed.clone();
            bad.ciphertext.truncate(len);
            assert_eq!(
                open_epoch_key(&s.alice, ROOM, EPOCH, &bad).unwrap_err(),
                SealError::BadLength {
                    expected: SEALED_KEY_CIPHERTEXT_BYTES,
                    got: len
                }
            );
        }
        let mut longer = s.sealed.clone();
        longer.ciphertext.push(0);
        assert_eq!(
            open_epoch_key(&s.alice, ROOM, EPOCH, &longer).unwrap_err(),
            SealError::BadLength {
                expected: SEALED_KEY_CIPHERTEXT_BYTES,
                got: SEALED_KEY_CIPHERTEXT_BYTES + 1
            }
        );
    }

    #[test]
    fn info_is_domain_separated_and_fixed_length() {
        let info = epoch_key_info(RoomId([0xaa; 16]), Epoch(0x0102_0304_0506_0708));
        assert_eq!(info.len(), INFO_TAG.len() + 24);
        assert!(info.starts_with(b"conclave/epoch-key/v1"));
        assert_eq!(&info[INFO_TAG.len()..INFO_TAG.len() + 16], &[0xaa; 16]);
        assert_eq!(&info[INFO_TAG.len() + 16..], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn helpers_refuse_long_info() {
        let mut s = setup();
        let long = vec![0u8; HPKE_INFO_BYTES_MAX + 1];
        let expected = SealError::InfoTooLong {
            len: HPKE_INFO_BYTES_MAX + 1,
            max: HPKE_INFO_BYTES_MAX,
        };
        assert_eq!(
            hpke_seal_with_info(&mut s.rng, &PublicKey::from(&s.alice), &long, &[], b"x")
                .unwrap_err(),
            expected
        );
        assert_eq!(
            hpke_open_with_info(&s.alice, &s.sealed.enc, &long, &[], &s.sealed.ciphertext)
                .unwrap_err(),
            expected
        );
    }
}
