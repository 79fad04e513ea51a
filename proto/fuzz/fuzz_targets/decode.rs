//! Splits the input into frames with `frame::split`, decodes every body with both
//! `PeerMessage::decode` and `LocalMessage::decode`, and checks that whatever decodes encodes
//! back to a frame that decodes to the same value (and, the encoding being canonical, to the
//! same bytes). `frame::read` must see the same frames as `split`, and for `PAGES` frames
//! `PageRun::decode_pages_header` must agree with the whole-body decode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::frame::{self, FramePrefix, PREFIX_LEN};
use proto::local::LocalMessage;
use proto::peer::{self, PageRun, PeerMessage, RUN_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((prefix, body, tail))) = frame::split(rest) {
        check_peer(prefix, body);
        check_local(prefix, body);
        rest = tail;
    }

    // `read` over the whole frames `split` found sees the same frames, then a clean end. (Not
    // over the partial last frame: `read` allocates the announced length, up to 8 MiB, first.)
    let whole = &data[..data.len() - rest.len()];
    let mut r = whole;
    let mut split_rest = whole;
    let mut body = Vec::new();
    while let Ok(Some((prefix, b, tail))) = frame::split(split_rest) {
        let got = frame::read(&mut r, &mut body).expect("read fails on a whole frame");
        assert_eq!(got, prefix);
        assert_eq!(body, b);
        split_rest = tail;
    }
    assert!(frame::read(&mut r, &mut body).unwrap_err().is_eof());
});

fn check_peer(prefix: FramePrefix, body: &[u8]) {
    let decoded = PeerMessage::decode(prefix.kind, body);

    if prefix.kind == peer::kind::PAGES {
        if let Some(header) = body.first_chunk::<RUN_HEADER_LEN>() {
            match (&decoded, PageRun::decode_pages_header(prefix, header)) {
                (Ok(PeerMessage::Pages(a)), Ok(b)) => assert_eq!(*a, b),
                (Err(_), Err(_)) => {}
                (a, b) => panic!("whole body decodes as {a:?}, header as {b:?}"),
            }
        }
    }

    let Ok(m) = decoded else { return };
    let mut buf = Vec::new();
    m.encode(&mut buf);
    if let PeerMessage::Pages(run) = &m {
        buf.resize(buf.len() + run.data_len(), 0);
    }
    let (p, again, tail) = frame::split(&buf)
        .expect("re-encoding is a valid frame")
        .expect("re-encoding is a whole frame");
    assert!(tail.is_empty());
    assert_eq!(p.kind, prefix.kind);
    assert_eq!(PeerMessage::decode(p.kind, again), Ok(m.clone()), "re-encoding differs");
    // Canonical: the same bytes (for `PAGES`, the same header; the data is not in the value).
    assert_eq!(again.len(), body.len());
    if prefix.kind == peer::kind::PAGES {
        assert_eq!(again[..RUN_HEADER_LEN], body[..RUN_HEADER_LEN]);
    } else {
        assert_eq!(again, body, "non-canonical encoding accepted: {m:?}");
    }
    assert_eq!(buf.len(), PREFIX_LEN + body.len());
}

fn check_local(prefix: FramePrefix, body: &[u8]) {
    let Ok(m) = LocalMessage::decode(prefix.kind, body) else { return };
    let mut buf = Vec::new();
    m.encode(&mut buf);
    let (p, again, tail) = frame::split(&buf)
        .expect("re-encoding is a valid frame")
        .expect("re-encoding is a whole frame");
    assert!(tail.is_empty());
    assert_eq!(p.kind, prefix.kind);
    assert_eq!(LocalMessage::decode(p.kind, again), Ok(m.clone()), "re-encoding differs");
    assert_eq!(again, body, "non-canonical encoding accepted: {m:?}");
}
