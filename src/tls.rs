//! TLS 1.3 for the server's QUIC endpoint: its self-signed certificate and its rustls
//! config. (The client's half, trust modes and quinn client config, is
//! `courier_client::tls`.)
//!
//! ```text
//! self_signed(names) ──> (cert DER, key) ──> server_crypto ──> rustls::ServerConfig
//!   └─ cert DER written to DATA_DIR/tls/cert.der, which clients pin
//!                                      (wrapped by the server into QuicServerConfig)
//! ```
//!
//! Invariants this module keeps:
//! - the config uses the aws-lc-rs provider explicitly; nothing depends on a
//!   process-wide default provider being installed;
//! - only TLS 1.3 is accepted (QUIC requires it) and the ALPN is always [`wire::ALPN`].

use std::sync::Arc;

use courier_pipeline::wire;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::PrivatePkcs8KeyDer;

/// Re-exported so that users of this module need no direct rustls dependency.
pub use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A self-signed certificate for `names` (DNS names or IP addresses) and its PKCS#8 key.
///
/// # Panics
/// If rcgen refuses a name (one that is neither an IP address nor ASCII); names come
/// from the server's configuration, so use [`try_self_signed`] for untrusted input.
pub fn self_signed(names: &[String]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    try_self_signed(names).expect("rcgen refused the certificate names")
}

/// [`self_signed`], returning rcgen's error instead of panicking.
pub fn try_self_signed(
    names: &[String],
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), rcgen::Error> {
    let certified = rcgen::generate_simple_self_signed(names.to_vec())?;
    let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    Ok((certified.cert.der().clone(), PrivateKeyDer::Pkcs8(key)))
}

/// The server's rustls config: TLS 1.3 only, ALPN `courier/1`, no client certificates.
/// Wrap it with `quinn_proto::crypto::rustls::QuicServerConfig::try_from`.
///
/// # Panics
/// If the key does not belong to the certificate or the provider cannot load it; a pair
/// from [`self_signed`] always loads. Use [`try_server_crypto`] for keys read from disk.
pub fn server_crypto(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> rustls::ServerConfig {
    try_server_crypto(cert, key).expect("server certificate and key do not load")
}

/// [`server_crypto`], returning rustls's error instead of panicking.
pub fn try_server_crypto(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    config.alpn_protocols = vec![wire::ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_client::tls::{client_crypto, ServerTrust};

    #[test]
    fn server_and_client_configs_speak_courier_alpn_tls13_only() {
        let (cert, key) = self_signed(&["localhost".to_string()]);
        let server = server_crypto(cert.clone(), key);
        assert_eq!(server.alpn_protocols, vec![b"courier/1".to_vec()]);
        let client = client_crypto(&ServerTrust::Pinned(cert));
        assert_eq!(client.alpn_protocols, vec![b"courier/1".to_vec()]);
        // QUIC wrappers accept both (they require TLS 1.3 and the initial suite).
        quinn_proto::crypto::rustls::QuicServerConfig::try_from(server).unwrap();
        quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap();
    }

    #[test]
    fn mismatched_key_is_an_error_not_a_panic() {
        let (a, _) = self_signed(&["localhost".to_string()]);
        let (_, kb) = self_signed(&["localhost".to_string()]);
        assert!(try_server_crypto(a, kb).is_err());
    }
}
