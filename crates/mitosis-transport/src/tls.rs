//! Optional mutual TLS 1.3 for the page protocol (`mitosisd --tls-cert --tls-key --tls-ca`),
//! for networks that are not trusted.
//!
//! Every daemon holds one certificate and trusts one CA: as a server it requires a client
//! certificate chaining to the CA, as a client it requires the server's certificate to chain
//! to the CA and to name the IP address it dialed (an IP SAN: hosts are addressed by IP). The
//! page protocol runs unchanged inside, MAC-sealed requests included.
//!
//! Before the handshake a TLS server sends [`ANNOUNCEMENT`] in clear, so that a peer without
//! TLS (or a TLS peer reaching a plain server) stops with an error that says so instead of a
//! timeout or a garbled handshake. It carries nothing secret and decides nothing: which side
//! uses TLS is each daemon's configuration, never negotiated, so it cannot be downgraded.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// What a TLS page server sends first, in clear: a frame of `b"MTLS"` and the page protocol
/// version (u32 LE), laid out like the plain hello so that any peer can read it.
pub const ANNOUNCEMENT: [u8; 12] = {
    let mut out = [0u8; 12];
    let len = 8u32.to_le_bytes();
    let version = crate::peer::PROTOCOL_VERSION.to_le_bytes();
    let mut i = 0;
    while i < 4 {
        out[i] = len[i];
        out[4 + i] = crate::peer::TLS_MAGIC[i];
        out[8 + i] = version[i];
        i += 1;
    }
    out
};

/// The three flags, for errors.
pub const CERT_FLAG: &str = "--tls-cert";
pub const KEY_FLAG: &str = "--tls-key";
pub const CA_FLAG: &str = "--tls-ca";

/// Why the TLS files could not be used; each names the flag and the file.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("--tls-cert, --tls-key and --tls-ca go together: {missing} missing")]
    Partial { missing: String },
    #[error("{flag} {}: cannot read it: {err}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error("{flag} {}: {why}", path.display())]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        why: String,
    },
}

