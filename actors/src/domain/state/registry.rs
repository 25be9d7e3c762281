//! The node's user registry: who may act here, in what role, and whether they are
//! still active. A revocation is a status flip (auditable), never a deletion.

use conclave_storage::{Order, ReadTxn, StoreError, Table, WriteTxn};
use serde::{Deserialize, Serialize};

use crate::actor::Time;
use crate::crypto::SignatureBytes;
use crate::domain::{Denial, SignedRequest, UserEntry, UserRole, UserStatus, REQUEST_SKEW_MAX};
use crate::identity::PublicIdentity;
use crate::ids::UserId;

/// One registered user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Their X25519 public key.
    pub exchange: [u8; 32],
    /// Their signature binding it to them.
    pub binding: SignatureBytes,
    /// Their role.
    pub role: UserRole,
    /// Active or revoked.
    pub status: UserStatus,
    /// When they were added.
    pub added_at: Time,
    /// Which admin added them (`None` for the bootstrap admin).
    pub added_by: Option<UserId>,
}

const USERS: Table<[u8; 32], UserRecord> = Table::new("members.users");

/// The most users [`list`] returns.
pub const LIST_USERS_MAX: usize = 10_000;

/// A user of this node, if registered.
pub fn user(txn: &dyn ReadTxn, id: UserId) -> Result<Option<UserRecord>, StoreError> {
    USERS.get(txn, &id.0)
}

/// Registers `user` as an admin without an acting admin: the bootstrap of a node's
/// first admin, from its operator. Fails with [`Denial::Conflict`] if the key is
/// registered already (nothing is changed).
pub fn seed_admin(txn: &mut dyn WriteTxn, user: &PublicIdentity, now: Time) -> Result<(), Denial> {
    add(txn, user, UserRole::Admin, now, None)
}

/// Registers `user` with `role`, added by `added_by`. A key registered already is a
/// [`Denial::Conflict`] that changes nothing.
pub fn add(
    txn: &mut dyn WriteTxn,
    user: &PublicIdentity,
    role: UserRole,
    now: Time,
    added_by: Option<UserId>,
) -> Result<(), Denial> {
    user.check()
        .map_err(|e| Denial::malformed(format!("the user's keys: {e}")))?;
    if USERS.get(&*txn, &user.signing)?.is_some() {
        return Err(Denial::Conflict {
            what: format!("user {} is registered already", UserId(user.signing)),
        });
    }
    let record = UserRecord {
        exchange: user.exchange,
        binding: user.binding,
        role,
        status: UserStatus::Active,
        added_at: now,
        added_by,
    };
    USERS.put(txn, &user.signing, &record)?;
    debug_assert_eq!(USERS.get(&*txn, &user.signing)?, Some(record));
    Ok(())
}

/// Revokes `user` (a status flip; revoking twice changes nothing). Returns whether
/// the status changed.
pub fn revoke(txn: &mut dyn WriteTxn, user: UserId) -> Result<bool, Denial> {
    let mut record = USERS
        .get(&*txn, &user.0)?
        .ok_or_else(|| Denial::not_found(format!("user {user}")))?;
    if record.status == UserStatus::Revoked {
        return Ok(false);
    }
    record.status = UserStatus::Revoked;
    USERS.put(txn, &user.0, &record)?;
    Ok(true)
}

/// Whether any user is registered.
pub fn any(txn: &dyn ReadTxn) -> Result<bool, StoreError> {
    Ok(USERS.first(txn)?.is_some())
}

/// Every user of this node, in id order (at most [`LIST_USERS_MAX`]).
pub fn list(txn: &dyn ReadTxn) -> Result<Vec<UserEntry>, StoreError> {
    Ok(USERS
        .scan(txn, .., Order::Ascending, LIST_USERS_MAX)?
        .into_iter()
        .map(|(signing, r)| UserEntry {
            user: PublicIdentity {
                signing,
                exchange: r.exchange,
                binding: r.binding,
            },
            role: r.role,
            status: r.status,
        })
        .collect())
}

/// The registry's verdict on `user`: their record if they may act.
pub fn check_active(txn: &dyn ReadTxn, user: UserId) -> Result<UserRecord, Denial> {
    let record = USERS
        .get(txn, &user.0)?
        .ok_or_else(|| Denial::not_found(format!("user {user}")))?;
    match record.status {
        UserStatus::Active => Ok(record),
        UserStatus::Revoked => Err(Denial::Revoked),
    }
}

/// Checks a signed request of a local user: signature, issue time within
/// [`REQUEST_SKEW_MAX`] of `now`, registered and active. Default-deny: any error
/// (storage included) refuses it.
pub fn authenticate(
    txn: &dyn ReadTxn,
    req: &SignedRequest,
    now: Time,
) -> Result<UserRecord, Denial> {
    req.verify()?;
    let issued = req.request.issued;
    let skew = if issued > now {
        issued.saturating_since(now)
    } else {
        now.saturating_since(issued)
    };
    if skew > REQUEST_SKEW_MAX {
        return Err(Denial::Expired);
    }
    check_active(txn, req.request.user)
}

/// Checks that `user` is a user of this node and revoked (what an eviction needs).
pub fn check_revoked(txn: &dyn ReadTxn, user: UserId) -> Result<UserRecord, Denial> {
    let record = USERS
        .get(txn, &user.0)?
        .ok_or_else(|| Denial::not_found(format!("user {user}")))?;
    if record.status != UserStatus::Revoked {
        return Err(Denial::malformed(format!("user {user} is not revoked")));
    }
    Ok(record)
}
