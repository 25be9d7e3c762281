//! Per-user publish quotas: how many frames and bytes one user may hand their node
//! per second, so that one user cannot take a node's commits, its outboxes and its
//! peers' fan-out for themselves.
//!
//! Two token buckets per user (frames, bytes), each holding [`QUOTA_BURST_S`]
//! seconds' worth and refilled from the actor's clock ([`crate::actor::Context::now`]),
//! so the simulator replays them exactly. They live in the members actor's memory:
//! a restart gives everyone a full bucket, which is the most a restart can give.

use std::collections::BTreeMap;

use crate::actor::Time;
use crate::ids::UserId;

/// A user's frames per second, by default (a node on two cores commits a few
/// thousand frames per second in all).
pub const PUBLISH_FRAMES_PER_USER_PER_S: u64 = 2_000;

/// A user's published bytes per second, by default.
pub const PUBLISH_BYTES_PER_USER_PER_S: u64 = 64 << 20;

/// How many seconds' worth a full bucket holds (the largest burst).
pub const QUOTA_BURST_S: u64 = 2;

/// Past this many users with buckets in memory, the full ones are forgotten (a
/// full bucket is what a user without one gets).
pub const QUOTA_USERS_TRACKED_MAX: usize = 4_096;

/// What one user may publish per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishQuota {
    /// Frames per second.
    pub frames_per_s: u64,
    /// Bytes per second (of ciphertext).
    pub bytes_per_s: u64,
}

impl Default for PublishQuota {
    fn default() -> Self {
        Self {
            frames_per_s: PUBLISH_FRAMES_PER_USER_PER_S,
            bytes_per_s: PUBLISH_BYTES_PER_USER_PER_S,
        }
    }
}

/// A bucket's level, in millionths of a token (so that refills of a microsecond
/// count), as of `at`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    frames: u128,
    bytes: u128,
    at: Time,
}

/// `bucket` as of `now`: refilled at `quota`'s rates for the time since, up to
/// `full`.
fn refilled(quota: PublishQuota, bucket: Bucket, full: Bucket, now: Time) -> Bucket {
    let elapsed = now.saturating_since(bucket.at).as_micros();
    Bucket {
        frames: (bucket.frames + elapsed * u128::from(quota.frames_per_s)).min(full.frames),
        bytes: (bucket.bytes + elapsed * u128::from(quota.bytes_per_s)).min(full.bytes),
        at: now.max(bucket.at),
    }
}

/// Every user's buckets.
#[derive(Debug, Default)]
pub(crate) struct Quotas {
    quota: PublishQuota,
    buckets: BTreeMap<UserId, Bucket>,
}

/// One token, in the buckets' unit.
const TOKEN: u128 = 1_000_000;

impl Quotas {
    pub(crate) fn new(quota: PublishQuota) -> Self {
        Self {
            quota,
            buckets: BTreeMap::new(),
        }
    }

    fn full(&self, at: Time) -> Bucket {
        let burst = u128::from(QUOTA_BURST_S) * TOKEN;
        Bucket {
            frames: u128::from(self.quota.frames_per_s) * burst,
            bytes: u128::from(self.quota.bytes_per_s) * burst,
            at,
        }
    }

    /// The bucket of a user as of `now`: refilled for the time since, up to full.
    fn level(&self, bucket: Bucket, now: Time) -> Bucket {
        refilled(self.quota, bucket, self.full(now), now)
    }

    /// Takes one frame of `bytes` from `user`'s buckets at `now`, or says which
    /// limit it would pass (nothing is taken then).
    pub(crate) fn take(&mut self, user: UserId, bytes: u64, now: Time) -> Result<(), String> {
        let held = self.buckets.get(&user).copied();
        let mut bucket = held.map_or_else(|| self.full(now), |b| self.level(b, now));
        let cost = u128::from(bytes) * TOKEN;
        if bucket.frames < TOKEN {
            let rate = self.quota.frames_per_s;
            return Err(format!("publish rate: {rate} frames per second per user"));
        }
        if bucket.bytes < cost {
            let rate = self.quota.bytes_per_s;
            return Err(format!("publish volume: {rate} bytes per second per user"));
        }
        bucket.frames -= TOKEN;
        bucket.bytes -= cost;
        self.buckets.insert(user, bucket);
        if self.buckets.len() > QUOTA_USERS_TRACKED_MAX {
            self.forget_full(now);
        }
        Ok(())
    }

    /// Forgets the buckets that are full again.
    fn forget_full(&mut self, now: Time) {
        let full = self.full(now);
        let quota = self.quota;
        self.buckets.retain(|_, b| {
            let level = refilled(quota, *b, full, now);
            level.frames < full.frames || level.bytes < full.bytes
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::time::Duration;

    #[test]
    fn a_user_gets_a_burst_then_the_rate_and_others_are_not_affected() {
        let quota = PublishQuota {
            frames_per_s: 10,
            bytes_per_s: 1_000,
        };
        let mut quotas = Quotas::new(quota);
        let (alice, bob) = (UserId([1; 32]), UserId([2; 32]));
        let t0 = Time::from_unix_micros(1_000_000);
        for _ in 0..20 {
            quotas.take(alice, 1, t0).expect("the burst");
        }
        let refused = quotas.take(alice, 1, t0).unwrap_err();
        assert!(refused.starts_with("publish rate"), "{refused}");
        quotas.take(bob, 1, t0).expect("another user");
        // A tenth of a second gives one frame back, not two.
        let t1 = t0.saturating_add(Duration::from_millis(100));
        quotas.take(alice, 1, t1).expect("refilled");
        assert!(quotas.take(alice, 1, t1).is_err());
        // Bytes are a budget of their own: 2,000 bytes of burst.
        let later = t1.saturating_add(Duration::from_secs(60));
        quotas
            .take(alice, 1_500, later)
            .expect("within the byte burst");
        let refused = quotas.take(alice, 600, later).unwrap_err();
        assert!(refused.starts_with("publish volume"), "{refused}");
    }

    #[test]
    fn full_buckets_are_forgotten_past_the_bound() {
        let mut quotas = Quotas::new(PublishQuota::default());
        let t0 = Time::from_unix_micros(0);
        for i in 0..=QUOTA_USERS_TRACKED_MAX as u32 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_be_bytes());
            let at = t0.saturating_add(Duration::from_secs(u64::from(i) * QUOTA_BURST_S));
            quotas.take(UserId(id), 1, at).unwrap();
        }
        assert!(quotas.buckets.len() <= 2, "{}", quotas.buckets.len());
    }
}
