//! The platform's API for tests: the platform served on a loopback port from a thread of its
//! own, and plain HTTP/1.1 requests to it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use mitosis_platform::{Config, HostSpec};
use mitosis_testbed::Testbed;
use serde_json::Value;

/// The platform on a loopback port; stopped (and its seeds dropped) on drop, before the
/// testbed it uses goes.
pub struct Api {
    pub addr: SocketAddr,
    _served: mitosis_platform::background::Background,
}

/// An answer: status, headers (lower-case names), body.
pub struct Reply {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }

    /// Fn's error body's message.
    pub fn message(&self) -> String {
        self.json()["message"]
            .as_str()
            .expect("a message")
            .to_owned()
    }
}

impl Api {
    /// The platform with `config` over the hosts of `tb`.
    pub fn start_with(tb: &Testbed, config: Config) -> Api {
        let hosts = HostSpec::of_testbed(tb);
        let served =
            mitosis_platform::background::Background::start(config, hosts).expect("the API starts");
        Api {
            addr: served.addr,
            _served: served,
        }
    }

    /// One request (`Connection: close`).
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        self.request_with(method, path, &[], body)
    }

    /// One request with these headers besides `Host` and `Content-Length`.
    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut s = TcpStream::connect(self.addr).expect("connect to the API");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        // The server may answer (413) before it reads all of an oversized body.
        let _ = s.write_all(body);
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("an answer");
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no header end: {}", String::from_utf8_lossy(&raw)));
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .expect("a status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Reply {
            status,
            headers,
            body: raw[split + 4..].to_vec(),
        }
    }

    /// A request whose answer must be 200 with a JSON body.
    pub fn json(&self, method: &str, path: &str, body: Value) -> Value {
        let reply = self.request(method, path, body.to_string().as_bytes());
        assert_eq!(reply.status, 200, "{method} {path}: {}", reply.text());
        reply.json()
    }
}
