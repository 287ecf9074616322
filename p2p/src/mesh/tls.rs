//! Transport security for the mesh: libp2p's TLS 1.3 handshake (`/tls/1.0.0`, the libp2p
//! TLS specification) with AES-GCM preferred over ChaCha20-Poly1305.
//!
//! Each end presents a self-signed certificate that carries its libp2p public key and a
//! signature of the certificate key by it (`libp2p_tls::certificate`); the handshake
//! proves possession of both, so the connection's peer id is authenticated exactly as
//! with noise. What differs from `libp2p-tls`'s own upgrade is only the cipher suite
//! order: on processors with AES instructions AES-128-GCM costs a fraction of
//! ChaCha20-Poly1305 per byte, and chunk traffic is almost all bytes. The host offers
//! this upgrade first and noise second, so agents that speak only noise still connect.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use futures::{AsyncRead, AsyncWrite, FutureExt, future::BoxFuture};
use futures_rustls::TlsStream;
use libp2p::PeerId;
use libp2p::core::{
    UpgradeInfo,
    upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade},
};
use libp2p::identity::Keypair;
use libp2p_tls::certificate;
use rustls::{
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, OtherError,
    SignatureScheme, SupportedCipherSuite,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{
        CryptoProvider,
        ring::{
            cipher_suite::{
                TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
            },
            default_provider,
        },
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ClientHello, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

/// The protocol name negotiated before the handshake (the libp2p TLS specification's).
pub const PROTOCOL: &str = "/tls/1.0.0";

/// ALPN of libp2p TLS handshakes.
const ALPN: &[u8] = b"libp2p";

/// TLS 1.3 suites, cheapest first on processors with AES instructions.
const CIPHER_SUITES: &[SupportedCipherSuite] = &[
    TLS13_AES_128_GCM_SHA256,
    TLS13_AES_256_GCM_SHA384,
    TLS13_CHACHA20_POLY1305_SHA256,
];

/// Why a TLS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// This host's certificate could not be made.
    #[error("making the TLS certificate: {0}")]
    Certificate(String),
    /// The handshake failed (I/O, protocol, or the peer's certificate was refused).
    #[error("TLS handshake: {0}")]
    Handshake(#[source] std::io::Error),
    /// The peer's certificate does not carry a valid libp2p key.
    #[error("peer certificate: {0}")]
    PeerCertificate(String),
}

/// The security upgrade: one certificate for this host's key, a client and a server
/// configuration (cheap to clone).
#[derive(Clone)]
pub struct Config {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config").finish_non_exhaustive()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: CIPHER_SUITES.to_vec(),
        ..default_provider()
    })
}

impl Config {
    /// A configuration presenting a certificate bound to `keypair`.
    pub fn new(keypair: &Keypair) -> Result<Self, TlsError> {
        let make = |e: &dyn std::fmt::Display| TlsError::Certificate(e.to_string());
        let (cert, key) = certificate::generate(keypair).map_err(|e| make(&e))?;
        // Presented as is: rustls's own certificate checks would refuse the libp2p
        // extension, which is critical.
        let signer = rustls::crypto::ring::sign::any_ecdsa_type(&key).map_err(|e| make(&e))?;
        let own = Arc::new(OwnCertificate(Arc::new(CertifiedKey::new(
            vec![cert],
            signer,
        ))));
        let verifier = Arc::new(PeerCertificate);

        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| make(&e))?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(own.clone());
        server.alpn_protocols = vec![ALPN.to_vec()];
        // Our order, not the client's: a peer that prefers ChaCha20 still gets AES-GCM.
        server.ignore_client_order = true;

        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| make(&e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(own);
        client.alpn_protocols = vec![ALPN.to_vec()];

        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = std::iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once(PROTOCOL)
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            let stream = futures_rustls::TlsAcceptor::from(self.server)
                .accept(socket)
                .await
                .map_err(TlsError::Handshake)?;
            let peer = peer_of(stream.get_ref().1)?;
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, TlsStream<C>);
    type Error = TlsError;
    type Future = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, socket: C, _: Self::Info) -> Self::Future {
        async move {
            // The specification: no server name indication (an unspecified address
            // turns it off). Which peer was meant is checked by the swarm against the
            // peer id this handshake authenticates.
            let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
            let stream = futures_rustls::TlsConnector::from(self.client)
                .connect(name, socket)
                .await
                .map_err(TlsError::Handshake)?;
            let peer = peer_of(stream.get_ref().1)?;
            Ok((peer, stream.into()))
        }
        .boxed()
    }
}

/// This host's one certificate, presented to every peer (as server and as client).
#[derive(Debug)]
struct OwnCertificate(Arc<CertifiedKey>);

impl ResolvesServerCert for OwnCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for OwnCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The peer id of the one certificate the peer presented (already verified).
fn peer_of(state: &CommonState) -> Result<PeerId, TlsError> {
    let Some([cert]) = state.peer_certificates() else {
        return Err(TlsError::PeerCertificate(
            "expected exactly one certificate".into(),
        ));
    };
    certificate::parse(cert)
        .map(|c| c.peer_id())
        .map_err(|e| TlsError::PeerCertificate(e.to_string()))
}

/// Accepts exactly one self-signed certificate with a valid libp2p extension (the
/// libp2p TLS specification's rules), for both ends of the handshake.
#[derive(Debug)]
struct PeerCertificate;

