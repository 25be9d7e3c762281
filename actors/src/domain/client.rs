//! What a user's client does before anything reaches a node: create epoch keys and
//! seal them to members, sign requests, seal frames, and open what it receives.
//!
//! The embedding API, the client protocol and the simulator's workload all use these
//! functions, so every client builds requests the same way. Randomness and time come
//! from the caller (OS entropy and the wall clock in a real client, the seed and the
//! virtual clock in the simulator).

use std::collections::BTreeMap;

use rand_core::CryptoRng;
use x25519_dalek::PublicKey;

use super::{Invitee, Op, Policy, Request, RoomInfo, SignedRequest};
use crate::actor::Time;
use crate::crypto::{
    open_epoch_key, open_frame, seal_epoch_key, seal_frame, EpochKey, Frame, FrameError, SealError,
    SealedKey,
};
use crate::identity::{check_binding, Identity};
use crate::ids::{Epoch, MessageId, NodeId, RoomId, UserId};

/// Signs `op` as `identity`, issued `now`.
pub fn sign(identity: &Identity, now: Time, rng: &mut dyn CryptoRng, op: Op) -> SignedRequest {
    SignedRequest::sign(
        identity,
        Request {
            user: identity.user_id(),
            issued: now,
            nonce: rng.next_u64(),
            op,
        },
    )
}

/// A new room homed on `home` (the creator's node): its random id, epoch 1's key,
/// and the request that creates it.
pub fn create_room(
    rng: &mut dyn CryptoRng,
    identity: &Identity,
    home: NodeId,
    policy: Policy,
) -> Result<(RoomId, EpochKey, Op), SealError> {
    let mut nonce = [0u8; 16];
    rng.fill_bytes(&mut nonce);
    let room = RoomId::derive(identity.user_id(), home, nonce);
    let key = EpochKey::generate(rng);
    let sealed = seal_epoch_key(
        rng,
        identity.signing_key(),
        &PublicKey::from(identity.exchange_secret()),
        room,
        Epoch(1),
        &key,
    )?;
    Ok((
        room,
        key,
        Op::CreateRoom {
            room,
            nonce,
            home,
            policy,
            key: sealed,
        },
    ))
}

/// The request that invites `invitee`, with `key` (the room's key at `epoch`, its
/// current one) sealed to them.
pub fn invite(
    rng: &mut dyn CryptoRng,
    identity: &Identity,
    room: RoomId,
    epoch: Epoch,
    key: &EpochKey,
    invitee: Invitee,
) -> Result<Op, SealError> {
    // Seal only to a key its owner signed, whoever handed us the invitee.
    invitee
        .user
        .check()
        .map_err(|_| SealError::UnboundRecipient)?;
    let sealed = seal_epoch_key(
        rng,
        identity.signing_key(),
        &invitee.user.exchange_key(),
        room,
        epoch,
        key,
    )?;
    Ok(Op::Invite {
        room,
        invitee,
        epoch,
        key: sealed,
    })
}

/// The request that removes `user` from the room described by `info`: a fresh key
/// for the next epoch, sealed to every other member. Returns the new key too.
pub fn remove(
    rng: &mut dyn CryptoRng,
    identity: &Identity,
    info: &RoomInfo,
    user: UserId,
) -> Result<(EpochKey, Op), SealError> {
    let epoch = Epoch(info.epoch.0 + 1);
    let key = EpochKey::generate(rng);
    let mut bundle = Vec::with_capacity(info.members.len());
    for member in info.members.iter().filter(|m| m.user != user) {
        // The member list comes from a node: seal only to keys their owners signed.
        check_binding(&member.user.0, &member.exchange, &member.binding)
            .map_err(|_| SealError::UnboundRecipient)?;
        let sealed = seal_epoch_key(
            rng,
            identity.signing_key(),
            &PublicKey::from(member.exchange),
            info.room,
            epoch,
            &key,
        )?;
        bundle.push((member.user, sealed));
    }
    Ok((
        key,
        Op::Remove {
            room: info.room,
            user,
            epoch,
            bundle,
        },
    ))
}

/// Opens the sealed keys a node holds for `identity` in `room`. Keys that do not
/// open are returned as errors beside the others.
pub fn open_keys(
    identity: &Identity,
    room: RoomId,
    sealed: &[(Epoch, SealedKey)],
) -> (BTreeMap<Epoch, EpochKey>, Vec<(Epoch, SealError)>) {
    let mut keys = BTreeMap::new();
    let mut errors = Vec::new();
    for (epoch, key) in sealed {
        match open_epoch_key(identity.exchange_secret(), room, *epoch, key) {
            Ok(k) => {
                keys.insert(*epoch, k);
            }
            Err(e) => errors.push((*epoch, e)),
        }
    }
    (keys, errors)
}

/// A new message id: the time in milliseconds and 80 random bits.
pub fn message_id(now: Time, rng: &mut dyn CryptoRng) -> MessageId {
    let random = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
    MessageId::from_parts(now.unix_ms(), random)
}

/// Encrypts and signs `plaintext` for `room` at `epoch`.
pub fn seal(
    rng: &mut dyn CryptoRng,
    identity: &Identity,
    room: RoomId,
    epoch: Epoch,
    key: &EpochKey,
    now: Time,
    plaintext: &[u8],
) -> Result<Frame, FrameError> {
    let id = message_id(now, rng);
    seal_frame(rng, identity.signing_key(), key, room, epoch, id, plaintext)
}

/// Verifies and decrypts a frame with the key of its epoch.
pub fn open(frame: &Frame, keys: &BTreeMap<Epoch, EpochKey>) -> Result<Vec<u8>, OpenError> {
    let key = keys
        .get(&frame.epoch)
        .ok_or(OpenError::NoKey(frame.epoch))?;
    open_frame(frame, frame.room, frame.epoch, key).map_err(OpenError::Frame)
}

/// Why a received frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The client holds no key for the frame's epoch.
    #[error("no key for epoch {}", .0.0)]
    NoKey(Epoch),
    /// The frame does not verify or decrypt.
    #[error(transparent)]
    Frame(FrameError),
}
