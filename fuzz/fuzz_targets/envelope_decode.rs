//! Feeds arbitrary bytes to the decoder of what peer nodes send each other, an
//! `Envelope<domain::Msg>`: it must return a typed error or a value, never panic; a
//! decoded envelope must re-encode to a fixed point. `Frame::decode` (a frame on its
//! own, as the benchmark's NATS payloads carry it) gets the same bytes, and a
//! decoded frame's signature check must return, not panic.
#![no_main]

use conclave_actors::crypto::{verify_frame, Frame};
use conclave_actors::domain::Msg;
use conclave_actors::wire::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::<Msg>::decode(data) {
        // Whatever decodes re-encodes, and that encoding is a fixed point.
        let once = env.encode().expect("a decoded envelope encodes");
        assert!(once.len() <= data.len(), "an encoding never grows");
        let back = Envelope::<Msg>::decode(&once).expect("its encoding decodes");
        assert_eq!(back.encode().expect("encodes again"), once);
        assert_eq!((back.from, back.to), (env.from, env.to));
    }
    if let Ok(frame) = Frame::decode(data) {
        let _ = verify_frame(&frame);
    }
});
