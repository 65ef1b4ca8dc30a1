//! TLS for both protocols: the server configuration (TLS 1.2 and 1.3 only,
//! session tickets on), PEM loading, the self-signed development certificate
//! kept in the data directory, and the client configurations used by the
//! admin client, the simulator and the tests (pinned to one certificate, or
//! trusting a CA file).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{anyhow, bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// A certificate chain and its private key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// SHA-256 of the end-entity certificate, as colon-separated hex.
    pub fn fingerprint(&self) -> String {
        self.chain
            .first()
            .map_or_else(String::new, |c| fingerprint(c))
    }
}

/// SHA-256 of a DER certificate, as colon-separated upper-case hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// aws-lc-rs, with AES-128-GCM/SHA-256 preferred: as strong as needed here
/// and cheaper per handshake than the SHA-384 suite, which matters when
/// every message is a connection of its own. Its key exchange groups are
/// its defaults: X25519 first, and the hybrid X25519MLKEM768 for clients
/// that prefer it (the server follows the client's order).
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        use rustls::CipherSuite::*;
        match suite.suite() {
            TLS13_AES_128_GCM_SHA256 => 0,
            TLS13_CHACHA20_POLY1305_SHA256 => 1,
            TLS13_AES_256_GCM_SHA384 => 2,
            _ => 3,
        }
    });
    Arc::new(provider)
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The server's certificate, replaceable while it runs (SIGHUP): new
/// handshakes get the new one, connections already open keep theirs.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<(Arc<CertifiedKey>, String)>,
}

impl CertStore {
    pub fn new(identity: Identity) -> Result<Arc<CertStore>> {
        let fingerprint = identity.fingerprint();
        Ok(Arc::new(CertStore {
            current: RwLock::new((Arc::new(certified_key(identity)?), fingerprint)),
        }))
    }

    /// Swaps in a new identity, checked first: on error the old one stays.
    pub fn replace(&self, identity: Identity) -> Result<String> {
        let fingerprint = identity.fingerprint();
        let key = Arc::new(certified_key(identity)?);
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        *current = (key, fingerprint.clone());
        Ok(fingerprint)
    }

    pub fn fingerprint(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .clone(),
        )
    }
}

/// Checks that key and certificate go together and makes the signing key.
fn certified_key(identity: Identity) -> Result<CertifiedKey> {
    let key = provider()
        .key_provider
        .load_private_key(identity.key)
        .context("the private key is not usable")?;
    let certified = CertifiedKey::new(identity.chain, key);
    certified
        .keys_match()
        .context("the private key does not belong to the certificate")?;
    Ok(certified)
}

/// The server's TLS configuration: TLS 1.2 and 1.3, session tickets and a
/// session cache so that repeated message streams resume cheaply.
pub fn server_config(certs: Arc<CertStore>) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().context("TLS ticketer")?;
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(16 * 1024);
    Ok(Arc::new(config))
}

/// Loads a PEM certificate chain and private key.
pub fn load_identity(cert: &Path, key: &Path) -> Result<Identity> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificates from {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading private key from {}", key.display()))?;
    Ok(Identity { chain, key })
}

/// Where the development certificate lives in a data directory.
pub fn dev_cert_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// The self-signed ECDSA P-256 certificate for `localhost`, `127.0.0.1`
/// and `::1`: created in the data directory on first use, reused after.
pub fn dev_identity(data_dir: &Path) -> Result<Identity> {
    let (cert_path, key_path) = dev_cert_paths(data_dir);
    if cert_path.exists() && key_path.exists() {
        return load_identity(&cert_path, &key_path);
    }
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| anyhow!("generating the development certificate: {e}"))?;
    let dir = cert_path.parent().unwrap_or(data_dir);
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_private(&key_path, generated.key_pair.serialize_pem().as_bytes())?;
    fs::write(&cert_path, generated.cert.pem())
        .with_context(|| format!("writing {}", cert_path.display()))?;
    log::info!(
        "created a self-signed certificate in {}",
        cert_path.display()
    );
    load_identity(&cert_path, &key_path)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// A client configuration that accepts exactly one server certificate
/// (the development certificate, or any self-signed one), checked byte for
/// byte; the handshake signatures are still verified.
pub fn pinned_client_config(cert: CertificateDer<'static>) -> Result<Arc<ClientConfig>> {
    pinned_client_config_for(cert, VERSIONS)
}

/// [`pinned_client_config`] offering only the given TLS versions.
pub fn pinned_client_config_for(
    cert: CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Arc<ClientConfig>> {
    pinned_config(Pin::Cert(cert), versions)
}

/// A client configuration that accepts exactly the server certificate whose
/// SHA-256 fingerprint is `fingerprint` (hex, colons and case optional, as
/// the server logs it at start); the handshake signatures are still
/// verified.
pub fn fingerprint_client_config(fingerprint: &str) -> Result<Arc<ClientConfig>> {
    pinned_config(Pin::Fingerprint(parse_fingerprint(fingerprint)?), VERSIONS)
}

/// `AB:CD:…` or `abcd…` → the 64 upper-case hex digits joined by colons,
/// as [`fingerprint`] writes them.
fn parse_fingerprint(text: &str) -> Result<String> {
    let digits: String = text
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("{text:?} is not a SHA-256 fingerprint (64 hex digits, colons optional)");
    }
    Ok(digits
        .as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).into_owned())
        .collect::<Vec<_>>()
        .join(":"))
}

fn pinned_config(
    pin: Pin,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Arc<ClientConfig>> {
    let provider = provider();
    let verifier = Arc::new(PinnedCert {
        pin,
        provider: provider.clone(),
    });
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A client configuration trusting the CA certificates in a PEM file.
pub fn ca_client_config(ca_pem: &Path) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem)
        .with_context(|| format!("reading {}", ca_pem.display()))?
    {
        roots
            .add(cert.with_context(|| format!("parsing {}", ca_pem.display()))?)
            .context("adding a trusted certificate")?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Pinned configuration for the certificate in a PEM file.
pub fn pinned_client_config_from_pem(cert_pem: &Path) -> Result<Arc<ClientConfig>> {
    let cert = CertificateDer::from_pem_file(cert_pem)
        .with_context(|| format!("reading {}", cert_pem.display()))?;
    pinned_client_config(cert)
}

/// What a pinned client accepts: one certificate, byte for byte, or any
/// certificate with one SHA-256 fingerprint (the same thing, given as text).
#[derive(Debug)]
enum Pin {
    Cert(CertificateDer<'static>),
    Fingerprint(String),
}

#[derive(Debug)]
struct PinnedCert {
    pin: Pin,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (matches, expected) = match &self.pin {
            Pin::Cert(cert) => (end_entity.as_ref() == cert.as_ref(), fingerprint(cert)),
            Pin::Fingerprint(expected) => (fingerprint(end_entity) == *expected, expected.clone()),
        };
        if matches {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate {} is not the expected {expected}",
                fingerprint(end_entity),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
