//! TLS to PostgreSQL as libpq understands `postgres.url`: `sslmode` (`disable`, `prefer`,
//! `require`, `verify-ca`, `verify-full`) and `sslrootcert` (a PEM file, or `system`), on the
//! project's one TLS stack (rustls with ring).
//!
//! The client library knows only `disable`, `prefer` and `require`, and connects without TLS
//! unless it is handed a connector. So both options are taken out of the URL here, the rest is
//! parsed by the client, and the connector enforces what libpq would:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (the default) | when the server offers it | checked against `sslrootcert` when given, else not |
//! | `require` | always | checked against `sslrootcert` when given, else not |
//! | `verify-ca` | always | signed by `sslrootcert` (default: the system's authorities) |
//! | `verify-full` | always | that, and issued to the host in the URL |

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use postgres::config::SslMode as ClientSslMode;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> anyhow::Result<SslMode> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            // libpq's `allow` tries without TLS first: nothing a site would choose on purpose.
            other => anyhow::bail!(
                "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
            ),
        })
    }
}

/// How connections to one database are made.
#[derive(Clone)]
pub enum Tls {
    Off,
    On(MakeRustlsConnect),
}

/// `postgres.url` understood: the client's configuration and the TLS it connects with.
pub struct Target {
    pub config: postgres::Config,
    pub tls: Tls,
    pub mode: SslMode,
}

impl Target {
    /// Parses a `postgres://` URL or libpq's `key=value` form, `sslmode` and `sslrootcert`
    /// included. A root certificate file is read here, so that a missing or unreadable one is
    /// reported with the configuration rather than at the first connection.
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let (rest, options) = take_tls_options(url)?;
        let mode = match &options.mode {
            Some(value) => SslMode::parse(value)?,
            None => SslMode::Prefer,
        };
        let mut config: postgres::Config = rest.parse()?;
        config.ssl_mode(match mode {
            SslMode::Disable => ClientSslMode::Disable,
            SslMode::Prefer => ClientSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => ClientSslMode::Require,
        });
        let tls = match mode {
            SslMode::Disable => Tls::Off,
            _ => Tls::On(MakeRustlsConnect::new(client_config(
                mode,
                options.root_cert.as_deref(),
            )?)),
        };
        Ok(Target { config, tls, mode })
    }

    /// Connects once, with TLS as the URL asks.
    pub fn connect(&self) -> Result<postgres::Client, postgres::Error> {
        connect(&self.config, &self.tls)
    }
}

pub fn connect(config: &postgres::Config, tls: &Tls) -> Result<postgres::Client, postgres::Error> {
    match tls {
        Tls::Off => config.connect(postgres::NoTls),
        Tls::On(connector) => config.connect(connector.clone()),
    }
}

/// Whether a connection failed in TLS: a server without it where it is required, a handshake
/// that failed, a certificate refused (the client reports all three as a TLS handshake error).
pub fn is_tls_failure(err: &postgres::Error) -> bool {
    err.to_string()
        .starts_with("error performing TLS handshake")
}

#[derive(Default)]
struct TlsOptions {
    mode: Option<String>,
    root_cert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query or a `key=value` string; the rest is
/// returned as it was written.
fn take_tls_options(url: &str) -> anyhow::Result<(String, TlsOptions)> {
    let mut options = TlsOptions::default();
    let mut take = |key: &str, value: String| -> bool {
        match key {
            "sslmode" => options.mode = Some(value),
            "sslrootcert" => options.root_cert = Some(value),
            _ => return false,
        }
        true
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), options));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .with_context(|| format!("the value of `{key}` is not UTF-8"))?;
            if !take(key, value.into_owned()) {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, options));
    }
    let mut kept = String::new();
    for (key, value, text) in key_values(url)? {
        if !take(key, value) {
            kept.push_str(text);
            kept.push(' ');
        }
    }
    Ok((kept.trim_end().to_owned(), options))
}

