//! Typed tables: order-preserving keys ([`Key`]) and postcard values.
//!
//! ```
//! use conclave_storage::{MemStore, Order, Store, Table};
//!
//! // Frames of a room, by (room id, sequence number).
//! const FRAMES: Table<([u8; 16], u64), Vec<u8>> = Table::new("frames");
//!
//! let store = MemStore::new();
//! let mut txn = store.write()?;
//! FRAMES.put(&mut *txn, &([7; 16], 1), &b"hello".to_vec())?;
//! FRAMES.put(&mut *txn, &([7; 16], 2), &b"world".to_vec())?;
//! txn.commit()?;
//!
//! let txn = store.read()?;
//! let history = FRAMES.scan(&*txn, ([7; 16], 0)..([7; 16], u64::MAX), Order::Ascending, 100)?;
//! assert_eq!(history.len(), 2);
//! assert_eq!(FRAMES.last(&*txn)?.map(|(k, _)| k.1), Some(2));
//! # Ok::<(), conclave_storage::StoreError>(())
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{check, Order, ReadTxn, Result, StoreError, WriteTxn};

/// A key type with an order-preserving byte encoding: for any two keys,
/// `a < b` exactly when `a`'s encoding sorts before `b`'s (bytewise), so scans in
/// byte order are scans in key order.
pub trait Key: Sized {
    /// Appends the encoding of `self` to `out`.
    fn encode_key(&self, out: &mut Vec<u8>);
    /// Decodes a key from exactly `bytes`. Failure is [`StoreError::Corrupt`]; leave
    /// its `table` empty and [`Table`] fills in its own name.
    fn decode_key(bytes: &[u8]) -> Result<Self, StoreError>;
}

/// A [`Key`] whose encoding always has the same length. Only such keys may come
/// before another component in a tuple key: a variable-length component anywhere but
/// last would make `("a", "b")` and `("ab", "")` encode alike, and break the order.
pub trait FixedKey: Key {
    /// The length of every encoding.
    const LEN: usize;
}

fn corrupt(reason: String) -> StoreError {
    StoreError::Corrupt {
        table: String::new(),
        reason,
    }
}

fn exact<const N: usize>(bytes: &[u8], what: &str) -> Result<[u8; N]> {
    bytes.try_into().map_err(|_| {
        corrupt(format!(
            "a {what} key must be {N} bytes, found {}",
            bytes.len()
        ))
    })
}

macro_rules! unsigned_key {
    ($($t:ty),*) => {$(
        impl Key for $t {
            fn encode_key(&self, out: &mut Vec<u8>) {
                // Big-endian: bytewise order is numeric order.
                out.extend_from_slice(&self.to_be_bytes());
            }
            fn decode_key(bytes: &[u8]) -> Result<Self> {
                Ok(<$t>::from_be_bytes(exact(bytes, stringify!($t))?))
            }
        }
        impl FixedKey for $t {
            const LEN: usize = std::mem::size_of::<$t>();
        }
    )*};
}
unsigned_key!(u8, u16, u32, u64, u128);

macro_rules! signed_key {
    ($($t:ty => $u:ty),*) => {$(
        impl Key for $t {
            fn encode_key(&self, out: &mut Vec<u8>) {
                // Flipping the sign bit maps MIN..=MAX onto 0..=MAX unsigned, in order.
                let flipped = (*self as $u) ^ (1 << (<$u>::BITS - 1));
                out.extend_from_slice(&flipped.to_be_bytes());
            }
            fn decode_key(bytes: &[u8]) -> Result<Self> {
                let flipped = <$u>::from_be_bytes(exact(bytes, stringify!($t))?);
                Ok((flipped ^ (1 << (<$u>::BITS - 1))) as $t)
            }
        }
        impl FixedKey for $t {
            const LEN: usize = std::mem::size_of::<$t>();
        }
    )*};
}
signed_key!(i8 => u8, i16 => u16, i32 => u32, i64 => u64, i128 => u128);

impl<const N: usize> Key for [u8; N] {
    fn encode_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
    fn decode_key(bytes: &[u8]) -> Result<Self> {
        exact(bytes, "byte array")
    }
}

impl<const N: usize> FixedKey for [u8; N] {
    const LEN: usize = N;
}