fn refused(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

fn check_chain(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(), rustls::Error> {
    if !intermediates.is_empty() {
        return Err(rustls::Error::General(
            "a libp2p peer presents exactly one certificate".into(),
        ));
    }
    certificate::parse(end_entity).map_err(refused)?;
    Ok(())
}

fn check_signature(
    cert: &CertificateDer<'_>,
    message: &[u8],
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    certificate::parse(cert)
        .map_err(refused)?
        .verify_signature(dss.scheme, message, dss.signature())
        .map_err(refused)?;
    Ok(HandshakeSignatureValid::assertion())
}

/// Signature schemes `libp2p_tls::certificate` verifies with `ring`.
fn schemes() -> Vec<SignatureScheme> {
    vec![
        SignatureScheme::ECDSA_NISTP384_SHA384,
        SignatureScheme::ECDSA_NISTP256_SHA256,
        SignatureScheme::ED25519,
        SignatureScheme::RSA_PSS_SHA512,
        SignatureScheme::RSA_PSS_SHA384,
        SignatureScheme::RSA_PSS_SHA256,
        SignatureScheme::RSA_PKCS1_SHA512,
        SignatureScheme::RSA_PKCS1_SHA384,
        SignatureScheme::RSA_PKCS1_SHA256,
    ]
}

/// The handshake-signature half of a verifier, the same for both ends.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            // TLS 1.2 is never negotiated (the configurations allow TLS 1.3 only):
            // refuse rather than trust if a future rustls asked anyway.
            Err(rustls::Error::General("TLS 1.2 is not offered".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            check_signature(cert, message, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            schemes()
        }
    };
}

impl ServerCertVerifier for PeerCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        check_chain(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

impl ClientCertVerifier for PeerCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        check_chain(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

    type Pipe = Compat<tokio::io::DuplexStream>;

    fn pipe() -> (Pipe, Pipe) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        (a.compat(), b.compat())
    }

    fn suite<C>(stream: &TlsStream<C>) -> Option<rustls::CipherSuite> {
        stream
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .map(|s| s.suite())
    }

    #[tokio::test]
    async fn both_ends_learn_the_others_peer_id_over_aes_gcm() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (ca, cb) = (Config::new(&a).unwrap(), Config::new(&b).unwrap());
        let (da, db) = pipe();
        let (out, inb) = tokio::join!(
            ca.upgrade_outbound(da, PROTOCOL),
            cb.upgrade_inbound(db, PROTOCOL)
        );
        let ((seen_by_a, mut sa), (seen_by_b, mut sb)) = (out.unwrap(), inb.unwrap());
        assert_eq!(seen_by_a, b.public().to_peer_id());
        assert_eq!(seen_by_b, a.public().to_peer_id());
        assert_eq!(
            suite(&sa),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );

        // Bytes go through both ways.
        use futures::{AsyncReadExt, AsyncWriteExt};
        sa.write_all(b"chunk").await.unwrap();
        sa.flush().await.unwrap();
        let mut got = [0u8; 5];
        sb.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"chunk");
    }

    #[tokio::test]
    async fn a_stock_libp2p_tls_peer_connects_and_gets_aes_gcm() {
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        // libp2p-tls offers ChaCha20-Poly1305 first; our server's order wins.
        let stock = libp2p_tls::Config::new(&a).unwrap();
        let ours = Config::new(&b).unwrap();
        let (da, db) = pipe();
        let (out, inb) = tokio::join!(
            stock.upgrade_outbound(da, "/tls/1.0.0"),
            ours.upgrade_inbound(db, PROTOCOL)
        );
        let ((seen_by_a, sa), (seen_by_b, _)) = (out.unwrap(), inb.unwrap());
        assert_eq!(seen_by_a, b.public().to_peer_id());
        assert_eq!(seen_by_b, a.public().to_peer_id());
        assert_eq!(
            suite(&sa),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }

    /// The attack: a client with a valid TLS certificate that carries no libp2p key
    /// (so no peer id it could prove) must not get a connection.
    #[tokio::test]
    async fn a_certificate_without_a_libp2p_key_is_refused() {
        let plain = rcgen::generate_simple_self_signed(vec!["peer".into()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(plain.key_pair.serialize_der().into());
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerCertificate))
            .with_client_auth_cert(vec![plain.cert.der().clone()], key)
            .unwrap();
        client.alpn_protocols = vec![ALPN.to_vec()];
        let server = Config::new(&Keypair::generate_ed25519()).unwrap();

        let (da, db) = pipe();
        let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED).into());
        let (out, inb) = tokio::join!(
            futures_rustls::TlsConnector::from(Arc::new(client)).connect(name, da),
            server.upgrade_inbound(db, PROTOCOL)
        );
        let err = inb.expect_err("a certificate without a libp2p key was accepted");
        assert!(matches!(err, TlsError::Handshake(_)), "{err}");
        // The client learns nothing usable either: its stream fails on first use.
        if let Ok(mut s) = out {
            use futures::AsyncReadExt;
            let mut b = [0u8; 1];
            let got = s.read(&mut b).await.map(|n| n > 0).unwrap_or(false);
            assert!(!got, "the refused client read application data");
        }
    }
}
