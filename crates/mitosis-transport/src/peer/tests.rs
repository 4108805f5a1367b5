//! The page protocol's wire format and its pooled client, against fake peers.
use super::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

const KEY: [u8; KEY_LEN] = {
    let mut k = [0u8; KEY_LEN];
    let mut i = 0;
    while i < KEY_LEN {
        k[i] = 0xa0 + i as u8;
        i += 1;
    }
    k
};
const SEED: SeedRef = SeedRef { id: 7, key: KEY };

fn every_request() -> Vec<Request> {
    vec![
        Request::Attach,
        Request::Descriptor,
        Request::Pages {
            runs: vec![(0x7f00_0000_0000, 3), (0x7f00_0001_0000, 1)],
            touched: Some(0x7f00_0000_1000),
        },
        Request::Bootstrap,
    ]
}

#[test]
fn a_pages_frame_head_is_what_encoding_the_answer_puts_before_its_pages() {
    for len in [
        0usize,
        1,
        127,
        128,
        4096,
        16_383,
        16_384,
        65_536,
        1 << 20,
        4096 * 4096,
    ] {
        let pages = vec![0x5a; len];
        let mut framed = pages_frame_head(len);
        framed.extend_from_slice(&pages);
        assert_eq!(
            framed,
            frame::encode(&Response::Pages(pages)),
            "{len} bytes"
        );
    }
}

#[test]
fn the_key_never_goes_on_the_wire() {
    let nonce = [0x11; NONCE_LEN];
    for (seq, request) in every_request().into_iter().enumerate() {
        let bytes = seal(&SEED, &nonce, seq as u64, &request);
        // Not the key, nor any 8 bytes of it.
        for part in KEY.windows(8) {
            assert!(
                !bytes.windows(8).any(|w| w == part),
                "{request:?} carries key bytes: {bytes:02x?}"
            );
        }
        let sealed = Sealed::decode(&bytes[4..]).unwrap();
        assert_eq!((sealed.seed, sealed.seq), (7, seq as u64));
        assert!(sealed.verify(&KEY, &nonce));
        assert_eq!(sealed.request().unwrap(), request);
    }
}

#[test]
fn a_mac_holds_for_its_key_nonce_seq_and_body_only() {
    let nonce = [0x11; NONCE_LEN];
    let bytes = seal(&SEED, &nonce, 5, &Request::Attach);
    let sealed = Sealed::decode(&bytes[4..]).unwrap();
    let mut other_key = KEY;
    other_key[31] ^= 1;
    assert!(!sealed.verify(&other_key, &nonce));
    assert!(!sealed.verify(&KEY, &[0x12; NONCE_LEN]));
    let replayed = Sealed { seq: 6, ..sealed };
    assert!(!replayed.verify(&KEY, &nonce));
    let other_seed = Sealed {
        seed: 8,
        ..replayed
    };
    assert!(
        !Sealed {
            seq: 5,
            ..other_seed
        }
        .verify(&KEY, &nonce)
    );
    let body = postcard::to_stdvec(&Request::Bootstrap).unwrap();
    let sealed = Sealed::decode(&bytes[4..]).unwrap();
    assert!(
        !Sealed {
            body: &body,
            ..sealed
        }
        .verify(&KEY, &nonce)
    );
}