/// Raw bytes; variable length, so only valid alone or as the last tuple component.
impl Key for Vec<u8> {
    fn encode_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
    fn decode_key(bytes: &[u8]) -> Result<Self> {
        Ok(bytes.to_vec())
    }
}

/// UTF-8 bytes, which sort as `str` does; variable length, so only valid alone or as
/// the last tuple component.
impl Key for String {
    fn encode_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
    fn decode_key(bytes: &[u8]) -> Result<Self> {
        String::from_utf8(bytes.to_vec())
            .map_err(|e| corrupt(format!("a string key is not UTF-8: {e}")))
    }
}

/// Split off a fixed-width leading component.
fn split_fixed<A: FixedKey>(bytes: &[u8]) -> Result<(A, &[u8])> {
    if bytes.len() < A::LEN {
        return Err(corrupt(format!(
            "a tuple key of {} bytes is shorter than its {}-byte leading component",
            bytes.len(),
            A::LEN
        )));
    }
    let (head, rest) = bytes.split_at(A::LEN);
    Ok((A::decode_key(head)?, rest))
}

impl<A: FixedKey, B: Key> Key for (A, B) {
    fn encode_key(&self, out: &mut Vec<u8>) {
        self.0.encode_key(out);
        self.1.encode_key(out);
    }
    fn decode_key(bytes: &[u8]) -> Result<Self> {
        let (a, rest) = split_fixed::<A>(bytes)?;
        Ok((a, B::decode_key(rest)?))
    }
}

impl<A: FixedKey, B: FixedKey> FixedKey for (A, B) {
    const LEN: usize = A::LEN + B::LEN;
}

impl<A: FixedKey, B: FixedKey, C: Key> Key for (A, B, C) {
    fn encode_key(&self, out: &mut Vec<u8>) {
        self.0.encode_key(out);
        self.1.encode_key(out);
        self.2.encode_key(out);
    }
    fn decode_key(bytes: &[u8]) -> Result<Self> {
        let (a, rest) = split_fixed::<A>(bytes)?;
        let (b, rest) = split_fixed::<B>(rest)?;
        Ok((a, b, C::decode_key(rest)?))
    }
}

impl<A: FixedKey, B: FixedKey, C: FixedKey> FixedKey for (A, B, C) {
    const LEN: usize = A::LEN + B::LEN + C::LEN;
}

/// A typed view of one table: keys of type `K` (see [`Key`]), values of type `V`
/// stored with postcard.
///
/// Declare tables as constants, one name each: `const ROOMS: Table<RoomId, Room> =
/// Table::new("rooms");`. Bytes that do not decode as `K` or `V` are reported as
/// [`StoreError::Corrupt`] naming the table, never a panic.
pub struct Table<K, V> {
    name: &'static str,
    types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Table<K, V> {
    /// A table named `name`; the name is checked when the table is first used.
    pub const fn new(name: &'static str) -> Self {
        Table {
            name,
            types: PhantomData,
        }
    }

    /// The table's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }
}

// Not derived: derives would require `K: Clone` and `V: Clone` for no reason.
impl<K, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K, V> Copy for Table<K, V> {}

impl<K, V> fmt::Debug for Table<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Table").field(&self.name).finish()
    }
}

impl<K: Key, V: Serialize + DeserializeOwned> Table<K, V> {
    /// The value stored under `key`, if any.
    pub fn get(&self, txn: &dyn ReadTxn, key: &K) -> Result<Option<V>> {
        let key = self.encode_key(key)?;
        txn.get(self.name, &key)?
            .map(|bytes| self.decode_value(&bytes))
            .transpose()
    }

    /// Stores `value` under `key`, replacing any previous value.
    pub fn put(&self, txn: &mut dyn WriteTxn, key: &K, value: &V) -> Result<()> {
        let key = self.encode_key(key)?;
        let value = postcard::to_allocvec(value).map_err(|e| StoreError::Encode {
            table: self.name.to_owned(),
            reason: e.to_string(),
        })?;
        if cfg!(debug_assertions) {
            // What we write must read back: catches a value type whose serde impls
            // disagree before it reaches the disk (debug builds only; it costs a decode).
            self.decode_value(&value).map_err(|e| StoreError::Encode {
                table: self.name.to_owned(),
                reason: format!("the encoded value does not decode: {e}"),
            })?;
        }
        txn.put(self.name, &key, &value)
    }