/// A daemon's TLS configuration: its certificate and key, and the CA its peers' certificates
/// must chain to. Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls { .. }")
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl Tls {
    /// From the three flags: all of them (TLS), or none (plain TCP, `None`).
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Option<Tls>, TlsError> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Tls::load(cert, key, ca).map(Some),
            _ => {
                let missing: Vec<&str> = [(cert, CERT_FLAG), (key, KEY_FLAG), (ca, CA_FLAG)]
                    .into_iter()
                    .filter(|(given, _)| given.is_none())
                    .map(|(_, flag)| flag)
                    .collect();
                Err(TlsError::Partial {
                    missing: missing.join(" and "),
                })
            }
        }
    }

    /// Reads the PEM files: `cert` (this host's certificate, then any intermediates), `key`
    /// (its private key: PKCS#8, PKCS#1 or SEC1) and `ca` (the certificates peers chain to).
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Tls, TlsError> {
        let read = |flag, path: &Path| {
            std::fs::read(path).map_err(|err| TlsError::Read {
                flag,
                path: path.to_owned(),
                err,
            })
        };
        let invalid = |flag, path: &Path, why: String| TlsError::Invalid {
            flag,
            path: path.to_owned(),
            why,
        };
        let certs = |flag, path: &Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let pem = read(flag, path)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(flag, path, format!("not a PEM file: {e}")))?;
            if certs.is_empty() {
                return Err(invalid(flag, path, "no certificate in it".into()));
            }
            Ok(certs)
        };
        let chain = certs(CERT_FLAG, cert)?;
        let private = PrivateKeyDer::from_pem_slice(&read(KEY_FLAG, key)?)
            .map_err(|e| invalid(KEY_FLAG, key, format!("no private key in it: {e}")))?;
        let mut roots = RootCertStore::empty();
        for c in certs(CA_FLAG, ca)? {
            roots
                .add(c)
                .map_err(|e| invalid(CA_FLAG, ca, format!("not a usable CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let provider = provider();
        let tls13 = &[&rustls::version::TLS13];
        // A peer must present a certificate chaining to the CA (no anonymous clients).
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| invalid(CA_FLAG, ca, format!("{e:?}")))?;
        let key_error = |e: rustls::Error| {
            invalid(
                KEY_FLAG,
                key,
                format!("does not go with {}: {e}", cert.display()),
            )
        };
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(tls13)
            .expect("aws-lc-rs supports TLS 1.3")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), private.clone_key())
            .map_err(key_error)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(tls13)
            .expect("aws-lc-rs supports TLS 1.3")
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private)
            .map_err(key_error)?;
        Ok(Tls {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// The server side of a connection (the page server).
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.server.clone())
    }

    /// The client side (the peer pool).
    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.client.clone())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) struct Files {
        pub(crate) dir: PathBuf,
    }

    impl Files {
        pub(crate) fn new(tag: &str) -> Files {
            let dir =
                std::env::temp_dir().join(format!("mitosis-tls-unit-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Files { dir }
        }

        pub(crate) fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A CA of the test's own.
    pub(crate) fn ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, name);
        rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap()
    }

    /// A certificate for `ip` signed by `ca`, and its key (PEM).
    pub(crate) fn host(
        ca: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
        ip: &str,
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut host = rcgen::CertificateParams::new(vec![ip.to_string()]).unwrap();
        host.distinguished_name
            .push(rcgen::DnType::CommonName, format!("host {ip}"));
        (host.signed_by(&key, ca).unwrap().pem(), key.serialize_pem())
    }

    /// The configuration of a host at `ip` with a certificate from `issuer`, trusting `trust`.
    pub(crate) fn tls(
        files: &Files,
        name: &str,
        issuer: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
        ip: &str,
        trust: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    ) -> Tls {
        let (cert, key) = host(issuer, ip);
        Tls::load(
            &files.write(&format!("{name}.crt"), &cert),
            &files.write(&format!("{name}.key"), &key),
            &files.write(&format!("{name}-ca.crt"), &trust.pem()),
        )
        .unwrap()
    }

    /// A CA, and a host certificate and key it signed for 127.0.0.1 (PEM).
    fn pki() -> (String, String, String) {
        let ca = ca("unit test CA");
        let (cert, key) = host(&ca, "127.0.0.1");
        (cert, key, ca.pem())
    }

    #[test]
    fn all_three_files_or_none() {
        assert!(Tls::from_flags(None, None, None).unwrap().is_none());
        let p = Path::new("/x");
        let err = Tls::from_flags(Some(p), None, Some(p)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--tls-cert, --tls-key and --tls-ca go together: --tls-key missing"
        );
        let err = Tls::from_flags(None, None, Some(p)).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("--tls-cert and --tls-key missing"),
            "{err}"
        );
    }

    #[test]
    fn each_bad_file_is_named_with_its_flag() {
        let files = Files::new("errors");
        let (cert, key, ca) = pki();
        let (cert, key, ca) = (
            files.write("host.crt", &cert),
            files.write("host.key", &key),
            files.write("ca.crt", &ca),
        );
        assert!(
            Tls::from_flags(Some(&cert), Some(&key), Some(&ca))
                .unwrap()
                .is_some()
        );

        let missing = files.dir.join("nope.pem");
        let err = Tls::load(&cert, &missing, &ca).unwrap_err();
        assert!(
            matches!(err, TlsError::Read { flag: KEY_FLAG, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with(&format!("--tls-key {}: cannot read it", missing.display())),
            "{err}"
        );

        let garbage = files.write("garbage.pem", "hello\n");
        for (c, k, a, flag) in [
            (&garbage, &key, &ca, CERT_FLAG),
            (&cert, &garbage, &ca, KEY_FLAG),
            (&cert, &key, &garbage, CA_FLAG),
            // A certificate where the key should be, and the other way round.
            (&cert, &cert, &ca, KEY_FLAG),
            (&key, &key, &ca, CERT_FLAG),
        ] {
            let err = Tls::load(c, k, a).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, TlsError::Invalid { flag: f, .. } if f == flag),
                "{text}"
            );
            assert!(text.starts_with(flag) && !text.contains('\n'), "{text}");
        }

        let broken = files.write(
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        );
        let err = Tls::load(&broken, &key, &ca).unwrap_err();
        assert!(err.to_string().contains("not a PEM file"), "{err}");

        // Another host's key does not go with this certificate.
        let (_, other_key, _) = pki();
        let other_key = files.write("other.key", &other_key);
        let err = Tls::load(&cert, &other_key, &ca).unwrap_err();
        assert!(
            matches!(err, TlsError::Invalid { flag: KEY_FLAG, .. })
                && err.to_string().contains("does not go with"),
            "{err}"
        );
    }
}
