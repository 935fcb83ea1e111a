//! TLS 1.3 for a client's QUIC connection: how it trusts the server's certificate, and
//! its quinn config. (The server's half, its self-signed certificate and rustls server
//! config, is the `courier` crate's `tls` module.)
//!
//! ```text
//! trust_for_target(target, --ca, --allow-remote)
//!   ├─ ServerTrust::Pinned(cert DER the server wrote) ──┐
//!   └─ ServerTrust::InsecureLoopback (loopback only) ───┴─> client_config ──> quinn::ClientConfig
//! ```
//!
//! Invariants this module keeps:
//! - every config uses the aws-lc-rs provider explicitly; nothing depends on a
//!   process-wide default provider being installed;
//! - only TLS 1.3 is offered (QUIC requires it) and the ALPN is always [`wire::ALPN`];
//! - both trust modes check the server's handshake signature with the provider's
//!   algorithms, so even the insecure one proves the peer holds the key of the
//!   certificate it showed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use courier_pipeline::wire;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// Re-exported so that users of this module need no direct rustls dependency.
pub use rustls::pki_types::CertificateDer;

/// Receive window per stream the client advertises: large, so a server answering
/// many ACKs on one stream is never held back by the client.
pub const CLIENT_STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 << 20;
/// Receive window for the whole connection the client advertises.
pub const CLIENT_RECEIVE_WINDOW_BYTES: u32 = 16 << 20;
/// Bytes the client may have in flight unacknowledged on one connection.
pub const CLIENT_SEND_WINDOW_BYTES: u64 = 16 << 20;
/// Smallest datagram the client starts with; MTU discovery raises it.
pub const CLIENT_INITIAL_MTU_BYTES: u16 = courier_pipeline::server::MTU_MIN;
/// A connection with no traffic for this long is closed by the client.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

const _: () = assert!(CLIENT_STREAM_RECEIVE_WINDOW_BYTES <= CLIENT_RECEIVE_WINDOW_BYTES);

/// How a client decides to trust the server's certificate.
#[derive(Clone)]
pub enum ServerTrust {
    /// Accept exactly this certificate (the DER the server wrote to its file), nothing
    /// else. The server name is not checked: the pin is stronger than a name.
    Pinned(CertificateDer<'static>),
    /// Loopback testing only: accept any certificate. The handshake signature is still
    /// checked, but nothing ties the key to a server you chose, so anyone on the path can
    /// impersonate the server. Never use it for a target that is not a loopback address.
    InsecureLoopback,
}

impl std::fmt::Debug for ServerTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerTrust::Pinned(c) => write!(f, "Pinned(<{} byte certificate>)", c.len()),
            ServerTrust::InsecureLoopback => f.write_str("InsecureLoopback"),
        }
    }
}

/// Why [`trust_for_target`] refused to choose a trust mode.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The target is not a loopback address and remote targets were not allowed.
    #[error("the target {0} is not a loopback address; pass --allow-remote (with --ca CERT.der)")]
    RemoteNotAllowed(SocketAddr),
    /// A remote target without a certificate to pin.
    #[error("a remote target needs --ca CERT.der to pin its certificate")]
    RemoteNeedsPin,
    /// The certificate file could not be read.
    #[error("reading the server certificate {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate file is PEM; the server writes DER.
    #[error("{0} is PEM; --ca expects the DER file the server wrote (DATA_DIR/tls/cert.der)")]
    Pem(PathBuf),
}

