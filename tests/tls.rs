//! TLS: both 1.2 and 1.3 are served, sessions resume, the client pins the
//! certificate, and `--cert/--key` replace the development certificate.

mod common;

use common::*;
use csm::client::{ClientError, Connector, SessionClient};
use rustls::HandshakeKind;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

fn cert_of(dir: &std::path::Path) -> CertificateDer<'static> {
    let (cert, _) = csm::tls::dev_cert_paths(dir);
    CertificateDer::from_pem_file(cert).unwrap()
}

#[tokio::test]
async fn tls12_and_tls13_are_both_served() {
    let server = TestServer::start();
    server.add_user("alice", &password_of("alice"));
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let config =
            csm::tls::pinned_client_config_for(cert_of(&server.data_dir), &[version]).unwrap();
        let connector = Connector::new(config);
        let stream = connector.connect(server.session_addr).await.unwrap();
        assert_eq!(stream.get_ref().1.protocol_version(), Some(expected));
        drop(stream);
        SessionClient::login(
            &connector,
            server.session_addr,
            "alice",
            &password_of("alice"),
        )
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn repeated_message_streams_resume_the_tls_session() {
    let server = TestServer::start();
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let mut stream = server.connector.connect(server.message_addr).await.unwrap();
        // TLS 1.3 tickets arrive after the handshake: read until the close.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream.write_all(b"x\ny\nz\nfetch\n").await.unwrap();
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
        kinds.push(stream.get_ref().1.handshake_kind());
    }
    assert_eq!(kinds[0], Some(HandshakeKind::Full));
    assert_eq!(kinds[2], Some(HandshakeKind::Resumed), "{kinds:?}");
}

#[tokio::test]
async fn a_client_pinned_to_another_certificate_refuses_the_server() {
    let server = TestServer::start();
    let other = tempfile::tempdir().unwrap();
    csm::tls::dev_identity(other.path()).unwrap();
    let connector = Connector::for_data_dir(other.path()).unwrap();
    assert!(matches!(
        connector.connect(server.session_addr).await,
        Err(ClientError::Io(_))
    ));
}

#[tokio::test]
async fn cert_and_key_files_replace_the_development_certificate() {
    let issued = tempfile::tempdir().unwrap();
    csm::tls::dev_identity(issued.path()).unwrap();
    let (cert, key) = csm::tls::dev_cert_paths(issued.path());
    let server = TestServer::start_with(|c| {
        c.cert = Some(cert.clone());
        c.key = Some(key.clone());
    });
    assert!(
        !csm::tls::dev_cert_paths(&server.data_dir).0.exists(),
        "no development certificate made"
    );
    let connector = Connector::for_data_dir(issued.path()).unwrap();
    SessionClient::connect(&connector, server.session_addr)
        .await
        .unwrap();
}

/// The binary reloads `--cert/--key` on SIGHUP; new connections get the new
/// certificate, and a broken file keeps the old one.
#[tokio::test]
async fn sighup_reloads_the_certificate_and_keeps_it_when_broken() {
    use std::process::{Command, Stdio};
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    csm::tls::dev_identity(first.path()).unwrap();
    csm::tls::dev_identity(second.path()).unwrap();
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("cert.pem"), live.path().join("key.pem"));
    let install = |from: &std::path::Path| {
        let (c, k) = csm::tls::dev_cert_paths(from);
        std::fs::copy(c, &cert).unwrap();
        std::fs::copy(k, &key).unwrap();
    };
    install(first.path());
    let (session_addr, message_addr) = (free_addr(), free_addr());
    let data = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_csm"))
        .arg("serve")
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "--session-addr",
            &session_addr.to_string(),
            "--message-addr",
            &message_addr.to_string(),
        ])
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !data.path().join("admin.sock").exists() {
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pinned_first = Connector::for_data_dir(first.path()).unwrap();
    let pinned_second = Connector::for_data_dir(second.path()).unwrap();
    assert!(pinned_first.connect(session_addr).await.is_ok());

    install(second.path());
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let mut reloaded = false;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if pinned_second.connect(session_addr).await.is_ok() {
            reloaded = true;
            break;
        }
    }
    assert!(reloaded, "new connections get the new certificate");
    assert!(pinned_first.connect(session_addr).await.is_err());

    std::fs::write(&cert, "not a certificate").unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        pinned_second.connect(message_addr).await.is_ok(),
        "a broken file keeps the current certificate"
    );

    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("certificate reloaded"), "{log}");
    assert!(log.contains("keeping the current certificate"), "{log}");
}

/// A client that prefers the hybrid post-quantum key exchange gets it;
/// csm's own clients offer X25519 first and get that (PROTOCOL.md).
#[tokio::test]
async fn the_clients_preferred_key_exchange_is_taken_hybrid_post_quantum_included() {
    use rustls::crypto::aws_lc_rs::{default_provider, kx_group};
    let server = TestServer::start();

    let own = server.connector.connect(server.message_addr).await.unwrap();
    let group = own.get_ref().1.negotiated_key_exchange_group().unwrap();
    assert_eq!(group.name(), rustls::NamedGroup::X25519);

    let mut provider = default_provider();
    provider.kx_groups = vec![kx_group::X25519MLKEM768, kx_group::X25519];
    // The development certificate is its own issuer: trusted as a root, it
    // verifies through the ordinary path, signatures and name included.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_of(&server.data_dir)).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = Connector::new(std::sync::Arc::new(config));
    let hybrid = connector.connect(server.message_addr).await.unwrap();
    let group = hybrid.get_ref().1.negotiated_key_exchange_group().unwrap();
    assert_eq!(group.name(), rustls::NamedGroup::X25519MLKEM768);
}

/// The contract's development certificate: ECDSA P-256, for `localhost`,
/// `127.0.0.1` and `::1`, and for no other name.
#[tokio::test]
async fn the_development_certificate_is_ecdsa_p256_for_localhost_and_both_loopbacks() {
    use rustls_pki_types::{PrivateKeyDer, ServerName};
    let server = TestServer::start();
    let (cert, key) = csm::tls::dev_cert_paths(&server.data_dir);
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        key.secret_der(),
    )
    .expect("a P-256 key");

    // Trusted as a CA of its own, the certificate's names are checked.
    let config = csm::tls::ca_client_config(&cert).unwrap();
    for name in ["localhost", "127.0.0.1", "::1", "example.com"] {
        let connector = Connector::named(
            config.clone(),
            ServerName::try_from(name.to_owned()).unwrap(),
        );
        let verified = connector.connect(server.session_addr).await.is_ok();
        assert_eq!(verified, name != "example.com", "{name}");
    }
}
