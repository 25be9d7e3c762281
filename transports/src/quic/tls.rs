//! TLS for the QUIC transport: TLS 1.3 only, mutual, bound to Ed25519 identities.
//!
//! Each endpoint presents its identity as an RFC 7250 raw public key: the Ed25519
//! SubjectPublicKeyInfo and nothing else. We chose raw public keys over a
//! self-signed certificate because an identity *is* a bare key here: there is no
//! issuer, name, validity period or extension that anyone would check, so an X.509
//! wrapper would only add a parser for bytes that carry no meaning (and a way to
//! get them subtly wrong). rustls supports raw public keys natively.
//!
//! The TLS verifiers accept any well-formed Ed25519 key and check the handshake
//! signature with it: that proves the peer holds the key. *Which* keys are welcome
//! (known, not revoked, the one that was dialed) is decided by the transport right
//! after the handshake, so that it can close the connection with a precise reason
//! that the other side receives, instead of a bare TLS alert.

use std::sync::Arc;

use conclave_actors::{Identity, NodeId};
use ed25519_dalek::pkcs8::{DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::VerifyingKey;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::AlwaysResolvesClientRawPublicKeys;
use rustls::crypto::{
    verify_tls13_signature_with_raw_key, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::AlwaysResolvesServerRawPublicKeys;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// Why TLS configuration could not be built from an identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The identity's key did not encode (not expected for a valid identity).
    #[error("identity key does not encode: {0}")]
    Encode(String),
    /// rustls or quinn refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Config(String),
}

/// The ALPN of node-to-node traffic at a wire version. A peer of another version
/// fails the handshake with `no_application_protocol`, which both sides report as
/// `protocol_version`.
pub fn alpn(version: u8) -> Vec<u8> {
    format!("conclave-node/{version}").into_bytes()
}

/// The ALPN of the client protocol (users talking to their node) at a version.
pub fn client_alpn(version: u8) -> Vec<u8> {
    format!("conclave-client/{version}").into_bytes()
}

/// The node id in an Ed25519 SubjectPublicKeyInfo, if it is one (and not a weak key).
pub fn node_id_from_spki(spki: &[u8]) -> Option<NodeId> {
    let key = VerifyingKey::from_public_key_der(spki).ok()?;
    (!key.is_weak()).then(|| NodeId(key.to_bytes()))
}

/// The peer's node id, from a connection whose handshake completed.
pub fn peer_node_id(conn: &quinn::Connection) -> Option<NodeId> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    match certs.as_slice() {
        [spki] => node_id_from_spki(spki),
        _ => None,
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The identity as rustls presents it: the SPKI as a raw public key, and the signer.
pub fn certified_key(
    identity: &Identity,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsSetupError> {
    let pkcs8 = identity
        .signing_key()
        .to_pkcs8_der()
        .map_err(|e| TlsSetupError::Encode(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec()));
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsSetupError::Config(e.to_string()))?;
    let spki = identity
        .signing_key()
        .verifying_key()
        .to_public_key_der()
        .map_err(|e| TlsSetupError::Encode(e.to_string()))?;
    // What peers will read back from the handshake must be this very identity.
    assert_eq!(
        node_id_from_spki(spki.as_bytes()),
        Some(identity.node_id()),
        "the presented key decodes to the identity"
    );
    Ok(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(spki.as_bytes().to_vec())],
        signer,
    )))
}

/// Accepts any well-formed Ed25519 raw public key and verifies handshake signatures
/// with it (see the module docs for why authorization happens later).
#[derive(Debug)]
struct IdentityVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl IdentityVerifier {
    fn check(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if intermediates.is_empty() && node_id_from_spki(end_entity).is_some() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding,
            ))
        }
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(cert.as_ref()),
            dss,
            &self.algorithms,
        )
    }
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Self::check(end_entity, intermediates).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is enabled; rustls never calls this.
        Err(rustls::Error::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for IdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Self::check(end_entity, intermediates).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// The rustls server side: TLS 1.3, client authentication mandatory, 0-RTT off.
pub fn server_crypto(
    key: Arc<CertifiedKey>,
    alpns: Vec<Vec<u8>>,
) -> Result<Arc<QuicServerConfig>, TlsSetupError> {
    let provider = provider();
    let verifier = Arc::new(IdentityVerifier {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(key)));
    tls.alpn_protocols = alpns;
    // 0-RTT data could be replayed; nothing here may be.
    tls.max_early_data_size = 0;
    // No session tickets: every connection authenticates from scratch, and peers
    // cannot link connections through tickets.
    tls.send_tls13_tickets = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsSetupError::Config(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// The rustls client side: TLS 1.3, presenting our identity, 0-RTT off.
pub fn client_crypto(
    key: Arc<CertifiedKey>,
    alpn: Vec<u8>,
) -> Result<Arc<QuicClientConfig>, TlsSetupError> {
    let provider = provider();
    let verifier = Arc::new(IdentityVerifier {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(AlwaysResolvesClientRawPublicKeys::new(key)));
    tls.alpn_protocols = vec![alpn];
    tls.enable_early_data = false;
    tls.resumption = rustls::client::Resumption::disabled();
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsSetupError::Config(e.to_string()))?;
    Ok(Arc::new(quic))
}

/// The rustls crypto provider used throughout (ring).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    provider()
}