/// The clients' trust decision (`courier send`, `courier-loadgen`): pin the DER
/// certificate at `ca` when given (the server writes it to `DATA_DIR/tls/cert.der`);
/// without one, skip certificate checks, which is allowed for loopback targets only.
/// A target that is not loopback also needs `allow_remote`.
pub fn trust_for_target(
    target: SocketAddr,
    ca: Option<&Path>,
    allow_remote: bool,
) -> Result<ServerTrust, TrustError> {
    let loopback = target.ip().is_loopback();
    if !loopback && !allow_remote {
        return Err(TrustError::RemoteNotAllowed(target));
    }
    match ca {
        Some(path) => {
            let der = std::fs::read(path).map_err(|source| TrustError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            if der.starts_with(b"-----BEGIN") {
                return Err(TrustError::Pem(path.to_path_buf()));
            }
            Ok(ServerTrust::Pinned(CertificateDer::from(der)))
        }
        None if loopback => Ok(ServerTrust::InsecureLoopback),
        None => Err(TrustError::RemoteNeedsPin),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The client's rustls config for `trust`: TLS 1.3 only, ALPN `courier/1`.
pub fn client_crypto(trust: &ServerTrust) -> rustls::ClientConfig {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = Arc::new(TrustVerifier {
        trust: trust.clone(),
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("aws-lc-rs supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![wire::ALPN.to_vec()];
    config
}

/// The client's quinn config: [`client_crypto`] plus the client transport tuning (large
/// receive windows, no server-opened streams, no keep-alive, MTU discovery from 1200).
pub fn client_config(trust: &ServerTrust) -> quinn::ClientConfig {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_crypto(trust))
        .expect("TLS 1.3 config with aws-lc-rs has the QUIC initial cipher suite");
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(client_transport()));
    config
}

fn client_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(CLIENT_STREAM_RECEIVE_WINDOW_BYTES.into())
        .receive_window(CLIENT_RECEIVE_WINDOW_BYTES.into())
        .send_window(CLIENT_SEND_WINDOW_BYTES)
        // The server never opens streams towards a client.
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .keep_alive_interval(None)
        .max_idle_timeout(Some(
            CLIENT_IDLE_TIMEOUT
                .try_into()
                .expect("idle timeout fits a VarInt"),
        ))
        .initial_mtu(CLIENT_INITIAL_MTU_BYTES)
        .mtu_discovery_config(Some(quinn::MtuDiscoveryConfig::default()));
    t
}

/// Checks the server's certificate as `trust` says: exactly one certificate, byte for
/// byte ([`ServerTrust::Pinned`]), or any certificate ([`ServerTrust::InsecureLoopback`],
/// unsafe for anything but loopback). Either way the peer must have signed the handshake
/// with its certificate's key.
#[derive(Debug)]
struct TrustVerifier {
    trust: ServerTrust,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for TrustVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.trust {
            ServerTrust::InsecureLoopback => Ok(ServerCertVerified::assertion()),
            // A certificate is public, so a plain comparison leaks nothing.
            ServerTrust::Pinned(cert) if end_entity.as_ref() == cert.as_ref() => {
                Ok(ServerCertVerified::assertion())
            }
            ServerTrust::Pinned(_) => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway certificate (the server's own comes from the `courier` crate).
    fn self_signed(names: &[String]) -> (CertificateDer<'static>, ()) {
        let certified = rcgen::generate_simple_self_signed(names.to_vec()).unwrap();
        (certified.cert.der().clone(), ())
    }

    #[test]
    fn client_config_speaks_courier_alpn_tls13_only() {
        let (cert, _) = self_signed(&["localhost".to_string()]);
        let client = client_crypto(&ServerTrust::Pinned(cert));
        assert_eq!(client.alpn_protocols, vec![b"courier/1".to_vec()]);
        // The QUIC wrapper accepts it (it requires TLS 1.3 and the initial suite).
        quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap();
    }

    #[test]
    fn pinned_verifier_accepts_only_the_pinned_certificate() {
        let (a, _) = self_signed(&["localhost".to_string()]);
        let (b, _) = self_signed(&["localhost".to_string()]);
        let v = TrustVerifier {
            trust: ServerTrust::Pinned(a.clone()),
            provider: provider(),
        };
        let name = ServerName::try_from("localhost").unwrap();
        assert!(v
            .verify_server_cert(&a, &[], &name, &[], UnixTime::now())
            .is_ok());
        assert!(v
            .verify_server_cert(&b, &[], &name, &[], UnixTime::now())
            .is_err());
    }

    #[test]
    fn trust_needs_loopback_or_allow_remote_and_a_pin_for_remote() {
        let local: SocketAddr = "127.0.0.1:7443".parse().unwrap();
        let remote: SocketAddr = "192.0.2.1:7443".parse().unwrap();
        assert!(matches!(
            trust_for_target(local, None, false),
            Ok(ServerTrust::InsecureLoopback)
        ));
        assert!(matches!(
            trust_for_target(remote, None, false),
            Err(TrustError::RemoteNotAllowed(_))
        ));
        assert!(matches!(
            trust_for_target(remote, None, true),
            Err(TrustError::RemoteNeedsPin)
        ));
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = self_signed(&["localhost".to_string()]);
        let der = dir.path().join("cert.der");
        std::fs::write(&der, cert.as_ref()).unwrap();
        match trust_for_target(remote, Some(&der), true) {
            Ok(ServerTrust::Pinned(c)) => assert_eq!(c.as_ref(), cert.as_ref()),
            other => panic!("expected a pin, got {other:?}"),
        }
        let pem = dir.path().join("cert.pem");
        std::fs::write(&pem, "-----BEGIN CERTIFICATE-----\n").unwrap();
        assert!(matches!(
            trust_for_target(local, Some(&pem), false),
            Err(TrustError::Pem(_))
        ));
        assert!(matches!(
            trust_for_target(local, Some(&dir.path().join("missing.der")), false),
            Err(TrustError::Read { .. })
        ));
    }

    #[test]
    fn debug_does_not_dump_the_certificate() {
        let (a, _) = self_signed(&["localhost".to_string()]);
        let s = format!("{:?}", ServerTrust::Pinned(a));
        assert!(s.starts_with("Pinned(<") && s.len() < 40, "{s}");
    }
}
