//! The one merge of a store's entries with pending writes on top, shared by the
//! in-memory store's write transactions and by [`crate::Batch`].

use crate::{Entry, Order};

/// Merges two iterators sorted in `order`: `base` entries and `overlay` writes
/// (`None` is a delete). On equal keys the overlay wins, and a `None` hides the key.
/// At most `limit` entries.
pub(crate) fn merge<'x>(
    base: impl Iterator<Item = (&'x [u8], &'x [u8])>,
    overlay: impl Iterator<Item = (&'x [u8], Option<&'x [u8]>)>,
    order: Order,
    limit: usize,
) -> Vec<Entry> {
    let mut base = base.peekable();
    let mut overlay = overlay.peekable();
    let mut out = Vec::new();
    while out.len() < limit {
        let from_base = match (base.peek(), overlay.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((b, _)), Some((o, _))) => {
                let cmp = b.cmp(o);
                let cmp = match order {
                    Order::Ascending => cmp,
                    Order::Descending => cmp.reverse(),
                };
                match cmp {
                    std::cmp::Ordering::Less => true,
                    std::cmp::Ordering::Greater => false,
                    std::cmp::Ordering::Equal => {
                        // Shadowed by the overlay.
                        base.next();
                        false
                    }
                }
            }
        };
        if from_base {
            if let Some((k, v)) = base.next() {
                out.push((k.to_vec(), v.to_vec()));
            }
        } else if let Some((k, Some(v))) = overlay.next() {
            out.push((k.to_vec(), v.to_vec()));
        }
    }
    out
}
