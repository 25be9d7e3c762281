//! Test support shared by the unit tests and the known-answer tests: hex decoding
//! of vectors, and an rng that returns fixed bytes.
#![allow(dead_code)]

use core::convert::Infallible;

use rand_core::{TryCryptoRng, TryRng};

/// Decodes vector hex.
pub fn h(text: &str) -> Vec<u8> {
    hex::decode(text).expect("vector hex")
}

/// Decodes 32 bytes of vector hex.
pub fn h32(text: &str) -> [u8; 32] {
    h(text).try_into().expect("32 bytes")
}

/// An "rng" that returns exactly the given bytes, then panics: it lets a test feed
/// the RFC's ikmE to code that draws its ephemeral key from an rng, and proves
/// (via [`FixedRng::assert_drained`]) that the code drew exactly those bytes.
pub struct FixedRng {
    bytes: Vec<u8>,
    pos: usize,
}

impl FixedRng {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self { bytes, pos: 0 }
    }

    pub fn assert_drained(&self) {
        assert_eq!(self.pos, self.bytes.len(), "rng bytes left unused");
    }
}

impl TryRng for FixedRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        let end = self.pos + dst.len();
        assert!(end <= self.bytes.len(), "FixedRng exhausted");
        dst.copy_from_slice(&self.bytes[self.pos..end]);
        self.pos = end;
        Ok(())
    }
}

impl TryCryptoRng for FixedRng {}
