//! Feeds arbitrary bytes to the client's decoder of a node's response (a node may
//! lie; the client must not panic): it must return a typed error or a value; a
//! decoded response re-encodes to a fixed point, and the checks a client runs on
//! what it received (frame signatures, a chain page) return, never panic.
#![no_main]

use conclave::client::{ClientResponse, CLIENT_MESSAGE_BYTES_MAX};
use conclave_actors::crypto::verify_frame;
use conclave_actors::domain::chain::ChainState;
use conclave_actors::wire::{decode_bounded, encode_bounded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(response) = decode_bounded::<ClientResponse>(data, CLIENT_MESSAGE_BYTES_MAX) else {
        return;
    };
    match &response {
        ClientResponse::Frame { frame, .. } => {
            let _ = verify_frame(frame);
        }
        ClientResponse::Chain(links) => {
            // What a client does with a page of a room's chain: verify it.
            if let Some(first) = links.first() {
                let _ = ChainState::verify(first.link.room, links);
            }
        }
        _ => {}
    }
    let once =
        encode_bounded(&response, CLIENT_MESSAGE_BYTES_MAX).expect("a decoded response encodes");
    assert!(once.len() <= data.len(), "an encoding never grows");
    let back: ClientResponse =
        decode_bounded(&once, CLIENT_MESSAGE_BYTES_MAX).expect("its encoding decodes");
    let twice = encode_bounded(&back, CLIENT_MESSAGE_BYTES_MAX).expect("encodes again");
    assert_eq!(twice, once);
});