#[test]
fn hellos_parse_and_other_versions_are_named() {
    let hello = Hello::fresh().unwrap();
    let frame = hello.frame();
    assert_eq!(Hello::parse(&frame[4..]), Ok(hello));
    assert_ne!(Hello::fresh().unwrap().nonce, hello.nonce);
    let mut other = frame[4..].to_vec();
    other[4..8].copy_from_slice(&9u32.to_le_bytes());
    // A later version may say more after its version.
    other.extend_from_slice(&[0; 20]);
    let err = Hello::parse(&other).unwrap_err();
    assert_eq!(err, HelloError::Version { ours: 2, theirs: 9 });
    assert!(err.to_string().contains("version 9") && err.to_string().contains("version 2"));
    assert_eq!(Hello::parse(b"HTTP/1.1 400"), Err(HelloError::NotMitosis));
    assert_eq!(Hello::parse(&frame[4..20]), Err(HelloError::NotMitosis));
    // A TLS server and a plain one, each met by the other kind of client.
    let announced = &crate::tls::ANNOUNCEMENT[4..];
    assert_eq!(Hello::parse(announced), Err(HelloError::TlsRequired));
    assert!(HelloError::TlsRequired.to_string().contains("--tls-cert"));
    assert_eq!(Hello::parse_announcement(announced), Ok(()));
    assert_eq!(
        Hello::parse_announcement(&frame[4..]),
        Err(HelloError::NotTls)
    );
    let mut later = announced.to_vec();
    later[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert_eq!(
        Hello::parse_announcement(&later),
        Err(HelloError::Version { ours: 2, theirs: 9 })
    );
}

#[test]
fn run_counts_are_bounded_before_allocating() {
    let max = MAX_PAGES_PER_REQUEST as usize;
    let pages = |n: usize| Request::Pages {
        runs: (0..n as u64).map(|i| (i * 8192, 1)).collect(),
        touched: None,
    };
    let ok = postcard::to_stdvec(&pages(max)).unwrap();
    assert!(ok.len() <= MAX_REQUEST_FRAME, "{} bytes", ok.len());
    assert!(postcard::from_bytes::<Request>(&ok).is_ok());
    let over = postcard::to_stdvec(&pages(max + 1)).unwrap();
    assert!(postcard::from_bytes::<Request>(&over).is_err());
    // A few bytes claiming 33.5 M runs are refused on the claim.
    let mut claim = postcard::to_stdvec(&pages(0)).unwrap();
    claim.truncate(1);
    claim.extend_from_slice(&[0x80, 0x80, 0x80, 0x10, 0, 0, 0, 0]);
    assert!(postcard::from_bytes::<Request>(&claim).is_err());
    // Answers too.
    let answer = |n: u64| Response::Bootstrap {
        descriptor: vec![],
        runs: (0..n).map(|i| (i * 8192, 1)).collect(),
        follow: PagesFollow::Raw,
        learn: false,
    };
    let ok = postcard::to_stdvec(&answer(MAX_BOOTSTRAP_PAGES)).unwrap();
    assert!(postcard::from_bytes::<Response>(&ok).is_ok());
    let over = postcard::to_stdvec(&answer(MAX_BOOTSTRAP_PAGES + 1)).unwrap();
    assert!(postcard::from_bytes::<Response>(&over).is_err());
}

/// A page server of `version` on loopback: checks every request's MAC and sequence,
/// answers `Attached`, and closes each connection after `per_connection` requests. Sends
/// the sequence numbers it saw, per connection.
async fn fake_server(
    version: u32,
    per_connection: usize,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u64>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let hello = Hello {
                version,
                ..Hello::fresh().unwrap()
            };
            stream.write_all(&hello.frame()).await.unwrap();
            let mut seqs = Vec::new();
            while seqs.len() < per_connection {
                let Ok(body) = frame::read_body(&mut stream, MAX_REQUEST_FRAME).await else {
                    break;
                };
                let sealed = Sealed::decode(&body).unwrap();
                assert!(sealed.verify(&KEY, &hello.nonce));
                assert!(seqs.last().is_none_or(|&last| sealed.seq > last));
                seqs.push(sealed.seq);
                frame::write(&mut stream, &Response::Attached)
                    .await
                    .unwrap();
            }
            tx.send(seqs).unwrap();
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn pooled_connections_count_on_and_closed_ones_are_replaced() {
    let (addr, mut seen) = fake_server(PROTOCOL_VERSION, 3).await;
    let pool = PeerPool::new(4, Duration::from_secs(5));
    // Three requests on one connection, then the server closes it (as after an idle
    // while): the fourth goes on a new connection without an error.
    for _ in 0..4 {
        pool.attach(addr, SEED).await.unwrap();
    }
    assert_eq!(seen.recv().await.unwrap(), vec![0, 1, 2]);
    pool.attach(addr, SEED).await.unwrap();
    assert_eq!(pool.idle_counts(), vec![(addr, 1)]);
}

#[tokio::test]
async fn a_server_of_another_version_is_a_typed_error() {
    let (addr, _seen) = fake_server(PROTOCOL_VERSION + 1, 1).await;
    let pool = PeerPool::new(4, Duration::from_secs(5));
    let err = pool.attach(addr, SEED).await.unwrap_err();
    assert!(
        matches!(
            err,
            PeerError::Handshake(_, HelloError::Version { ours: 2, theirs: 3 })
        ),
        "{err}"
    );
    assert!(pool.idle_counts().iter().all(|(_, n)| *n == 0));
}

#[tokio::test]
async fn a_server_without_a_hello_times_out_clearly() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move { listener.accept().await });
    let pool = PeerPool::new(4, Duration::from_millis(200));
    let err = pool.attach(addr, SEED).await.unwrap_err();
    assert!(matches!(err, PeerError::NoHello(..)), "{err}");
    silent.abort();
}

