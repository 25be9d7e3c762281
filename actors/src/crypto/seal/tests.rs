//! Tests of sealing, signing, verifying and opening epoch keys, and the RFC 9180
//! known-answer test of the private HPKE helpers.

use ed25519_dalek::VerifyingKey;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use super::*;

const ROOM: RoomId = RoomId([0x11; 16]);
const EPOCH: Epoch = Epoch(7);

struct Setup {
    rng: ChaCha20Rng,
    /// The recipient of `sealed`.
    alice: StaticSecret,
    bob: StaticSecret,
    /// The member who created and sealed `key`.
    owner: SigningKey,
    mallory: SigningKey,
    key: EpochKey,
    sealed: SealedKey,
}

impl Setup {
    fn alice_pk(&self) -> PublicKey {
        PublicKey::from(&self.alice)
    }

    fn owner_id(&self) -> UserId {
        UserId(self.owner.verifying_key().to_bytes())
    }

    fn mallory_id(&self) -> UserId {
        UserId(self.mallory.verifying_key().to_bytes())
    }
}

fn setup() -> Setup {
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    let alice = StaticSecret::random_from_rng(&mut rng);
    let bob = StaticSecret::random_from_rng(&mut rng);
    let owner = SigningKey::generate(&mut rng);
    let mallory = SigningKey::generate(&mut rng);
    let key = EpochKey::generate(&mut rng);
    let sealed = seal_epoch_key(
        &mut rng,
        &owner,
        &PublicKey::from(&alice),
        ROOM,
        EPOCH,
        &key,
    )
    .expect("seal");
    Setup {
        rng,
        alice,
        bob,
        owner,
        mallory,
        key,
        sealed,
    }
}

/// Re-signs `sealed` (whatever its fields now are) with `signer`, as addressed to
/// `recipient` for `room` and `epoch`. The `sealer` field is left as it is.
fn resign(
    sealed: &mut SealedKey,
    signer: &SigningKey,
    recipient: &PublicKey,
    room: RoomId,
    epoch: Epoch,
) {
    let message = sealed_key_message(sealed, recipient, room, epoch).expect("48 bytes");
    sealed.signature = SignatureBytes::sign(signer, &message);
}

/// Deterministically picks 32-byte strings that do not decompress to a point.
fn not_points() -> Vec<[u8; 32]> {
    let found: Vec<[u8; 32]> = (0u8..=255)
        .map(|b| [b; 32])
        .filter(|bytes| VerifyingKey::from_bytes(bytes).is_err())
        .take(3)
        .collect();
    assert!(!found.is_empty());
    found
}

/// The neutral element: a valid encoding of a small-order point.
fn small_order_point() -> [u8; 32] {
    let mut identity = [0u8; 32];
    identity[0] = 1;
    identity
}

/// Asserts both the node's check and the member's open fail with `expected`.
fn assert_refused(s: &Setup, bad: &SealedKey, expected: SealError, what: &str) {
    assert_eq!(
        verify_sealed_key(bad, &s.alice_pk(), ROOM, EPOCH),
        Err(expected.clone()),
        "verify: {what}"
    );
    assert_eq!(
        open_epoch_key(&s.alice, ROOM, EPOCH, bad).unwrap_err(),
        expected,
        "open: {what}"
    );
}

#[test]
fn round_trip() {
    let s = setup();
    assert_eq!(s.sealed.ciphertext.len(), SEALED_KEY_CIPHERTEXT_BYTES);
    assert_eq!(s.sealed.sealer, s.owner_id());
    assert_eq!(
        verify_sealed_key(&s.sealed, &s.alice_pk(), ROOM, EPOCH),
        Ok(())
    );
    let opened = open_epoch_key(&s.alice, ROOM, EPOCH, &s.sealed).expect("open");
    assert_eq!(opened.as_bytes(), s.key.as_bytes());
}

