//! Frames: one encrypted, signed message in a room.
//!
//! Sealing encrypts the plaintext under the epoch key with ChaCha20-Poly1305, a
//! random 96-bit nonce from the caller's rng, and associated data binding the room,
//! epoch, sender and message id; then signs every other field with the sender's
//! Ed25519 key. Opening reverses it: signature first (what a node, which has no key,
//! can check on its own), then the room and epoch the caller expects, then decryption.
//!
//! # Encodings
//!
//! All multi-field inputs to the cryptography are fixed-layout byte strings led by a
//! distinct domain tag, so no two different frames produce the same input:
//!
//! - associated data: `b"conclave/frame-aad/v1" ‖ room (16) ‖ epoch (u64 BE) ‖
//!   sender (32) ‖ id (u128 BE)`;
//! - signed message: `b"conclave/frame-sig/v1" ‖ room (16) ‖ epoch (u64 BE) ‖
//!   sender (32) ‖ id (u128 BE) ‖ nonce (12) ‖ ciphertext length (u64 BE) ‖ ciphertext`.
//!
//! On the wire a frame is its postcard encoding ([`Frame::encode`]). The signature is
//! a [`SignatureBytes`]: 64 raw bytes, written by postcard with no length prefix.
//! It is checked by the same strict verification as a sealed key's (the sender must
//! be a valid, non-small-order Ed25519 key; non-canonical signatures are refused).

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use ed25519_dalek::SigningKey;
use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};

use super::sig::{verify_strict, SignatureBytes, VerifyError};
use super::EpochKey;
use crate::ids::{Epoch, MessageId, RoomId, UserId};
use crate::wire::{decode_bounded, encode_bounded, WireError};

/// The largest plaintext one frame carries: 256 KiB.
pub const FRAME_PLAINTEXT_BYTES_MAX: usize = 256 * 1024;

/// The largest ciphertext one frame carries: the plaintext limit plus the 16-byte tag.
pub const FRAME_CIPHERTEXT_BYTES_MAX: usize = FRAME_PLAINTEXT_BYTES_MAX + TAG_BYTES;

/// The largest encoded frame. The fixed fields take at most 158 bytes in postcard
/// (16 + 10 + 32 + 19 + 12 + 5 + 64); 1 KiB of headroom keeps the bound simple.
pub const FRAME_BYTES_MAX: usize = FRAME_CIPHERTEXT_BYTES_MAX + 1024;

/// ChaCha20-Poly1305 tag length.
const TAG_BYTES: usize = 16;

const AAD_TAG: &[u8] = b"conclave/frame-aad/v1";
const SIG_TAG: &[u8] = b"conclave/frame-sig/v1";

/// One message in a room: encrypted under the epoch key, signed by its sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    /// The room the frame was sent to.
    pub room: RoomId,
    /// The key epoch it was encrypted under.
    pub epoch: Epoch,
    /// The sender: their Ed25519 public key, which the signature is checked against.
    pub sender: UserId,
    /// The message id (a ULID).
    pub id: MessageId,
    /// The ChaCha20-Poly1305 nonce, random per frame.
    pub nonce: [u8; 12],
    /// The ciphertext, tag included.
    // As bytes, not a sequence of u8: the same postcard encoding (length, then the
    // bytes), copied in one go instead of element by element.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    /// The sender's signature over every other field.
    pub signature: SignatureBytes,
}

/// Why a frame could not be sealed, encoded, decoded, verified or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The bytes are not a frame (truncated, malformed, oversized or with trailing
    /// bytes).
    #[error("frame does not decode: {0}")]
    Decode(WireError),
    /// The frame did not encode (other than for its size).
    #[error("frame does not encode: {0}")]
    Encode(WireError),
    /// The plaintext, ciphertext or encoding exceeds its limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Bytes offered.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The signature does not verify for the named sender over these fields.
    #[error("frame signature does not verify")]
    BadSignature,
    /// The sender bytes are not a usable Ed25519 public key (not a curve point, or a
    /// small-order point).
    #[error("frame sender is not a valid Ed25519 public key")]
    InvalidSenderKey,
    /// The frame belongs to another room than the caller expects.
    #[error("frame is for room {got}, expected room {expected}")]
    WrongRoom {
        /// The room the caller expects.
        expected: RoomId,
        /// The room the frame names.
        got: RoomId,
    },
    /// The frame is of another epoch than the caller expects.
    #[error("frame is of epoch {}, expected epoch {}", .got.0, .expected.0)]
    WrongEpoch {
        /// The epoch the caller expects.
        expected: Epoch,
        /// The epoch the frame names.
        got: Epoch,
    },
    /// Decryption failed: wrong epoch key, or fields bound as associated data differ
    /// from those the frame was encrypted with.
    #[error("frame does not decrypt")]
    Decrypt,
}

