//! Feeds arbitrary bytes to the envelope and frame decoders: they must return a typed
//! error or a value, never panic; a decoded envelope must re-encode to a fixed point,
//! and a decoded frame's signature check must return (not panic).
#![no_main]

use conclave_actors::crypto::Frame;
use conclave_actors::wire::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::<Frame>::decode(data) {
        // Whatever decodes re-encodes, and that encoding is a fixed point.
        let once = env.encode().expect("a decoded envelope encodes");
        let back = Envelope::<Frame>::decode(&once).expect("its encoding decodes");
        assert_eq!(back.encode().expect("encodes again"), once);
    }
    if let Ok(frame) = Frame::decode(data) {
        let _ = conclave_actors::crypto::verify_frame(&frame);
    }
});