#[test]
fn round_trip_through_a_dyn_rng_and_postcard() {
    let mut s = setup();
    let rng: &mut dyn CryptoRng = &mut s.rng;
    let sealed =
        seal_epoch_key(rng, &s.owner, &PublicKey::from(&s.bob), ROOM, EPOCH, &s.key).expect("seal");
    let bytes = postcard::to_stdvec(&sealed).expect("encode");
    // sealer 32 ‖ enc 32 ‖ ciphertext length 1 ‖ ciphertext 48 ‖ signature 64.
    assert_eq!(bytes.len(), 32 + 32 + 1 + 48 + 64);
    let back: SealedKey = postcard::from_bytes(&bytes).expect("decode");
    assert_eq!(back, sealed);
    let opened = open_epoch_key(&s.bob, ROOM, EPOCH, &back).expect("open");
    assert_eq!(opened.as_bytes(), s.key.as_bytes());
}

#[test]
fn sealing_is_deterministic_in_the_rng() {
    let s = setup();
    assert_eq!(setup().sealed, s.sealed);
}

#[test]
fn wrong_recipient_is_a_bad_signature() {
    let s = setup();
    // The recipient's public key is signed: Bob's key does not match.
    assert_eq!(
        open_epoch_key(&s.bob, ROOM, EPOCH, &s.sealed).unwrap_err(),
        SealError::BadSignature
    );
    // So a node cannot re-target Alice's sealed key at Bob either.
    assert_eq!(
        verify_sealed_key(&s.sealed, &PublicKey::from(&s.bob), ROOM, EPOCH),
        Err(SealError::BadSignature)
    );
}

#[test]
fn wrong_room_or_epoch_is_a_bad_signature() {
    let s = setup();
    let other_room = RoomId([0x12; 16]);
    for (room, epoch) in [(other_room, EPOCH), (ROOM, Epoch(8)), (ROOM, Epoch(6))] {
        assert_eq!(
            open_epoch_key(&s.alice, room, epoch, &s.sealed).unwrap_err(),
            SealError::BadSignature,
            "{room:?} {epoch:?}"
        );
        assert_eq!(
            verify_sealed_key(&s.sealed, &s.alice_pk(), room, epoch),
            Err(SealError::BadSignature),
            "{room:?} {epoch:?}"
        );
    }
}

#[test]
fn tampered_enc_is_a_bad_signature() {
    let s = setup();
    for i in [0, 15, 31] {
        let mut bad = s.sealed.clone();
        bad.enc[i] ^= 0x01;
        assert_refused(&s, &bad, SealError::BadSignature, &format!("enc byte {i}"));
    }
}

#[test]
fn tampered_ciphertext_is_a_bad_signature() {
    let s = setup();
    for i in 0..SEALED_KEY_CIPHERTEXT_BYTES {
        let mut bad = s.sealed.clone();
        bad.ciphertext[i] ^= 0x80;
        assert_refused(
            &s,
            &bad,
            SealError::BadSignature,
            &format!("ciphertext byte {i}"),
        );
    }
}

#[test]
fn tampered_signature_is_a_bad_signature() {
    let s = setup();
    for i in [0, 31, 32, 63] {
        let mut bad = s.sealed.clone();
        bad.signature.0[i] ^= 0x01;
        assert_refused(
            &s,
            &bad,
            SealError::BadSignature,
            &format!("signature byte {i}"),
        );
    }
}

#[test]
fn sealer_swapped_for_another_valid_key_is_a_bad_signature() {
    let s = setup();
    let mut bad = s.sealed.clone();
    bad.sealer = s.mallory_id();
    assert_refused(&s, &bad, SealError::BadSignature, "sealer");
}

#[test]
fn sealer_that_is_not_a_point_is_an_invalid_key() {
    let s = setup();
    for bytes in not_points() {
        let mut bad = s.sealed.clone();
        bad.sealer = UserId(bytes);
        assert_refused(&s, &bad, SealError::InvalidSealerKey, "not a point");
    }
}

#[test]
fn small_order_sealer_is_an_invalid_key() {
    let s = setup();
    let mut bad = s.sealed.clone();
    bad.sealer = UserId(small_order_point());
    assert_refused(&s, &bad, SealError::InvalidSealerKey, "small order");
}