impl Frame {
    /// The postcard encoding, at most [`FRAME_BYTES_MAX`] bytes.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        encode_bounded(self, FRAME_BYTES_MAX).map_err(|e| match e {
            WireError::TooLarge { len, max } => FrameError::TooLarge { len, max },
            other => FrameError::Encode(other),
        })
    }

    /// Decodes exactly one frame from `bytes` (bounded; trailing bytes are an error).
    ///
    /// Decoding checks structure only: call [`verify_frame`] or [`open_frame`].
    pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
        decode_bounded(bytes, FRAME_BYTES_MAX).map_err(FrameError::Decode)
    }
}

/// The associated data: domain tag ‖ room ‖ epoch ‖ sender ‖ id, all fixed-length.
fn associated_data(room: RoomId, epoch: Epoch, sender: UserId, id: MessageId) -> Vec<u8> {
    let mut out = Vec::with_capacity(AAD_TAG.len() + 16 + 8 + 32 + 16);
    out.extend_from_slice(AAD_TAG);
    out.extend_from_slice(room.as_bytes());
    out.extend_from_slice(&epoch.0.to_be_bytes());
    out.extend_from_slice(sender.as_bytes());
    out.extend_from_slice(&id.0.to_be_bytes());
    out
}

/// The signed message: domain tag ‖ fixed-length fields ‖ ciphertext length ‖
/// ciphertext. Only the last field varies in length and it is length-prefixed.
fn signed_message(frame: &Frame) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(SIG_TAG.len() + 16 + 8 + 32 + 16 + 12 + 8 + frame.ciphertext.len());
    out.extend_from_slice(SIG_TAG);
    out.extend_from_slice(frame.room.as_bytes());
    out.extend_from_slice(&frame.epoch.0.to_be_bytes());
    out.extend_from_slice(frame.sender.as_bytes());
    out.extend_from_slice(&frame.id.0.to_be_bytes());
    out.extend_from_slice(&frame.nonce);
    out.extend_from_slice(&(frame.ciphertext.len() as u64).to_be_bytes());
    out.extend_from_slice(&frame.ciphertext);
    out
}

/// The frame cipher for `key`. Borrows the key bytes rather than copying them; the
/// cipher's own copy is zeroized when it drops (chacha20poly1305's `zeroize` feature).
fn cipher(key: &EpochKey) -> ChaCha20Poly1305 {
    let key: &Key = key.as_bytes().into();
    ChaCha20Poly1305::new(key)
}

/// Encrypts `plaintext` for `room` at `epoch` under `key` and signs the frame with
/// `signer`, whose public key becomes the frame's sender. The nonce comes from `rng`.
pub fn seal_frame<R: CryptoRng + ?Sized>(
    rng: &mut R,
    signer: &SigningKey,
    key: &EpochKey,
    room: RoomId,
    epoch: Epoch,
    id: MessageId,
    plaintext: &[u8],
) -> Result<Frame, FrameError> {
    if plaintext.len() > FRAME_PLAINTEXT_BYTES_MAX {
        return Err(FrameError::TooLarge {
            len: plaintext.len(),
            max: FRAME_PLAINTEXT_BYTES_MAX,
        });
    }
    let sender = UserId(signer.verifying_key().to_bytes());
    let mut nonce = [0u8; 12];
    rng.fill_bytes(&mut nonce);
    let aad = associated_data(room, epoch, sender, id);
    let ciphertext = cipher(key)
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        // ChaCha20-Poly1305 refuses only plaintexts of about 256 GiB, far above our limit.
        .map_err(|_| FrameError::TooLarge {
            len: plaintext.len(),
            max: FRAME_PLAINTEXT_BYTES_MAX,
        })?;
    let mut frame = Frame {
        room,
        epoch,
        sender,
        id,
        nonce,
        ciphertext,
        signature: SignatureBytes([0u8; 64]),
    };
    frame.signature = SignatureBytes::sign(signer, &signed_message(&frame));
    Ok(frame)
}