/// A page server on loopback with `tls`: the announcement and handshake, then the hello,
/// then `Attached` to every request. Sends each handshake's outcome.
async fn fake_tls_server(
    tls: Tls,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<(), String>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let (tx, acceptor) = (tx.clone(), tls.acceptor());
            tokio::spawn(async move {
                stream.write_all(&crate::tls::ANNOUNCEMENT).await?;
                let mut stream = match acceptor.accept(stream).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return Ok(());
                    }
                };
                let _ = tx.send(Ok(()));
                stream.write_all(&Hello::fresh().unwrap().frame()).await?;
                stream.flush().await?;
                while frame::read_body(&mut stream, MAX_REQUEST_FRAME)
                    .await
                    .is_ok()
                {
                    stream
                        .write_all(&frame::encode(&Response::Attached))
                        .await?;
                    stream.flush().await?;
                }
                Ok::<_, std::io::Error>(())
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn tls_pools_check_the_chain_and_the_address() {
    use crate::tls::tests::{Files, ca, tls};
    let files = Files::new("pool");
    let (ours, theirs) = (ca("our CA"), ca("another CA"));
    let server = tls(&files, "server", &ours, "127.0.0.1", &ours);
    let client = tls(&files, "client", &ours, "127.0.0.9", &ours);
    let pool = |tls: Option<&Tls>| PeerPool::new(4, Duration::from_secs(5)).with_tls(tls);

    // Both certificates from the CA, the server's naming the address dialed.
    let (addr, mut shakes) = fake_tls_server(server).await;
    pool(Some(&client)).attach(addr, SEED).await.unwrap();
    assert_eq!(shakes.recv().await.unwrap(), Ok(()));

    // A client whose certificate is from another CA: the server refuses it.
    let stranger = tls(&files, "stranger", &theirs, "127.0.0.9", &ours);
    let err = pool(Some(&stranger)).attach(addr, SEED).await.unwrap_err();
    assert!(matches!(err, PeerError::Tls(..)), "{err}");
    let refused = shakes.recv().await.unwrap().unwrap_err();
    assert!(refused.contains("certificate"), "{refused}");

    // A plain client is told the server wants TLS.
    let err = pool(None).attach(addr, SEED).await.unwrap_err();
    assert!(
        matches!(err, PeerError::Handshake(_, HelloError::TlsRequired)),
        "{err}"
    );

    // A server whose certificate names another address, or is from another CA.
    for (issuer, ip) in [(&ours, "127.0.0.2"), (&theirs, "127.0.0.1")] {
        let server = tls(&files, "impostor", issuer, ip, &ours);
        let (addr, _shakes) = fake_tls_server(server).await;
        let err = pool(Some(&client)).attach(addr, SEED).await.unwrap_err();
        assert!(
            matches!(&err, PeerError::Tls(_, why) if why.starts_with("handshake failed")),
            "{err}"
        );
    }

    // A TLS client is told a plain server has no TLS.
    let (addr, _seen) = fake_server(PROTOCOL_VERSION, 1).await;
    let err = pool(Some(&client)).attach(addr, SEED).await.unwrap_err();
    assert!(
        matches!(err, PeerError::Handshake(_, HelloError::NotTls)),
        "{err}"
    );
}

#[test]
fn page_runs_join_neighbours_only() {
    assert_eq!(
        page_runs(&[0x1000, 0x2000, 0x3000, 0x5000, 0x9000, 0xa000]),
        vec![(0x1000, 3), (0x5000, 1), (0x9000, 2)]
    );
    assert!(page_runs(&[]).is_empty());
}