#[test]
fn a_key_sealed_by_mallory_opens_and_names_mallory() {
    // Mallory (say, a node that routes keys) seals a key of her own to Alice. The
    // signature is hers and valid, so it opens, but it names her as the sealer: the
    // room/keys actors' authorization check is what refuses it.
    let mut s = setup();
    let hers = EpochKey::generate(&mut s.rng);
    let alice_pk = s.alice_pk();
    let forged =
        seal_epoch_key(&mut s.rng, &s.mallory, &alice_pk, ROOM, EPOCH, &hers).expect("seal");
    assert_eq!(forged.sealer, s.mallory_id());
    assert_ne!(forged.sealer, s.owner_id());
    assert_eq!(verify_sealed_key(&forged, &alice_pk, ROOM, EPOCH), Ok(()));
    let opened = open_epoch_key(&s.alice, ROOM, EPOCH, &forged).expect("open");
    assert_eq!(opened.as_bytes(), hers.as_bytes());
}

#[test]
fn mallory_claiming_the_owners_ciphertext_does_not_open() {
    // Mallory takes the owner's enc and ciphertext, names herself as sealer and
    // re-signs. Her signature is valid, but the sealer is bound in the HPKE info, so
    // the ciphertext does not open under her name.
    let s = setup();
    let mut stolen = s.sealed.clone();
    stolen.sealer = s.mallory_id();
    resign(&mut stolen, &s.mallory, &s.alice_pk(), ROOM, EPOCH);
    assert_eq!(
        verify_sealed_key(&stolen, &s.alice_pk(), ROOM, EPOCH),
        Ok(())
    );
    assert_eq!(
        open_epoch_key(&s.alice, ROOM, EPOCH, &stolen).unwrap_err(),
        SealError::Open
    );
}

#[test]
fn room_and_epoch_are_bound_in_the_hpke_info() {
    // The owner re-signs her own ciphertext for another room or epoch: the signature
    // holds, but HPKE refuses, so room and epoch are bound in the key schedule too.
    let s = setup();
    for (room, epoch) in [(RoomId([0x12; 16]), EPOCH), (ROOM, Epoch(8))] {
        let mut moved = s.sealed.clone();
        resign(&mut moved, &s.owner, &s.alice_pk(), room, epoch);
        assert_eq!(
            verify_sealed_key(&moved, &s.alice_pk(), room, epoch),
            Ok(())
        );
        assert_eq!(
            open_epoch_key(&s.alice, room, epoch, &moved).unwrap_err(),
            SealError::Open,
            "{room:?} {epoch:?}"
        );
    }
}

#[test]
fn ciphertext_sealed_to_bob_but_signed_for_alice_does_not_open() {
    let mut s = setup();
    let bob_pk = PublicKey::from(&s.bob);
    let mut sealed =
        seal_epoch_key(&mut s.rng, &s.owner, &bob_pk, ROOM, EPOCH, &s.key).expect("seal");
    resign(&mut sealed, &s.owner, &s.alice_pk(), ROOM, EPOCH);
    assert_eq!(
        open_epoch_key(&s.alice, ROOM, EPOCH, &sealed).unwrap_err(),
        SealError::Open
    );
}

#[test]
fn low_order_enc_is_invalid() {
    let s = setup();
    let mut bad = s.sealed.clone();
    // u = 0 is a low-order point: the X25519 output is all zeros.
    bad.enc = [0u8; 32];
    // Unsigned, it is caught by the signature first.
    assert_refused(&s, &bad, SealError::BadSignature, "unsigned low-order enc");
    // Signed by the sealer, it reaches HPKE, which refuses it.
    resign(&mut bad, &s.owner, &s.alice_pk(), ROOM, EPOCH);
    assert_eq!(verify_sealed_key(&bad, &s.alice_pk(), ROOM, EPOCH), Ok(()));
    assert_eq!(
        open_epoch_key(&s.alice, ROOM, EPOCH, &bad).unwrap_err(),
        SealError::InvalidEncappedKey
    );
}

#[test]
fn low_order_recipient_is_refused() {
    let mut s = setup();
    assert_eq!(
        seal_epoch_key(
            &mut s.rng,
            &s.owner,
            &PublicKey::from([0u8; 32]),
            ROOM,
            EPOCH,
            &s.key
        )
        .unwrap_err(),
        SealError::InvalidRecipientKey
    );
}

