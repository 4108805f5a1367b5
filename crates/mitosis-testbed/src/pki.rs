//! Throwaway certificates for daemons with mutual TLS (`mitosisd --tls-cert --tls-key
//! --tls-ca`): a CA made at run time, and host certificates it signs for testbed addresses.
//! For tests and benchmarks only: the keys are written unencrypted into a scratch directory.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::error::{Result, TestbedError};

fn failed(what: &str, err: impl std::fmt::Display) -> TestbedError {
    TestbedError::io(what, std::io::Error::other(err.to_string()))
}

/// A certificate authority of this run.
pub struct TestCa {
    name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A new CA (a fresh key) named `name`.
    ///
    /// # Errors
    ///
    /// If the key or certificate cannot be made.
    pub fn new(name: &str) -> Result<TestCa> {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| failed("CA parameters", e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(|e| failed("CA key", e))?;
        let issuer =
            CertifiedIssuer::self_signed(params, key).map_err(|e| failed("CA certificate", e))?;
        Ok(TestCa {
            name: name.to_owned(),
            issuer,
        })
    }

    /// The CA's certificate (PEM).
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate and key (PEM) for a host reached at `addr`, for both TLS roles.
    ///
    /// # Errors
    ///
    /// If they cannot be made.
    pub fn host(&self, addr: IpAddr) -> Result<(String, String)> {
        let mut params = CertificateParams::new(vec![addr.to_string()])
            .map_err(|e| failed("host certificate parameters", e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{} host {addr}", self.name));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().map_err(|e| failed("host key", e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| failed("host certificate", e))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes the CA as `DIR/ca.crt` and, for each address, `DIR/host{i}.crt` and
    /// `DIR/host{i}.key` (`i` its position): the files [`daemon_args`] names.
    ///
    /// # Errors
    ///
    /// If a certificate cannot be made or a file written.
    pub fn write_hosts(&self, dir: &Path, addrs: &[IpAddr]) -> Result<()> {
        write(&dir.join("ca.crt"), &self.pem())?;
        for (i, addr) in addrs.iter().enumerate() {
            let (cert, key) = self.host(*addr)?;
            write(&dir.join(format!("host{i}.crt")), &cert)?;
            write(&dir.join(format!("host{i}.key")), &key)?;
        }
        Ok(())
    }
}

/// Writes `text` to `path`, readable by its owner only (keys among them).
///
/// # Errors
///
/// If the file cannot be written.
pub fn write(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let context = || format!("writing {}", path.display());
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| TestbedError::io(context(), e))
}

/// The daemon arguments for [`DaemonConfig::extra_args`](crate::DaemonConfig) that give
/// each host the files [`TestCa::write_hosts`] wrote into `dir` (`{index}` is the host's).
pub fn daemon_args(dir: &Path) -> Vec<String> {
    let file = |name: &str| -> String {
        let path: PathBuf = dir.join(name);
        path.to_string_lossy().into_owned()
    };
    vec![
        "--tls-cert".into(),
        file("host{index}.crt"),
        "--tls-key".into(),
        file("host{index}.key"),
        "--tls-ca".into(),
        file("ca.crt"),
    ]
}
