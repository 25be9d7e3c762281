//! Feeds arbitrary bytes, arriving in arbitrary pieces, to the framing codec's
//! reader (the one under every node-to-node and client stream). It must read frames
//! until a clean end or a typed error, never panic, never return a body above the
//! bound; the frames it returns re-encode to exactly the bytes it consumed, and its
//! error says truly where the input ended.
#![no_main]

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use conclave_transports::framing::{read_frame, write_frame, FrameError, FRAME_PREFIX_BYTES};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// Hands out at most `chunk` bytes per read, and is not ready every other poll, as
/// a network stream is.
struct Pieces<'a> {
    rest: &'a [u8],
    chunk: usize,
    ready: bool,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.ready = !self.ready;
        if !self.ready {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = self.chunk.min(self.rest.len()).min(buf.remaining());
        let (now, later) = self.rest.split_at(n);
        buf.put_slice(now);
        self.rest = later;
        Poll::Ready(Ok(()))
    }
}

/// Polls `future` to completion: every poll of `Pieces` makes progress or ends, so
/// `polls_max` polls are enough unless the codec loops.
fn run<T>(future: impl Future<Output = T>, polls_max: usize) -> T {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..polls_max {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("the codec did not finish within {polls_max} polls");
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(shape & 0x0f) + 1;
    let max = usize::from(shape >> 4) * 64;
    let mut reader = Pieces {
        rest: stream,
        chunk,
        ready: false,
    };
    let polls_max = 2 * (stream.len() + 2);
    let mut rewritten = Vec::new();
    // Each frame consumes at least its prefix, so this many frames end the input.
    for _ in 0..=stream.len() / FRAME_PREFIX_BYTES + 1 {
        let before = reader.rest.len();
        match run(read_frame(&mut reader, max), polls_max) {
            Ok(Some(body)) => {
                assert!(body.len() <= max);
                run(write_frame(&mut rewritten, &body, max), 4).expect("rewrites");
                assert_eq!(
                    rewritten.as_slice(),
                    &stream[..stream.len() - reader.rest.len()]
                );
            }
            Ok(None) => {
                assert_eq!(
                    rewritten.as_slice(),
                    stream,
                    "a clean end is the end of the input"
                );
                return;
            }
            Err(FrameError::TooLarge { len, max: bound }) => {
                assert!(len > bound as u64 && bound == max);
                assert_eq!(before - reader.rest.len(), FRAME_PREFIX_BYTES);
                return;
            }
            Err(FrameError::TruncatedPrefix { got }) => {
                assert!(got > 0 && got < FRAME_PREFIX_BYTES && got == before);
                return;
            }
            Err(FrameError::TruncatedBody { got, len }) => {
                assert!(got < len && FRAME_PREFIX_BYTES + got == before);
                assert!(reader.rest.is_empty());
                return;
            }
            Err(FrameError::Io(e)) => panic!("the input never fails, yet: {e}"),
        }
    }
    panic!("more frames than the input can hold");
});
