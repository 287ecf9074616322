//! The `/arcade/chunks/1` decoder (`arcade_p2p::mesh::protocol::read_message`) on
//! arbitrary stream bytes, as a request and as a response, plus what a peer does with
//! a decoded message before trusting it:
//!
//! - a decoded request re-encodes (`write_message`) and decodes to the same message;
//!   its ticket goes through `TicketVerifier::verify` (must fail cleanly, never panic);
//! - a decoded response is written with `write_response`, whose hand-written fast
//!   path for chunks must be byte-identical to prost's encoding, and decodes back equal;
//! - a `Held` response's bitfield goes through `Bitfield::from_bytes`; what it accepts
//!   must round-trip and be consistent (count, get, iterators).
//!
//! Input: the raw bytes a peer would send on the stream (4-byte big-endian length,
//! then the protobuf message).
#![no_main]

use std::io;
use std::sync::OnceLock;

use arcade_p2p::mesh::bitfield::Bitfield;
use arcade_p2p::mesh::protocol::{
    MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, read_message, write_message, write_response,
};
use arcade_p2p::mesh::ticket::{TicketIssuer, TicketVerifier};
use arcade_proto::v1 as pb;
use futures::executor::block_on;
use futures::io::Cursor;
use libfuzzer_sys::fuzz_target;
use libp2p_identity::PeerId;
use prost::Message as _;

fn verifier() -> &'static (TicketVerifier, PeerId) {
    static V: OnceLock<(TicketVerifier, PeerId)> = OnceLock::new();
    V.get_or_init(|| {
        let issuer = TicketIssuer::generate();
        let verifier = TicketVerifier::new(&issuer.public_key()).expect("own key");
        let peer = libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        (verifier, peer)
    })
}

/// The framing `write_message` / `write_response` must produce: prost's encoding
/// after its length as a big-endian u32.
fn prost_framed<M: prost::Message>(msg: &M) -> Vec<u8> {
    let mut out = (msg.encoded_len() as u32).to_be_bytes().to_vec();
    msg.encode(&mut out).expect("Vec grows");
    out
}

async fn check_request(data: &[u8]) {
    let mut rd = Cursor::new(data);
    let Ok(req) = read_message::<_, pb::ChunkRequest>(&mut rd, MAX_REQUEST_BYTES).await else {
        return;
    };
    // Exactly one frame was consumed, and it was within the limit.
    let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
    assert!(len <= MAX_REQUEST_BYTES);
    assert_eq!(rd.position() as usize, 4 + len);

    // Re-encoding never grows a request (no field widens), so it fits and round-trips.
    let mut out = Cursor::new(Vec::new());
    write_message(&mut out, &req, MAX_REQUEST_BYTES)
        .await
        .expect("a decoded request re-encodes within the limit");
    let out = out.into_inner();
    assert_eq!(out, prost_framed(&req));
    let back: pb::ChunkRequest = read_message(&mut Cursor::new(&out), MAX_REQUEST_BYTES)
        .await
        .expect("re-encoded request decodes");
    assert_eq!(back, req);

    // The serving side checks the ticket first: arbitrary bytes must be refused.
    let (verifier, peer) = verifier();
    assert!(verifier.verify(&req.ticket, peer, 0).is_err());
    assert!(verifier.verify(&req.ticket, peer, i64::MAX).is_err());
}

fn check_bitfield(h: &pb::HeldChunks) {
    let Ok(b) = Bitfield::from_bytes(h.chunks, &h.bits) else {
        return;
    };
    assert_eq!(b.len(), h.chunks);
    assert_eq!(b.to_bytes(), h.bits, "accepted bitfield must round-trip");
    let ones: u32 = h.bits.iter().map(|x| x.count_ones()).sum();
    assert_eq!(b.count(), ones);
    assert_eq!(b.count() + b.missing(), b.len());
    assert_eq!(b.is_full(), b.count() == b.len());
    let mut set = 0u32;
    let mut prev = None;
    for i in b.iter_set() {
        assert!(i < b.len(), "set index {i} past the end ({})", b.len());
        assert!(b.get(i));
        assert!(prev.is_none_or(|p| p < i), "indices ascend");
        prev = Some(i);
        set += 1;
    }
    assert_eq!(set, b.count());
    let mut missing = 0u32;
    for i in b.iter_missing() {
        assert!(i < b.len());
        assert!(!b.get(i));
        missing += 1;
    }
    assert_eq!(missing, b.missing());
    assert!(!b.get(b.len()));
    let _ = format!("{b:?}");
}

async fn check_response(data: &[u8]) {
    let mut rd = Cursor::new(data);
    let Ok(res) = read_message::<_, pb::ChunkResponse>(&mut rd, MAX_RESPONSE_BYTES).await else {
        return;
    };
    let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
    assert!(len <= MAX_RESPONSE_BYTES);
    assert_eq!(rd.position() as usize, 4 + len);

    match &res.kind {
        Some(pb::chunk_response::Kind::Held(h)) => check_bitfield(h),
        Some(pb::chunk_response::Kind::Refused(r)) => {
            // Unknown enum values map to a default, never a panic.
            let _ = r.reason();
        }
        _ => {}
    }

    // `write_response` (with its chunk fast path) must write exactly prost's bytes.
    let mut out = Cursor::new(Vec::new());
    match write_response(&mut out, &res).await {
        Ok(()) => {
            let out = out.into_inner();
            assert_eq!(out, prost_framed(&res), "write_response differs from prost");
            let back: pb::ChunkResponse = read_message(&mut Cursor::new(&out), MAX_RESPONSE_BYTES)
                .await
                .expect("written response decodes");
            assert_eq!(back, res);
        }
        Err(e) => {
            // Only an over-long message may be refused (a re-encoded negative enum can
            // widen, so this is possible only near the limit).
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
            assert!(res.encoded_len() > MAX_RESPONSE_BYTES, "{e}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    block_on(async {
        check_request(data).await;
        check_response(data).await;
    });
});
