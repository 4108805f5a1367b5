//! The HTTP contract (Knative's and of-watchdog's): the function serves HTTP on a listening
//! socket handed to it, and the platform forwards the call's request to it.
//!
//! A warm HTTP function blocks reading one line from stdin, as every seed does; its child is
//! given `serve 1` on stdin and, as fd 3 (systemd's socket-activation convention, what
//! `mitosis resume --listen` does), a socket the platform listens on. The platform connects,
//! sends the request as HTTP/1.0 with `Connection: close` (so the answer is never chunked and
//! ends with the connection), and answers the caller with the function's status, headers and
//! body.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The annotation that makes a function's contract HTTP (`"http"`; else `"stdio"`).
pub const CONTRACT_ANNOTATION: &str = "mitosis.io/contract";

/// Whether a function with these annotations serves HTTP.
pub fn is_http(annotations: &std::collections::BTreeMap<String, serde_json::Value>) -> bool {
    annotations
        .get(CONTRACT_ANNOTATION)
        .and_then(|v| v.as_str())
        == Some("http")
}

/// What the function gets on stdin: serve one request, then exit.
pub const SERVE_ONE: &[u8] = b"serve 1\n";

/// Header names and values, in order (values may be any bytes HTTP allows).
pub type Headers = Vec<(String, Vec<u8>)>;

/// The request forwarded to an HTTP function.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: String,
    /// The path and query the function sees (`/` for Fn's `/invoke`).
    pub target: String,
    /// The caller's headers but for hop-by-hop ones (and `Host`, `Content-Length`, which
    /// the platform sets).
    pub headers: Vec<(String, Vec<u8>)>,
}

/// The function's answer, with its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// Headers that concern one connection, not the request: never forwarded either way.
pub fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "host",
        "content-length",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

/// The request as bytes on the wire.
pub fn encode(req: &HttpRequest, body: &[u8]) -> Vec<u8> {
    let mut out = format!("{} {} HTTP/1.0\r\n", req.method, req.target).into_bytes();
    for (name, value) in &req.headers {
        if is_hop_by_hop(name) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(
        format!(
            "Host: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// Why an answer is not one.
#[derive(Debug, thiserror::Error)]
pub enum HttpAnswerError {
    #[error("the function's HTTP answer is malformed: {0}")]
    Malformed(String),
    #[error("the function's HTTP answer ended early")]
    Incomplete,
    #[error("the function's answer is over {0} bytes")]
    TooLarge(usize),
    #[error("talking HTTP to the function: {0}")]
    Io(#[from] io::Error),
}

/// Parses a whole answer (the connection has ended).
pub fn decode(raw: &[u8]) -> Result<HttpResponse, HttpAnswerError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(HttpAnswerError::Incomplete),
        Err(e) => return Err(HttpAnswerError::Malformed(e.to_string())),
    };
    let status = parsed.code.ok_or(HttpAnswerError::Incomplete)?;
    let mut body = raw[head_len..].to_vec();
    let mut kept = Vec::new();
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| HttpAnswerError::Malformed("a bad Content-Length".into()))?;
            if body.len() < n {
                return Err(HttpAnswerError::Incomplete);
            }
            body.truncate(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // An HTTP/1.0 request must not get a chunked answer.
            return Err(HttpAnswerError::Malformed(
                "a Transfer-Encoding in the answer to an HTTP/1.0 request".into(),
            ));
        } else if !is_hop_by_hop(h.name) {
            kept.push((h.name.to_owned(), h.value.to_vec()));
        }
    }
    Ok(HttpResponse {
        status,
        headers: kept,
        body,
    })
}

/// Sends `req` with `body` to the function listening at `addr` and reads its whole answer
/// (at most `max` bytes).
pub async fn exchange(
    addr: SocketAddr,
    req: &HttpRequest,
    body: &[u8],
    max: usize,
) -> Result<HttpResponse, HttpAnswerError> {
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(&encode(req, body)).await?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        if raw.len() + n > max {
            return Err(HttpAnswerError::TooLarge(max));
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    decode(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_drop_hop_by_hop_headers_and_set_their_own() {
        let req = HttpRequest {
            method: "PUT".into(),
            target: "/a?b=1".into(),
            headers: vec![
                ("X-Trace".into(), b"7".to_vec()),
                ("Connection".into(), b"keep-alive".to_vec()),
                ("Host".into(), b"api:8080".to_vec()),
                ("content-length".into(), b"99".to_vec()),
            ],
        };
        let wire = String::from_utf8(encode(&req, b"hey")).unwrap();
        assert_eq!(
            wire,
            "PUT /a?b=1 HTTP/1.0\r\nX-Trace: 7\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Length: 3\r\n\r\nhey"
        );
    }

    #[test]
    fn answers_parse_and_bad_ones_are_refused() {
        let ok = decode(b"HTTP/1.0 201 Created\r\nContent-Type: text/plain\r\nServer: x\r\nContent-Length: 2\r\n\r\nhi").unwrap();
        assert_eq!(ok.status, 201);
        assert_eq!(ok.body, b"hi");
        assert_eq!(ok.headers.len(), 2);
        // No length: the body is what came before the connection closed.
        let open = decode(b"HTTP/1.0 200 OK\r\n\r\nall of it").unwrap();
        assert_eq!(open.body, b"all of it");
        assert!(matches!(
            decode(b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nshort"),
            Err(HttpAnswerError::Incomplete)
        ));
        assert!(matches!(
            decode(b"HTTP/1.0 200 OK\r\nContent-Le"),
            Err(HttpAnswerError::Incomplete)
        ));
        assert!(matches!(
            decode(b"nonsense\r\n\r\n"),
            Err(HttpAnswerError::Malformed(_))
        ));
        assert!(matches!(
            decode(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            Err(HttpAnswerError::Malformed(_))
        ));
    }
}