#[test]
fn truncated_or_extended_ciphertext() {
    let s = setup();
    for len in [0, 1, 16, SEALED_KEY_CIPHERTEXT_BYTES - 1] {
        let mut bad = s.sealed.clone();
        bad.ciphertext.truncate(len);
        assert_refused(
            &s,
            &bad,
            SealError::BadLength {
                expected: SEALED_KEY_CIPHERTEXT_BYTES,
                got: len,
            },
            &format!("length {len}"),
        );
    }
    let mut longer = s.sealed.clone();
    longer.ciphertext.push(0);
    assert_refused(
        &s,
        &longer,
        SealError::BadLength {
            expected: SEALED_KEY_CIPHERTEXT_BYTES,
            got: SEALED_KEY_CIPHERTEXT_BYTES + 1,
        },
        "one byte longer",
    );
}

/// One way of altering a sealed key after it was signed.
type Tamper = Box<dyn Fn(&mut SealedKey)>;

#[test]
fn verify_sealed_key_rejects_each_tampering() {
    let s = setup();
    let mallory = s.mallory_id();
    let cases: Vec<(&str, Tamper, SealError)> = vec![
        (
            "sealer",
            Box::new(move |k| k.sealer = mallory),
            SealError::BadSignature,
        ),
        (
            "sealer not a point",
            Box::new(|k| k.sealer = UserId(not_points()[0])),
            SealError::InvalidSealerKey,
        ),
        (
            "sealer small order",
            Box::new(|k| k.sealer = UserId(small_order_point())),
            SealError::InvalidSealerKey,
        ),
        ("enc", Box::new(|k| k.enc[7] ^= 1), SealError::BadSignature),
        (
            "ciphertext",
            Box::new(|k| k.ciphertext[47] ^= 1),
            SealError::BadSignature,
        ),
        (
            "ciphertext length",
            Box::new(|k| {
                k.ciphertext.pop();
            }),
            SealError::BadLength {
                expected: SEALED_KEY_CIPHERTEXT_BYTES,
                got: SEALED_KEY_CIPHERTEXT_BYTES - 1,
            },
        ),
        (
            "signature R",
            Box::new(|k| k.signature.0[3] ^= 1),
            SealError::BadSignature,
        ),
        (
            "signature s",
            Box::new(|k| k.signature.0[40] ^= 1),
            SealError::BadSignature,
        ),
    ];
    for (name, tamper, expected) in cases {
        let mut bad = s.sealed.clone();
        tamper(&mut bad);
        assert_ne!(bad, s.sealed, "{name}");
        assert_refused(&s, &bad, expected, name);
    }
    // And the untouched key passes.
    assert_eq!(
        verify_sealed_key(&s.sealed, &s.alice_pk(), ROOM, EPOCH),
        Ok(())
    );
}