/// The pairs of libpq's `key=value` form (blanks around `=` allowed; a value may be quoted
/// with `'`, with `\` escaping), each with its text as written.
fn key_values(text: &str) -> anyhow::Result<Vec<(&str, String, &str)>> {
    let mut pairs = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let start = rest;
        let eq = rest.find('=').with_context(|| {
            format!(
                "`{}` has no `=`",
                rest.split_whitespace().next().unwrap_or(rest)
            )
        })?;
        let key = rest[..eq].trim();
        rest = rest[eq + 1..].trim_start();
        let mut value = String::new();
        if let Some(quoted) = rest.strip_prefix('\'') {
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((at, c)) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    '\'' => {
                        end = Some(at + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            let end = end.with_context(|| format!("the value of `{key}` has no closing quote"))?;
            rest = &quoted[end..];
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            value.push_str(&rest[..end]);
            rest = &rest[end..];
        }
        pairs.push((key, value, &start[..start.len() - rest.len()]));
        rest = rest.trim_start();
    }
    Ok(pairs)
}

fn client_config(mode: SslMode, root_cert: Option<&str>) -> anyhow::Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match root_cert {
        Some("system") => Some(system_roots()?),
        Some(path) => Some(roots_from_file(Path::new(path))?),
        None if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) => Some(system_roots()?),
        None => None,
    };
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("no TLS protocol version in common with the crypto provider")?;
    let roots = match (mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => {
            return Ok(builder.with_root_certificates(roots).with_no_client_auth());
        }
        (_, Some(roots)) => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .context("cannot use the root certificates")?,
        ),
        (_, None) => None,
    };
    let verifier = Arc::new(Libpq { roots, provider });
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn roots_from_file(path: &Path) -> anyhow::Result<RootCertStore> {
    let shown = path.display();
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read sslrootcert `{shown}`"))?
    {
        let cert = cert.with_context(|| format!("sslrootcert `{shown}` is not PEM"))?;
        roots
            .add(cert)
            .with_context(|| format!("sslrootcert `{shown}` holds a certificate rustls refuses"))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "sslrootcert `{shown}` holds no certificate"
    );
    Ok(roots)
}

fn system_roots() -> anyhow::Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    anyhow::ensure!(
        !roots.is_empty(),
        "no certificate authority found in the system's trust store{}; give sslrootcert=PATH",
        found
            .errors
            .first()
            .map(|err| format!(" ({err})"))
            .unwrap_or_default()
    );
    Ok(roots)
}

/// The certificate checks of `verify-ca` (a chain to `roots`, whatever host name the
/// certificate is for) and of `prefer` and `require` without `sslrootcert` (`roots` `None`:
/// encrypted, but who answers is not checked, libpq's rule). The handshake's signatures are
/// verified in both.
#[derive(Debug)]
struct Libpq {
    roots: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Libpq {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        match roots.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            verified => verified,
        }
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_leave_the_url_as_written() {
        let (rest, options) = take_tls_options(
            "postgres://u:p%40ss@db.example:5432/workers?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p%40ss@db.example:5432/workers?application_name=x"
        );
        assert_eq!(options.mode.as_deref(), Some("verify-full"));
        assert_eq!(options.root_cert.as_deref(), Some("/etc/ca.pem"));

        let (rest, options) = take_tls_options(
            "host=db.example  sslmode = require dbname='my db' sslrootcert='/etc/a \\'b\\'.pem'",
        )
        .unwrap();
        assert_eq!(rest, "host=db.example dbname='my db'");
        assert_eq!(options.mode.as_deref(), Some("require"));
        assert_eq!(options.root_cert.as_deref(), Some("/etc/a 'b'.pem"));
        assert!(take_tls_options("host=x sslmode='open").is_err());
    }

    #[test]
    fn modes_map_to_the_clients_and_bad_ones_are_refused() {
        let target = Target::parse("postgres://u@h/db").unwrap();
        assert_eq!(target.mode, SslMode::Prefer);
        assert_eq!(target.config.get_ssl_mode(), ClientSslMode::Prefer);
        let target = Target::parse("postgres://u@h/db?sslmode=verify-ca").unwrap();
        assert_eq!(target.config.get_ssl_mode(), ClientSslMode::Require);
        let target = Target::parse("host=h sslmode=disable").unwrap();
        assert!(matches!(target.tls, Tls::Off));
        let err = Target::parse("postgres://u@h/db?sslmode=allow")
            .err()
            .unwrap();
        assert!(err.to_string().contains("sslmode `allow`"), "{err:#}");
        let err =
            Target::parse("postgres://u@h/db?sslmode=require&sslrootcert=/nonexistent/ca.pem")
                .err()
                .unwrap();
        assert!(
            format!("{err:#}").contains("cannot read sslrootcert `/nonexistent/ca.pem`"),
            "{err:#}"
        );
    }
}
