//! Connection ids a node recognises across its restarts: a random nonce and a
//! tag keyed by the node's identity, so that a restarted node knows the ids of its
//! previous run (and answers their packets with a stateless reset), while the
//! nonce is long enough that ids, and so reset tokens, do not recur.

use ring::hmac;

/// Random bytes per id: 2^96 ids, so that none recurs across runs (a recurring id
/// would reuse a stateless-reset token an observer may have seen).
const NONCE_BYTES: usize = 12;
/// Tag bytes: what tells this node's ids from random bytes (a false match only
/// costs a stateless reset to a stray packet).
const TAG_BYTES: usize = 4;

/// The generator of a node's connection ids (see the module docs).
pub(super) struct SignedCids {
    key: hmac::Key,
}

impl SignedCids {
    /// Ids tagged with `key` (derived from the node's identity).
    pub(super) fn new(key: &[u8; 32]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    fn tag(&self, nonce: &[u8]) -> [u8; TAG_BYTES] {
        let full = hmac::sign(&self.key, nonce);
        let mut tag = [0; TAG_BYTES];
        tag.copy_from_slice(&full.as_ref()[..TAG_BYTES]);
        tag
    }
}

impl quinn_proto::ConnectionIdGenerator for SignedCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut bytes = [0u8; NONCE_BYTES + TAG_BYTES];
        // The OS's randomness failing is not something a node can run without.
        getrandom::fill(&mut bytes[..NONCE_BYTES]).expect("the OS provides randomness");
        let tag = self.tag(&bytes[..NONCE_BYTES]);
        bytes[NONCE_BYTES..].copy_from_slice(&tag);
        quinn::ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &quinn::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() != NONCE_BYTES + TAG_BYTES {
            return Err(quinn_proto::InvalidCid);
        }
        let (nonce, tag) = cid.split_at(NONCE_BYTES);
        match self.tag(nonce)[..] == tag[..] {
            true => Ok(()),
            false => Err(quinn_proto::InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        NONCE_BYTES + TAG_BYTES
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use quinn_proto::ConnectionIdGenerator;

    use super::*;

    #[test]
    fn ids_validate_under_their_key_only_and_do_not_repeat() {
        let mut mine = SignedCids::new(&[1; 32]);
        let theirs = SignedCids::new(&[2; 32]);
        let a = mine.generate_cid();
        let b = mine.generate_cid();
        assert_ne!(a, b);
        assert!(mine.validate(&a).is_ok());
        assert!(theirs.validate(&a).is_err());
        assert!(mine.validate(&quinn::ConnectionId::new(&[0; 16])).is_err());
        // The same key in the next run recognises this run's ids.
        assert!(SignedCids::new(&[1; 32]).validate(&a).is_ok());
    }
}