    /// Removes `key`; returns whether it was present.
    pub fn delete(&self, txn: &mut dyn WriteTxn, key: &K) -> Result<bool> {
        let key = self.encode_key(key)?;
        txn.delete(self.name, &key)
    }

    /// At most `limit` entries whose keys lie in `range`, in `order`.
    pub fn scan(
        &self,
        txn: &dyn ReadTxn,
        range: impl RangeBounds<K>,
        order: Order,
        limit: usize,
    ) -> Result<Vec<(K, V)>> {
        let lower = self.encode_bound(range.start_bound())?;
        let upper = self.encode_bound(range.end_bound())?;
        let lower_ref = as_ref(&lower);
        let upper_ref = as_ref(&upper);
        let entries = txn.scan(self.name, lower_ref, upper_ref, order, limit)?;
        if entries.len() > limit {
            return Err(self.corrupt(format!(
                "a scan limited to {limit} entries returned {}",
                entries.len()
            )));
        }
        let mut out = Vec::with_capacity(entries.len());
        let mut previous: Option<&[u8]> = None;
        for (key, value) in &entries {
            // Believe nothing: every key is in range and strictly after (or before)
            // the previous one, or the store is broken.
            let in_order = previous.is_none_or(|p| match order {
                Order::Ascending => p < key.as_slice(),
                Order::Descending => p > key.as_slice(),
            });
            if !in_order || !(lower_ref, upper_ref).contains(key.as_slice()) {
                return Err(self.corrupt("a scan returned a key out of range or order".into()));
            }
            previous = Some(key);
            out.push((self.decode_key(key)?, self.decode_value(value)?));
        }
        Ok(out)
    }

    /// The entry with the smallest key, if any.
    pub fn first(&self, txn: &dyn ReadTxn) -> Result<Option<(K, V)>> {
        Ok(self.scan(txn, .., Order::Ascending, 1)?.pop())
    }

    /// The entry with the largest key, if any.
    pub fn last(&self, txn: &dyn ReadTxn) -> Result<Option<(K, V)>> {
        Ok(self.scan(txn, .., Order::Descending, 1)?.pop())
    }

    fn encode_key(&self, key: &K) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        key.encode_key(&mut out);
        check::key(self.name, &out)?;
        // A key must decode to something that encodes the same: otherwise scans and
        // reads would return keys other than the ones written.
        let mut again = Vec::with_capacity(out.len());
        self.decode_key(&out)?.encode_key(&mut again);
        if again != out {
            return Err(StoreError::Encode {
                table: self.name.to_owned(),
                reason: "the key type's encoding does not round-trip".to_owned(),
            });
        }
        Ok(out)
    }

    fn encode_bound(&self, bound: Bound<&K>) -> Result<Bound<Vec<u8>>> {
        let encode = |k: &K| {
            let mut out = Vec::new();
            k.encode_key(&mut out);
            out
        };
        Ok(match bound {
            Bound::Included(k) => Bound::Included(encode(k)),
            Bound::Excluded(k) => Bound::Excluded(encode(k)),
            Bound::Unbounded => Bound::Unbounded,
        })
    }

    fn decode_key(&self, bytes: &[u8]) -> Result<K> {
        K::decode_key(bytes).map_err(|e| self.relabel(e))
    }

    fn decode_value(&self, bytes: &[u8]) -> Result<V> {
        let (value, rest) = postcard::take_from_bytes(bytes)
            .map_err(|e| self.corrupt(format!("a value does not decode: {e}")))?;
        if !rest.is_empty() {
            return Err(self.corrupt(format!(
                "a value has {} trailing bytes after its encoding",
                rest.len()
            )));
        }
        Ok(value)
    }

    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt {
            table: self.name.to_owned(),
            reason,
        }
    }

    fn relabel(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Corrupt { table, reason } if table.is_empty() => self.corrupt(reason),
            e => e,
        }
    }
}

fn as_ref(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(k) => Bound::Included(k),
        Bound::Excluded(k) => Bound::Excluded(k),
        Bound::Unbounded => Bound::Unbounded,
    }
}
