//! TLS for a replication connection over TCP, as libpq's `sslmode=prefer` and `require` do it:
//! ask with SSLRequest; the server's `S` starts the handshake, its `N` means it has no TLS
//! (`prefer` then goes on in the clear, `require` fails). Like libpq in those modes without a
//! root certificate, the server's certificate is not checked against a CA (the handshake's
//! signatures are): use a Unix socket or a trusted network where that matters.

use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::BytesMut;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Transport;

/// Ask `tcp`'s server for TLS; `required`: refuse a server without it.
///
/// # Errors
/// The server has no TLS and it is required, or the handshake fails.
pub(super) async fn negotiate(
    mut tcp: tokio::net::TcpStream,
    host: &str,
    required: bool,
) -> anyhow::Result<std::io::Result<Transport>> {
    let mut req = BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut req);
    tcp.write_all(&req).await.context("send SSLRequest")?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .context("read the answer to SSLRequest")?;
    match answer[0] {
        b'S' => {}
        b'N' if required => {
            bail!("the server does not accept TLS connections (sslmode=require)")
        }
        b'N' => return Ok(Ok(Transport::Tcp(tcp))),
        other => bail!("the server answered SSLRequest with {other:#04x}, not S or N"),
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoCaCheck(provider)))
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string())
        .unwrap_or_else(|_| ServerName::try_from("localhost").expect("a valid DNS name"));
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    Ok(Ok(Transport::Tls(Box::new(tls))))
}

/// Accepts the server's certificate without a CA (libpq's `require` without a root certificate),
/// checking the handshake signatures with the provider's algorithms.
#[derive(Debug)]
struct NoCaCheck(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoCaCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