/// Checks the frame's signature against its sender, without decrypting: what a room's
/// home node does before sequencing a frame (it holds no epoch key).
pub fn verify_frame(frame: &Frame) -> Result<(), FrameError> {
    if frame.ciphertext.len() > FRAME_CIPHERTEXT_BYTES_MAX {
        return Err(FrameError::TooLarge {
            len: frame.ciphertext.len(),
            max: FRAME_CIPHERTEXT_BYTES_MAX,
        });
    }
    verify_strict(
        frame.sender.as_bytes(),
        &signed_message(frame),
        &frame.signature,
    )
    .map_err(|e| match e {
        VerifyError::InvalidKey => FrameError::InvalidSenderKey,
        VerifyError::BadSignature => FrameError::BadSignature,
    })
}

/// Verifies, then checks the frame is for `room` at `epoch`, then decrypts it with
/// `key`, returning the plaintext.
pub fn open_frame(
    frame: &Frame,
    room: RoomId,
    epoch: Epoch,
    key: &EpochKey,
) -> Result<Vec<u8>, FrameError> {
    verify_frame(frame)?;
    if frame.room != room {
        return Err(FrameError::WrongRoom {
            expected: room,
            got: frame.room,
        });
    }
    if frame.epoch != epoch {
        return Err(FrameError::WrongEpoch {
            expected: epoch,
            got: frame.epoch,
        });
    }
    let aad = associated_data(frame.room, frame.epoch, frame.sender, frame.id);
    cipher(key)
        .decrypt(
            &Nonce::from(frame.nonce),
            Payload {
                msg: &frame.ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| FrameError::Decrypt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::VerifyingKey;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    const ROOM: RoomId = RoomId([0x21; 16]);
    const EPOCH: Epoch = Epoch(3);

    struct Setup {
        rng: ChaCha20Rng,
        alice: SigningKey,
        mallory: SigningKey,
        key: EpochKey,
        frame: Frame,
    }

    fn setup() -> Setup {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let alice = SigningKey::generate(&mut rng);
        let mallory = SigningKey::generate(&mut rng);
        let key = EpochKey::generate(&mut rng);
        let id = MessageId::from_parts(1_700_000_000_000, 0x1234);
        let frame =
            seal_frame(&mut rng, &alice, &key, ROOM, EPOCH, id, b"hello, room").expect("seal");
        Setup {
            rng,
            alice,
            mallory,
            key,
            frame,
        }
    }

    /// One way of altering a frame after it was signed.
    type Tamper = Box<dyn Fn(&mut Frame)>;

    fn resign(frame: &mut Frame, signer: &SigningKey) {
        frame.signature = SignatureBytes::sign(signer, &signed_message(frame));
    }

    #[test]
    fn round_trip() {
        let s = setup();
        assert_eq!(s.frame.sender, UserId(s.alice.verifying_key().to_bytes()));
        assert_eq!(s.frame.ciphertext.len(), b"hello, room".len() + TAG_BYTES);
        verify_frame(&s.frame).expect("verify");
        let plaintext = open_frame(&s.frame, ROOM, EPOCH, &s.key).expect("open");
        assert_eq!(plaintext, b"hello, room");
    }

    #[test]
    fn round_trip_through_the_wire_and_a_dyn_rng() {
        let mut s = setup();
        let rng: &mut dyn CryptoRng = &mut s.rng;
        let id = MessageId::from_parts(1, 2);
        let frame = seal_frame(rng, &s.alice, &s.key, ROOM, EPOCH, id, &[]).expect("seal");
        let bytes = frame.encode().expect("encode");
        let back = Frame::decode(&bytes).expect("decode");
        assert_eq!(back, frame);
        assert_eq!(open_frame(&back, ROOM, EPOCH, &s.key).expect("open"), b"");
    }

    #[test]
    fn nonces_come_from_the_rng() {
        let mut s = setup();
        let id = s.frame.id;
        let again = seal_frame(
            &mut s.rng,
            &s.alice,
            &s.key,
            ROOM,
            EPOCH,
            id,
            b"hello, room",
        )
        .expect("seal");
        assert_ne!(again.nonce, s.frame.nonce);
        assert_ne!(again.ciphertext, s.frame.ciphertext);
        // The same seed gives the same frame: nothing else is random.
        assert_eq!(setup().frame, s.frame);
    }

    #[test]
    fn tampering_any_signed_field_breaks_the_signature() {
        let s = setup();
        let bob = UserId(s.mallory.verifying_key().to_bytes());
        let tampers: Vec<(&str, Tamper)> = vec![
            ("room", Box::new(|f| f.room.0[0] ^= 1)),
            ("epoch", Box::new(|f| f.epoch.0 += 1)),
            ("sender", Box::new(move |f| f.sender = bob)),
            ("id", Box::new(|f| f.id.0 ^= 1)),
            ("nonce", Box::new(|f| f.nonce[11] ^= 1)),
            ("ciphertext", Box::new(|f| f.ciphertext[0] ^= 1)),
            (
                "ciphertext length",
                Box::new(|f| {
                    f.ciphertext.pop();
                }),
            ),
            ("signature R", Box::new(|f| f.signature.0[0] ^= 1)),
            ("signature s", Box::new(|f| f.signature.0[40] ^= 1)),
        ];
        for (name, tamper) in tampers {
            let mut bad = s.frame.clone();
            tamper(&mut bad);
            assert_ne!(bad, s.frame, "{name}");
            assert_eq!(verify_frame(&bad), Err(FrameError::BadSignature), "{name}");
            // The signature is checked before the room/epoch and before decryption.
            assert_eq!(
                open_frame(&bad, ROOM, EPOCH, &s.key),
                Err(FrameError::BadSignature),
                "{name}"
            );
        }
    }

    #[test]
    fn sender_that_is_not_a_point_is_an_invalid_key() {
        let s = setup();
        // Deterministically pick 32-byte strings that fail to decompress.
        let not_points: Vec<[u8; 32]> = (0u8..=255)
            .map(|b| [b; 32])
            .filter(|bytes| VerifyingKey::from_bytes(bytes).is_err())
            .take(3)
            .collect();
        assert!(!not_points.is_empty());
        for bytes in not_points {
            let mut bad = s.frame.clone();
            bad.sender = UserId(bytes);
            assert_eq!(verify_frame(&bad), Err(FrameError::InvalidSenderKey));
            assert_eq!(
                open_frame(&bad, ROOM, EPOCH, &s.key),
                Err(FrameError::InvalidSenderKey)
            );
        }
    }

    #[test]
    fn small_order_sender_is_an_invalid_key() {
        let s = setup();
        let mut identity = [0u8; 32];
        identity[0] = 1; // the neutral element: a valid encoding of a small-order point
        let mut bad = s.frame.clone();
        bad.sender = UserId(identity);
        assert_eq!(verify_frame(&bad), Err(FrameError::InvalidSenderKey));
    }

    #[test]
    fn wrong_key_fails_to_decrypt() {
        let mut s = setup();
        let other = EpochKey::generate(&mut s.rng);
        assert_eq!(
            open_frame(&s.frame, ROOM, EPOCH, &other),
            Err(FrameError::Decrypt)
        );
    }

    #[test]
    fn another_epoch_is_refused() {
        let mut s = setup();
        let id = s.frame.id;
        let old =
            seal_frame(&mut s.rng, &s.alice, &s.key, ROOM, Epoch(2), id, b"old").expect("seal");
        assert_eq!(
            open_frame(&old, ROOM, EPOCH, &s.key),
            Err(FrameError::WrongEpoch {
                expected: EPOCH,
                got: Epoch(2)
            })
        );
    }

    #[test]
    fn another_room_is_refused() {
        let mut s = setup();
        let id = s.frame.id;
        let elsewhere = RoomId([0x22; 16]);
        let frame =
            seal_frame(&mut s.rng, &s.alice, &s.key, elsewhere, EPOCH, id, b"x").expect("seal");
        assert_eq!(
            open_frame(&frame, ROOM, EPOCH, &s.key),
            Err(FrameError::WrongRoom {
                expected: ROOM,
                got: elsewhere
            })
        );
    }

    #[test]
    fn mallory_cannot_sign_as_alice() {
        let s = setup();
        // Mallory builds a frame naming Alice as sender and signs it herself.
        let mut forged = s.frame.clone();
        forged.ciphertext[0] ^= 1;
        resign(&mut forged, &s.mallory);
        assert_eq!(forged.sender, s.frame.sender);
        assert_eq!(verify_frame(&forged), Err(FrameError::BadSignature));
        assert_eq!(
            open_frame(&forged, ROOM, EPOCH, &s.key),
            Err(FrameError::BadSignature)
        );
    }

    #[test]
    fn mallory_resigning_alices_ciphertext_does_not_decrypt() {
        let s = setup();
        // Mallory, a member with the epoch key, claims Alice's ciphertext as her own.
        let mut stolen = s.frame.clone();
        stolen.sender = UserId(s.mallory.verifying_key().to_bytes());
        resign(&mut stolen, &s.mallory);
        assert_eq!(verify_frame(&stolen), Ok(()));
        // The sender is bound in the associated data, so decryption fails.
        assert_eq!(
            open_frame(&stolen, ROOM, EPOCH, &s.key),
            Err(FrameError::Decrypt)
        );
    }

    #[test]
    fn every_truncation_is_a_decode_error() {
        let s = setup();
        let bytes = s.frame.encode().expect("encode");
        for len in 0..bytes.len() {
            match Frame::decode(&bytes[..len]) {
                Err(FrameError::Decode(_)) => {}
                other => panic!("prefix of {len} bytes: {other:?}"),
            }
        }
        // Cutting inside the fixed fields or the ciphertext is reported as truncation.
        assert_eq!(
            Frame::decode(&bytes[..bytes.len() - 1]),
            Err(FrameError::Decode(WireError::Truncated))
        );
        assert_eq!(
            Frame::decode(&[]),
            Err(FrameError::Decode(WireError::Truncated))
        );
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            Frame::decode(&longer),
            Err(FrameError::Decode(WireError::TrailingBytes(1)))
        );
    }

    #[test]
    fn oversize_input_is_refused() {
        let mut s = setup();
        let id = s.frame.id;
        let big = vec![0u8; FRAME_PLAINTEXT_BYTES_MAX + 1];
        assert_eq!(
            seal_frame(&mut s.rng, &s.alice, &s.key, ROOM, EPOCH, id, &big),
            Err(FrameError::TooLarge {
                len: FRAME_PLAINTEXT_BYTES_MAX + 1,
                max: FRAME_PLAINTEXT_BYTES_MAX
            })
        );
        // The largest plaintext fits, on the wire too.
        let max = vec![0u8; FRAME_PLAINTEXT_BYTES_MAX];
        let frame = seal_frame(&mut s.rng, &s.alice, &s.key, ROOM, EPOCH, id, &max).expect("seal");
        let bytes = frame.encode().expect("encode");
        assert!(bytes.len() <= FRAME_BYTES_MAX);
        assert_eq!(Frame::decode(&bytes).expect("decode"), frame);

        // A frame carrying too much ciphertext is refused before any verification.
        let mut fat = frame.clone();
        fat.ciphertext.push(0);
        assert_eq!(
            verify_frame(&fat),
            Err(FrameError::TooLarge {
                len: FRAME_CIPHERTEXT_BYTES_MAX + 1,
                max: FRAME_CIPHERTEXT_BYTES_MAX
            })
        );
        fat.ciphertext.resize(FRAME_BYTES_MAX, 0);
        assert!(matches!(
            fat.encode(),
            Err(FrameError::TooLarge {
                max: FRAME_BYTES_MAX,
                ..
            })
        ));
        assert_eq!(
            Frame::decode(&vec![0u8; FRAME_BYTES_MAX + 1]),
            Err(FrameError::Decode(WireError::TooLarge {
                len: FRAME_BYTES_MAX + 1,
                max: FRAME_BYTES_MAX
            }))
        );
    }

    #[test]
    fn signature_serializes_as_64_raw_bytes_inside_a_frame() {
        let s = setup();
        let bytes = s.frame.encode().expect("encode");
        // The signature is the last field: its 64 raw bytes end the encoding.
        assert_eq!(&bytes[bytes.len() - 64..], &s.frame.signature.0);
    }

    /// Changes `field`, re-signs with Alice's (the real sender's) key so the signature
    /// holds, and opens with the room and epoch the changed frame names: decryption
    /// must fail, which shows the field is bound in the associated data.
    fn assert_bound_in_aad(field: &str, change: impl Fn(&mut Frame)) {
        let s = setup();
        let mut changed = s.frame.clone();
        change(&mut changed);
        assert_ne!(changed, s.frame, "{field}");
        resign(&mut changed, &s.alice);
        assert_eq!(verify_frame(&changed), Ok(()), "{field}");
        assert_eq!(
            open_frame(&changed, changed.room, changed.epoch, &s.key),
            Err(FrameError::Decrypt),
            "{field}"
        );
    }

    #[test]
    fn room_is_bound_in_the_associated_data() {
        assert_bound_in_aad("room", |f| f.room = RoomId([0x22; 16]));
    }

    #[test]
    fn epoch_is_bound_in_the_associated_data() {
        assert_bound_in_aad("epoch", |f| f.epoch = Epoch(f.epoch.0 + 1));
    }

    #[test]
    fn id_is_bound_in_the_associated_data() {
        assert_bound_in_aad("id", |f| f.id = MessageId(f.id.0 ^ 1));
    }

    #[test]
    fn resigned_unchanged_frame_still_opens() {
        // The control for the three tests above: re-signing alone changes nothing.
        let s = setup();
        let mut same = s.frame.clone();
        resign(&mut same, &s.alice);
        assert_eq!(
            open_frame(&same, ROOM, EPOCH, &s.key).expect("open"),
            b"hello, room"
        );
    }
}
