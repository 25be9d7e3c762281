//! Cryptography: sealing epoch keys (HPKE, signed) and frames.
//!
//! Two things are protected here:
//!
//! - **Epoch keys.** A room's symmetric key for one epoch ([`EpochKey`]) is created by
//!   a member's client and sealed to each member's X25519 key with HPKE (RFC 9180,
//!   base mode, DHKEM(X25519, HKDF-SHA256) + HKDF-SHA256 + ChaCha20-Poly1305). The
//!   room, epoch and sealer are bound into the HPKE `info`. HPKE base mode does not
//!   say who sealed a key, so the sealing member also signs the [`SealedKey`] with
//!   their Ed25519 key, over room, epoch, sealer, the recipient's X25519 public key,
//!   the encapsulated key and the ciphertext. A sealed key therefore cannot be
//!   replayed into another room or epoch, re-targeted at another member, or forged
//!   by a node that routes it. See [`seal_epoch_key`], [`verify_sealed_key`] (what a
//!   node checks, with no secret) and [`open_epoch_key`] (signature first, then HPKE).
//!
//!   The signature proves only *who* sealed a key ([`SealedKey::sealer`]). Whether
//!   that member may set the room's key is an authorization decision the caller (the
//!   room/keys actors) must still make; without it, anyone could seal and sign a key.
//! - **Frames.** A message is encrypted under the epoch key with ChaCha20-Poly1305
//!   (room, epoch, sender and message id bound as associated data) and signed with
//!   the sender's Ed25519 key over every other field. A node, which has no epoch key,
//!   can still check the signature ([`verify_frame`]); a member verifies, checks the
//!   room and epoch, then decrypts ([`open_frame`]).
//!
//! Both signatures are [`SignatureBytes`] and go through one strict check: the signer
//! must be a valid, non-small-order Ed25519 key, and the signature must pass
//! `verify_strict` (canonical, not malleable).
//!
//! Nothing here touches the operating system: every random byte comes from the `rng`
//! argument (the actor context's random source), so the simulator can replay it.

use core::fmt;

use rand_core::CryptoRng;
use zeroize::Zeroize;

mod frame;
mod seal;
mod sig;

pub use frame::{
    open_frame, seal_frame, verify_frame, Frame, FrameError, FRAME_BYTES_MAX,
    FRAME_CIPHERTEXT_BYTES_MAX, FRAME_PLAINTEXT_BYTES_MAX,
};
pub use seal::{
    epoch_key_info, open_epoch_key, seal_epoch_key, verify_sealed_key, SealError, SealedKey,
    EPOCH_KEY_INFO_BYTES, SEALED_KEY_CIPHERTEXT_BYTES,
};
pub(crate) use sig::verify_strict as verify_signature;
pub use sig::{SignatureBytes, SIGNATURE_BYTES};

/// Length of an epoch key in bytes.
pub const EPOCH_KEY_BYTES: usize = 32;

/// A room's symmetric key for one epoch: the ChaCha20-Poly1305 key of its frames.
///
/// The bytes are zeroized when the key is dropped (including every clone) and never
/// printed by `Debug`.
/// There is deliberately no `PartialEq`: comparing keys is not something protocol
/// code should do (and a naive comparison would not be constant-time).
#[derive(Clone)]
pub struct EpochKey([u8; EPOCH_KEY_BYTES]);

impl EpochKey {
    /// A fresh random key drawn from `rng`.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        // Fill the key in place: no unzeroized copy of the bytes is left behind.
        let mut key = Self([0u8; EPOCH_KEY_BYTES]);
        rng.fill_bytes(&mut key.0);
        key
    }

    /// A key from its raw bytes. The caller's array is a copy this type cannot
    /// zeroize; prefer [`open_epoch_key`] and [`EpochKey::generate`], which build the
    /// key in place.
    pub fn from_bytes(bytes: [u8; EPOCH_KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// The raw key bytes. Handle with care: copies are not zeroized for you.
    pub fn as_bytes(&self) -> &[u8; EPOCH_KEY_BYTES] {
        &self.0
    }
}

impl Drop for EpochKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EpochKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn generate_is_deterministic_in_the_rng_and_debug_redacts() {
        let a = EpochKey::generate(&mut ChaCha20Rng::seed_from_u64(1));
        let b = EpochKey::generate(&mut ChaCha20Rng::seed_from_u64(1));
        let c = EpochKey::generate(&mut ChaCha20Rng::seed_from_u64(2));
        assert_eq!(a.as_bytes(), b.as_bytes());
        assert_ne!(a.as_bytes(), c.as_bytes());
        assert_ne!(a.as_bytes(), &[0u8; 32]);

        let text = format!("{a:?}");
        assert_eq!(text, "EpochKey(<redacted>)");
        let hex: String = a.as_bytes()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!text.contains(&hex));
    }

    #[test]
    fn works_through_a_dyn_rng() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let dynamic: &mut dyn CryptoRng = &mut rng;
        let key = EpochKey::generate(dynamic);
        let again = EpochKey::from_bytes(*key.as_bytes());
        assert_eq!(key.as_bytes(), again.as_bytes());
    }
}
