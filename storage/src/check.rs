//! Argument checks shared by every store, so that both stores accept and reject
//! exactly the same inputs with exactly the same errors.

use std::ops::Bound;

use crate::{Result, StoreError, KEY_BYTES_MAX, TABLE_NAME_BYTES_MAX, VALUE_BYTES_MAX};

/// Table names are short and printable: they become LMDB database names (C strings,
/// so no NUL) and show up in error messages and logs.
pub(crate) fn table_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > TABLE_NAME_BYTES_MAX {
        "it is longer than TABLE_NAME_BYTES_MAX (64 bytes)"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-'))
    {
        "only ASCII letters, digits and `_ . : / -` are allowed"
    } else {
        return Ok(());
    };
    Err(StoreError::BadTableName {
        name: name.to_owned(),
        reason,
    })
}

/// LMDB rejects empty keys and keys over its compile-time maximum; so do we, everywhere.
pub(crate) fn key(table: &str, key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::EmptyKey {
            table: table.to_owned(),
        });
    }
    bound_len(table, key)
}

pub(crate) fn value(table: &str, value: &[u8]) -> Result<()> {
    if value.len() > VALUE_BYTES_MAX {
        return Err(StoreError::ValueTooLarge {
            table: table.to_owned(),
            len: value.len(),
            max: VALUE_BYTES_MAX,
        });
    }
    Ok(())
}

fn bound_len(table: &str, key: &[u8]) -> Result<()> {
    if key.len() > KEY_BYTES_MAX {
        return Err(StoreError::KeyTooLarge {
            table: table.to_owned(),
            len: key.len(),
            max: KEY_BYTES_MAX,
        });
    }
    Ok(())
}

/// Scan bounds, normalised.
pub(crate) type Bounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// Checks scan bounds and normalises them so that every store can hand them to its
/// backend as is: returns `None` when no key can lie in the range (an inverted range,
/// which `BTreeMap::range` would panic on), and turns an empty lower bound into
/// `Unbounded` (no key is empty, and LMDB cannot position a cursor on an empty key).
pub(crate) fn bounds<'a>(
    table: &str,
    lower: Bound<&'a [u8]>,
    upper: Bound<&'a [u8]>,
) -> Result<Option<Bounds<'a>>> {
    for b in [lower, upper] {
        if let Bound::Included(k) | Bound::Excluded(k) = b {
            bound_len(table, k)?;
        }
    }
    let lower = match lower {
        Bound::Included([]) | Bound::Excluded([]) => Bound::Unbounded,
        other => other,
    };
    // No key is <= or < the empty key.
    if let Bound::Included([]) | Bound::Excluded([]) = upper {
        return Ok(None);
    }
    let empty = match (lower, upper) {
        (Bound::Included(lo), Bound::Included(hi)) => lo > hi,
        (Bound::Included(lo) | Bound::Excluded(lo), Bound::Excluded(hi) | Bound::Included(hi)) => {
            lo >= hi
        }
        _ => false,
    };
    Ok(if empty { None } else { Some((lower, upper)) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names() {
        assert!(table_name("rooms").is_ok());
        assert!(table_name("a/b.c:d-e_1").is_ok());
        assert!(table_name(&"x".repeat(TABLE_NAME_BYTES_MAX)).is_ok());
        for bad in [
            "",
            "a b",
            "nul\0",
            "é",
            &"x".repeat(TABLE_NAME_BYTES_MAX + 1),
        ] {
            assert!(
                matches!(table_name(bad), Err(StoreError::BadTableName { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn bounds_normalise() {
        use Bound::*;
        const E: &[u8] = b"";
        const A: &[u8] = b"a";
        const B: &[u8] = b"b";
        let b = |l, u| bounds("t", l, u).unwrap();
        assert_eq!(b(Included(E), Unbounded), Some((Unbounded, Unbounded)));
        assert_eq!(b(Excluded(E), Unbounded), Some((Unbounded, Unbounded)));
        assert_eq!(b(Unbounded, Included(E)), None);
        assert_eq!(b(Unbounded, Excluded(E)), None);
        assert_eq!(b(Included(B), Included(A)), None);
        assert_eq!(
            b(Included(A), Included(A)),
            Some((Included(A), Included(A)))
        );
        assert_eq!(b(Excluded(A), Included(A)), None);
        assert_eq!(b(Included(A), Excluded(A)), None);
        assert_eq!(b(Excluded(A), Excluded(A)), None);
        assert_eq!(
            b(Included(A), Excluded(B)),
            Some((Included(A), Excluded(B)))
        );
        let long = vec![1u8; KEY_BYTES_MAX + 1];
        assert!(matches!(
            bounds("t", Included(&long), Unbounded),
            Err(StoreError::KeyTooLarge { .. })
        ));
    }
}
