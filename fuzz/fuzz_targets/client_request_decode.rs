//! Feeds arbitrary bytes to the node's decoder of a client's request, exactly as the
//! client protocol reads one (bounded postcard, no trailing bytes): it must return a
//! typed error or a value, never panic; a decoded request re-encodes to a fixed
//! point, and the checks the node runs on it (signatures, chain links) return,
//! never panic.
#![no_main]

use conclave::client::{ClientRequest, CLIENT_MESSAGE_BYTES_MAX};
use conclave_actors::crypto::verify_frame;
use conclave_actors::wire::{decode_bounded, encode_bounded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = decode_bounded::<ClientRequest>(data, CLIENT_MESSAGE_BYTES_MAX) else {
        return;
    };
    match &request {
        ClientRequest::Call(signed) => {
            let _ = signed.verify();
            if let Some(link) = signed.request.op.link() {
                let _ = link.verify();
                let _ = link.hash();
            }
        }
        ClientRequest::Publish(frame) => {
            let _ = verify_frame(frame);
        }
        ClientRequest::Keys { .. }
        | ClientRequest::Chain { .. }
        | ClientRequest::Outcome { .. }
        | ClientRequest::Subscribe { .. }
        | ClientRequest::Whoami => {}
    }
    let once =
        encode_bounded(&request, CLIENT_MESSAGE_BYTES_MAX).expect("a decoded request encodes");
    assert!(once.len() <= data.len(), "an encoding never grows");
    let back: ClientRequest =
        decode_bounded(&once, CLIENT_MESSAGE_BYTES_MAX).expect("its encoding decodes");
    let twice = encode_bounded(&back, CLIENT_MESSAGE_BYTES_MAX).expect("encodes again");
    assert_eq!(twice, once);
});
