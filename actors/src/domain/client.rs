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

use super::chain::{ChainHash, ChainState, Change, KeyCheck, KeyRefusal, Link, SignedLink, Signer};
use super::{Invitee, Op, Policy, Request, SignedRequest};
use crate::actor::Time;
use crate::crypto::{
    open_epoch_key, open_frame, seal_epoch_key, seal_frame, EpochKey, Frame, FrameError, SealError,
    SealedKey,
};
use crate::identity::Identity;
use crate::ids::{Epoch, MessageId, NodeId, RoomId, UserId};
use crate::mutation::{self, Mutation};

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

/// A new room homed on `home` (the creator's node): its id (derived from the
/// creation), epoch 1's key, and the request that creates it.
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
    let link = SignedLink::sign(
        identity,
        Link {
            room,
            prev: ChainHash::GENESIS,
            by: Signer::User(identity.user_id()),
            change: Change::Create {
                creator: identity.public(),
                home,
                nonce,
                policy,
                check: KeyCheck::of(room, Epoch(1), &key),
            },
        },
    );
    Ok((room, key, Op::CreateRoom { link, key: sealed }))
}

/// The request that invites `invitee` to the room whose verified chain is
/// `chain`, with `key` (the key of the chain's current epoch) sealed to them.
pub fn invite(
    rng: &mut dyn CryptoRng,
    identity: &Identity,
    chain: &ChainState,
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
        chain.room,
        chain.epoch,
        key,
    )?;
    let change = Change::Invite {
        invitee,
        epoch: chain.epoch,
    };
    Ok(Op::Invite {
        link: chain.next_link(identity, change),
        key: sealed,
    })
}

/// An epoch key sealed to each member.
pub type Bundle = Vec<(UserId, SealedKey)>;

/// A fresh key for the chain's next epoch, sealed to every member but `except`.
fn next_epoch_bundle(
    rng: &mut dyn CryptoRng,
    identity: &Identity,
    chain: &ChainState,
    except: Option<UserId>,
) -> Result<(Epoch, EpochKey, Bundle), SealError> {
    let epoch = Epoch(chain.epoch.0 + 1);
    let key = EpochKey::generate(rng);
    let members = chain.others(except);
    let mut bundle = Vec::with_capacity(members.len());
    for member in members {
        // The chain checked every member's binding when they joined; check again
        // what is sealed to, as it costs little and guards the one thing that
        // matters here.
        member
            .identity
            .check()
            .map_err(|_| SealError::UnboundRecipient)?;
        let sealed = seal_epoch_key(
            rng,
            identity.signing_key(),
            &member.identity.exchange_key(),
            chain.room,
            epoch,
            &key,
        )?;
        bundle.push((UserId(member.identity.signing), sealed));
    }
    Ok((epoch, key, bundle))
}

/// The request that removes `user` from the room whose verified chain is `chain`:
/// a fresh key for the next epoch, sealed to every other member the chain lists
/// (never to a member list a node supplied). Returns the new key too.
pub fn remove(
    rng: &mut dyn CryptoRng,
    identity: &Identity,
    chain: &ChainState,
    user: UserId,
) -> Result<(EpochKey, Op), SealError> {
    let (epoch, key, bundle) = next_epoch_bundle(rng, identity, chain, Some(user))?;
    let change = Change::Remove {
        user,
        epoch,
        check: KeyCheck::of(chain.room, epoch, &key),
    };
    let link = chain.next_link(identity, change);
    Ok((key, Op::Remove { link, bundle }))
}

/// The request that moves the room whose verified chain is `chain` to its next
/// epoch with the same members. Returns the new key too.
pub fn rekey(
    rng: &mut dyn CryptoRng,
    identity: &Identity,
    chain: &ChainState,
) -> Result<(EpochKey, Op), SealError> {
    let (epoch, key, bundle) = next_epoch_bundle(rng, identity, chain, None)?;
    let change = Change::Rekey {
        epoch,
        check: KeyCheck::of(chain.room, epoch, &key),
    };
    let link = chain.next_link(identity, change);
    Ok((key, Op::Rekey { link, bundle }))
}

/// The sealed keys a node holds for `identity` in the room of `chain`, opened and
/// judged against the verified chain: a key is accepted only for an epoch the
/// chain has, from a sealer it authorizes, and equal to the key it pins
/// ([`ChainState::check_key`]). Refused keys are returned with their reason.
pub fn accept_keys(
    identity: &Identity,
    chain: &ChainState,
    sealed: &[(Epoch, SealedKey)],
) -> (BTreeMap<Epoch, EpochKey>, Vec<(Epoch, KeyRefusal)>) {
    let mut keys = BTreeMap::new();
    let mut refused = Vec::new();
    let me = identity.user_id();
    for (epoch, key) in sealed {
        let opened = open_epoch_key(identity.exchange_secret(), chain.room, *epoch, key)
            .map_err(|e| KeyRefusal::Unopened(e.to_string()))
            .and_then(|k| {
                // Mutation: the key is taken without asking the chain.
                if mutation::active(Mutation::AcceptUnauthorizedKey) {
                    return Ok(k);
                }
                chain.check_key(me, *epoch, key.sealer, &k).map(|()| k)
            });
        match opened {
            Ok(k) => {
                keys.insert(*epoch, k);
            }
            Err(refusal) => refused.push((*epoch, refusal)),
        }
    }
    (keys, refused)
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