#[test]
fn info_is_domain_separated_and_fixed_length() {
    let sealer = UserId([0xcc; 32]);
    let info = epoch_key_info(RoomId([0xaa; 16]), Epoch(0x0102_0304_0506_0708), sealer);
    let t = INFO_TAG.len();
    assert_eq!(info.len(), t + 16 + 8 + 32);
    assert_eq!(info.len(), EPOCH_KEY_INFO_BYTES);
    assert!(info.starts_with(b"conclave/epoch-key/v2"));
    assert_eq!(&info[t..t + 16], &[0xaa; 16]);
    assert_eq!(&info[t + 16..t + 24], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(&info[t + 24..], &[0xcc; 32]);
}

#[test]
fn signed_message_is_domain_separated_and_fixed_length() {
    let message = signed_message(
        RoomId([0xaa; 16]),
        Epoch(0x0102_0304_0506_0708),
        UserId([0xbb; 32]),
        &PublicKey::from([0xcc; 32]),
        &[0xdd; 32],
        &[0xee; SEALED_KEY_CIPHERTEXT_BYTES],
    );
    let t = SIG_TAG.len();
    assert_eq!(message.len(), t + 16 + 8 + 32 + 32 + 32 + 48);
    assert!(message.starts_with(b"conclave/epoch-key-sig/v1"));
    assert_ne!(SIG_TAG, INFO_TAG);
    assert_eq!(&message[t..t + 16], &[0xaa; 16]);
    assert_eq!(&message[t + 16..t + 24], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(&message[t + 24..t + 56], &[0xbb; 32]);
    assert_eq!(&message[t + 56..t + 88], &[0xcc; 32]);
    assert_eq!(&message[t + 88..t + 120], &[0xdd; 32]);
    assert_eq!(&message[t + 120..], &[0xee; 48]);
}

#[test]
fn helpers_refuse_long_info() {
    let mut s = setup();
    let long = vec![0u8; HPKE_INFO_BYTES_MAX + 1];
    let expected = SealError::InfoTooLong {
        len: HPKE_INFO_BYTES_MAX + 1,
        max: HPKE_INFO_BYTES_MAX,
    };
    let alice_pk = s.alice_pk();
    assert_eq!(
        hpke_seal_with_info(&mut s.rng, &alice_pk, &long, &[], b"x").unwrap_err(),
        expected
    );
    assert_eq!(
        hpke_open_with_info(&s.alice, &s.sealed.enc, &long, &[], &s.sealed.ciphertext).unwrap_err(),
        expected
    );
}

// ---------------------------------------------------------------------------------
// RFC 9180 Appendix A.2.1 through the private helpers
// (<https://www.rfc-editor.org/rfc/rfc9180#appendix-A.2.1>; the full vector set is
// checked against the hpke crate in `actors/tests/rfc_vectors.rs`).
// ---------------------------------------------------------------------------------

const A_2_1_INFO: &str = "4f6465206f6e2061204772656369616e2055726e";
const A_2_1_IKM_E: &str = "909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b";
const A_2_1_PK_RM: &str = "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a";
const A_2_1_SK_RM: &str = "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb";
const A_2_1_ENC: &str = "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a";
const A_2_1_PT: &str = "4265617574792069732074727574682c20747275746820626561757479";
const A_2_1_AAD_0: &str = "436f756e742d30";
const A_2_1_CT_0: &str =
    "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28";

#[path = "../../../tests/support/vectors.rs"]
mod vectors;
use vectors::{h, h32, FixedRng};

/// The exact HPKE call `seal_epoch_key` makes reproduces the RFC's enc and first
/// ciphertext when fed the RFC's ikmE, info and aad; the open path opens it.
#[test]
fn rfc9180_a_2_1_through_our_seal_path() {
    let recipient = PublicKey::from(h32(A_2_1_PK_RM));

    let mut rng = FixedRng::new(h(A_2_1_IKM_E));
    let (enc, ciphertext) = hpke_seal_with_info(
        &mut rng,
        &recipient,
        &h(A_2_1_INFO),
        &h(A_2_1_AAD_0),
        &h(A_2_1_PT),
    )
    .expect("seal");
    rng.assert_drained();
    assert_eq!(enc, h32(A_2_1_ENC));
    assert_eq!(hex::encode(&ciphertext), A_2_1_CT_0);

    // Our open path, with the RFC's recipient key, opens the RFC's ciphertext.
    let secret = StaticSecret::from(h32(A_2_1_SK_RM));
    assert_eq!(PublicKey::from(&secret), recipient);
    let opened = hpke_open_with_info(
        &secret,
        &h32(A_2_1_ENC),
        &h(A_2_1_INFO),
        &h(A_2_1_AAD_0),
        &h(A_2_1_CT_0),
    )
    .expect("open");
    assert_eq!(opened, h(A_2_1_PT));

    // Through a `dyn` rng, as actors call it.
    let mut rng = FixedRng::new(h(A_2_1_IKM_E));
    let dynamic: &mut dyn CryptoRng = &mut rng;
    let (enc, _) = hpke_seal_with_info(
        dynamic,
        &recipient,
        &h(A_2_1_INFO),
        &h(A_2_1_AAD_0),
        &h(A_2_1_PT),
    )
    .expect("seal");
    assert_eq!(enc, h32(A_2_1_ENC));
}
