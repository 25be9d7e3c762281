//! The trace hash: FNV-1a (64 bits) over everything a run does, in order. Not a
//! cryptographic hash: it only has to tell two runs apart.

use serde::Serialize;

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// An FNV-1a hasher that messages can be serialized into (postcard, no copy).
#[derive(Clone, Copy, Debug)]
pub struct TraceHasher(u64);

impl Default for TraceHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceHasher {
    /// The empty hash.
    pub const fn new() -> Self {
        Self(OFFSET)
    }

    /// Folds `bytes` in.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
        self.0 = h;
    }

    /// Folds a number in.
    pub fn write_u64(&mut self, n: u64) {
        self.write_bytes(&n.to_le_bytes());
    }

    /// Folds the postcard encoding of `value` in.
    pub fn write_serialized<T: Serialize + ?Sized>(&mut self, value: &T) {
        if postcard::to_io(value, &mut *self).is_err() {
            // Serializing an in-memory message into a hasher cannot fail; if it ever
            // did, the marker keeps the hash a function of the run.
            self.write_bytes(b"unserializable");
        }
    }

    /// The hash so far.
    pub const fn finish(&self) -> u64 {
        self.0
    }
}

impl std::io::Write for TraceHasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_reference_values() {
        let mut h = TraceHasher::new();
        h.write_bytes(b"");
        assert_eq!(h.finish(), 0xcbf2_9ce4_8422_2325);
        h.write_bytes(b"a");
        assert_eq!(h.finish(), 0xaf63_dc4c_8601_ec8c);
    }
}
