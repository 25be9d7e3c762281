use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

use super::*;

const MAX: usize = 1024;

async fn framed(bodies: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for body in bodies {
        write_frame(&mut out, body, MAX)
            .await
            .expect("within the bound");
    }
    out
}

#[tokio::test]
async fn frames_round_trip_and_the_stream_ends_cleanly_between_them() {
    let bodies: [&[u8]; 4] = [b"", b"a", &[7u8; 300], &[1u8; MAX]];
    let bytes = framed(&bodies).await;
    let total: usize = bodies.iter().map(|b| FRAME_PREFIX_BYTES + b.len()).sum();
    assert_eq!(bytes.len(), total);
    // The wire format: a big-endian u32 length, then the body.
    assert_eq!(&bytes[4..9], &[0, 0, 0, 1, b'a']);
    let mut reader = bytes.as_slice();
    for body in bodies {
        let got = read_frame(&mut reader, MAX).await.expect("reads");
        assert_eq!(got.as_deref(), Some(body));
    }
    assert!(read_frame(&mut reader, MAX)
        .await
        .expect("clean end")
        .is_none());
    let mut empty: &[u8] = &[];
    assert!(read_frame(&mut empty, MAX)
        .await
        .expect("clean end")
        .is_none());
}

#[tokio::test]
async fn an_oversized_frame_is_refused_after_its_prefix_only() {
    let mut bytes = u32::try_from(MAX + 1)
        .expect("small")
        .to_be_bytes()
        .to_vec();
    bytes.extend_from_slice(b"body that must stay unread");
    let mut reader = bytes.as_slice();
    match read_frame(&mut reader, MAX).await {
        Err(FrameError::TooLarge { len, max }) => {
            assert_eq!((len, max), ((MAX + 1) as u64, MAX));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(reader, b"body that must stay unread");

    // The largest length the prefix can express, against the largest bound.
    let mut reader: &[u8] = &[0xff, 0xff, 0xff, 0xff];
    assert!(matches!(
        read_frame(&mut reader, MAX).await,
        Err(FrameError::TooLarge { len, .. }) if len == u64::from(u32::MAX)
    ));
}

#[tokio::test]
async fn a_huge_announced_length_allocates_only_what_arrives() {
    // A peer may announce up to the bound and send nothing: the reader holds what
    // arrived, not what was announced (4 GiB here would abort the test).
    let mut bytes = u32::MAX.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[9; 10]);
    let mut reader = bytes.as_slice();
    match read_frame(&mut reader, FRAME_BYTES_MAX_LIMIT).await {
        Err(FrameError::TruncatedBody { got, len }) => {
            assert_eq!((got, len), (10, FRAME_BYTES_MAX_LIMIT));
        }
        other => panic!("expected TruncatedBody, got {other:?}"),
    }
}

#[tokio::test]
async fn writing_an_oversized_frame_writes_nothing() {
    let mut out = Vec::new();
    let body = vec![0u8; MAX + 1];
    let error = write_frame(&mut out, &body, MAX)
        .await
        .expect_err("too large");
    assert!(matches!(error, FrameError::TooLarge { len, max: MAX } if len == (MAX + 1) as u64));
    assert!(error.is_violation());
    assert!(out.is_empty());
}

#[tokio::test]
async fn a_stream_ending_inside_a_prefix_or_a_body_is_truncated() {
    for cut in 1..FRAME_PREFIX_BYTES {
        let bytes = framed(&[b"hello"]).await;
        let mut reader = &bytes[..cut];
        match read_frame(&mut reader, MAX).await {
            Err(FrameError::TruncatedPrefix { got }) => assert_eq!(got, cut),
            other => panic!("expected TruncatedPrefix, got {other:?}"),
        }
    }
    let bytes = framed(&[b"hello"]).await;
    for cut in FRAME_PREFIX_BYTES..bytes.len() {
        let mut reader = &bytes[..cut];
        match read_frame(&mut reader, MAX).await {
            Err(error @ FrameError::TruncatedBody { got, len }) => {
                assert_eq!((got, len), (cut - FRAME_PREFIX_BYTES, 5));
                assert!(error.is_violation());
            }
            other => panic!("expected TruncatedBody, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn frames_written_one_byte_at_a_time_reassemble() {
    let bodies: [&[u8]; 3] = [b"first", b"", &[3u8; 700]];
    let bytes = framed(&bodies).await;
    // A one-byte pipe: every read returns at most one byte.
    let (mut tx, mut rx) = tokio::io::duplex(1);
    let writer = tokio::spawn(async move {
        for byte in bytes {
            tx.write_all(&[byte]).await.expect("write");
        }
    });
    for body in bodies {
        let got = read_frame(&mut rx, MAX).await.expect("reads");
        assert_eq!(got.as_deref(), Some(body));
    }
    writer.await.expect("writer");
    assert!(read_frame(&mut rx, MAX).await.expect("clean end").is_none());
}

/// A stream that fails after handing out some bytes.
struct Failing(&'static [u8]);

impl AsyncRead for Failing {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.0.split_first() {
            Some((&byte, rest)) => {
                buf.put_slice(&[byte]);
                self.0 = rest;
                Poll::Ready(Ok(()))
            }
            None => Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into())),
        }
    }
}

#[tokio::test]
async fn a_failing_stream_is_an_io_error_not_a_violation() {
    for bytes in [&[][..], &[0, 0][..], &[0, 0, 0, 9, 1, 2][..]] {
        let error = read_frame(&mut Failing(bytes), MAX)
            .await
            .expect_err("fails");
        assert!(matches!(error, FrameError::Io(_)), "{error:?}");
        assert!(!error.is_violation());
    }
}

#[test]
#[should_panic(expected = "a frame bound must fit the prefix")]
#[cfg(target_pointer_width = "64")]
fn a_bound_the_prefix_cannot_express_is_a_programmer_error() {
    let _ = frame_prefix(0, FRAME_BYTES_MAX_LIMIT + 1);
}

#[tokio::test]
async fn chunks_for_one_vectored_write_are_the_same_bytes_as_frames_written_one_by_one() {
    let bodies: [&[u8]; 3] = [b"", b"abc", &[9u8; MAX]];
    let owned: Vec<bytes::Bytes> = bodies
        .iter()
        .map(|b| bytes::Bytes::copy_from_slice(b))
        .collect();
    let chunks = frame_chunks(&owned, MAX).expect("within the bound");
    assert_eq!(chunks.concat(), framed(&bodies).await);
    // One body above the bound: no chunks at all, not a partial batch.
    let too_big = [
        bytes::Bytes::from_static(b"ok"),
        bytes::Bytes::from(vec![0u8; MAX + 1]),
    ];
    assert!(matches!(
        frame_chunks(&too_big, MAX),
        Err(FrameError::TooLarge { .. })
    ));
}
