//! The one length-prefixed framing codec of conclave's streams.
//!
//! A frame is a [`FRAME_PREFIX_BYTES`]-byte big-endian length, then that many bytes
//! of body. Both the QUIC transport (envelopes on long-lived node-to-node streams)
//! and the client protocol (requests and responses on per-request streams) use it,
//! each with its own bound on the body, passed by the caller.
//!
//! Reading is exact: however the bytes arrive (one at a time, or many frames per
//! read) the frames reassemble. A length above the bound is refused before anything
//! is allocated for the body, and the body buffer then grows only with the bytes
//! that actually arrive, so a peer that announces a large frame and sends nothing
//! holds little memory. A stream that ends between frames is a clean end
//! (`Ok(None)`); one that ends inside a prefix or a body is [`FrameError`].

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes of the length prefix in front of every frame (a big-endian `u32`).
pub const FRAME_PREFIX_BYTES: usize = 4;

/// The largest body bound a caller may pass: what the prefix can express.
pub const FRAME_BYTES_MAX_LIMIT: usize = u32::MAX as usize;

/// The body bytes reserved up front when a frame's length is known: larger frames
/// grow their buffer as their bytes arrive rather than on the peer's word.
pub const FRAME_PREALLOC_BYTES_MAX: usize = 64 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The frame's length is above the bound for this stream.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The length announced (reading) or offered (writing).
        len: u64,
        /// The bound.
        max: usize,
    },
    /// The stream ended inside a length prefix.
    #[error("stream ended inside a length prefix ({got} of {FRAME_PREFIX_BYTES} bytes)")]
    TruncatedPrefix {
        /// The prefix bytes that arrived.
        got: usize,
    },
    /// The stream ended inside a frame's body.
    #[error("stream ended inside a frame ({got} of {len} bytes)")]
    TruncatedBody {
        /// The body bytes that arrived.
        got: usize,
        /// The length the prefix announced.
        len: usize,
    },
    /// The stream failed (reset, connection lost): not the peer's framing.
    #[error("stream failed: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// Whether the peer broke the framing (as opposed to the stream failing).
    pub fn is_violation(&self) -> bool {
        !matches!(self, FrameError::Io(_))
    }
}

/// The length prefix of a `len`-byte body, or [`FrameError::TooLarge`] above `max`.
///
/// Every function here panics if `max` exceeds [`FRAME_BYTES_MAX_LIMIT`]: a bound the
/// prefix cannot express is a programmer error.
pub fn frame_prefix(len: usize, max: usize) -> Result<[u8; FRAME_PREFIX_BYTES], FrameError> {
    assert!(
        max <= FRAME_BYTES_MAX_LIMIT,
        "a frame bound must fit the prefix"
    );
    if len > max {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max,
        });
    }
    let len = u32::try_from(len).map_err(|_| FrameError::TooLarge {
        len: len as u64,
        max,
    })?;
    Ok(len.to_be_bytes())
}

/// Writes `body` as one frame. Nothing is written when it is above `max`. The
/// prefix and the body go to the stream as they are, without a copy into a frame
/// buffer (streams buffer anyway).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    body: &[u8],
    max: usize,
) -> Result<(), FrameError> {
    let prefix = frame_prefix(body.len(), max)?;
    writer.write_all(&prefix).await?;
    writer.write_all(body).await?;
    Ok(())
}

/// `bodies` as consecutive frames, ready for one vectored write (quinn's
/// `write_all_chunks`): each body's prefix, then the body itself, not copied.
/// Nothing is returned when one of them is above `max`.
pub fn frame_chunks(bodies: &[bytes::Bytes], max: usize) -> Result<Vec<bytes::Bytes>, FrameError> {
    let mut chunks = Vec::with_capacity(2 * bodies.len());
    for body in bodies {
        let prefix = frame_prefix(body.len(), max)?;
        chunks.push(bytes::Bytes::copy_from_slice(&prefix));
        chunks.push(body.clone());
    }
    Ok(chunks)
}

/// Reads one frame of at most `max` body bytes. `Ok(None)` when the stream ended
/// cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    match read_frame_len(reader, max).await? {
        Some(len) => read_frame_body(reader, len).await.map(Some),
        None => Ok(None),
    }
}

/// Reads a frame's length prefix and checks it against `max`: the body's length,
/// or `None` when the stream ended cleanly between frames. A caller that must
/// budget memory for the body (the client protocol) does so here, before
/// [`read_frame_body`].
pub async fn read_frame_len<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> Result<Option<usize>, FrameError> {
    assert!(
        max <= FRAME_BYTES_MAX_LIMIT,
        "a frame bound must fit the prefix"
    );
    let mut prefix = [0u8; FRAME_PREFIX_BYTES];
    match read_full(reader, &mut prefix).await? {
        0 => return Ok(None),
        FRAME_PREFIX_BYTES => {}
        got => return Err(FrameError::TruncatedPrefix { got }),
    }
    let announced = u32::from_be_bytes(prefix);
    // Checked before any allocation: the length is the peer's word.
    match usize::try_from(announced) {
        Ok(len) if len <= max => Ok(Some(len)),
        _ => Err(FrameError::TooLarge {
            len: u64::from(announced),
            max,
        }),
    }
}

/// Reads a frame's body of `len` bytes (a length [`read_frame_len`] checked); the
/// buffer grows as the bytes arrive.
pub async fn read_frame_body<R: AsyncRead + Unpin>(
    reader: &mut R,
    len: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut body = Vec::with_capacity(len.min(FRAME_PREALLOC_BYTES_MAX));
    let got = reader.take(len as u64).read_to_end(&mut body).await?;
    if got < len {
        return Err(FrameError::TruncatedBody { got, len });
    }
    assert_eq!(
        body.len(),
        len,
        "a frame body is exactly its announced length"
    );
    Ok(body)
}

/// Fills `buf` from `reader` until it is full or the stream ends; returns the bytes
/// read. Each read that does not end the stream adds at least one byte, so this
/// takes at most `buf.len()` reads.
async fn read_full<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<usize, std::io::Error> {
    let mut filled = 0;
    for _ in 0..buf.len() {
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
        if filled == buf.len() {
            break;
        }
    }
    assert!(filled <= buf.len());
    Ok(filled)
}

#[cfg(test)]
mod tests;
