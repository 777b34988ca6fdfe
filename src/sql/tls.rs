//! TLS to PostgreSQL as libpq understands `postgres.url`: `sslmode` (`disable`, `prefer`,
//! `require`, `verify-ca`, `verify-full`), `sslrootcert` (a PEM file, or `system`) and a
//! client certificate (`sslcert` and `sslkey`, for servers that authenticate by certificate),
//! on the project's one TLS stack (rustls with ring).
//!
//! The client library knows only `disable`, `prefer` and `require`, and connects without TLS
//! unless it is handed a connector. So these options are taken out of the URL here, the rest is
//! parsed by the client, and the connector enforces what libpq would:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (the default) | when the server offers it | checked against `sslrootcert` when given, else not |
//! | `require` | always | checked against `sslrootcert` when given, else not |
//! | `verify-ca` | always | signed by `sslrootcert` (default: the system's authorities) |
//! | `verify-full` | always | that, and issued to the host in the URL |
//!
//! A client certificate is sent when the server asks for one, as libpq sends it; unlike libpq,
//! none is looked for in `~/.postgresql/` when the URL names none: a service's certificate is
//! one its configuration names. The key file must not be readable by others, libpq's rule.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use postgres::config::SslMode as ClientSslMode;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
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
    /// Parses a `postgres://` URL or libpq's `key=value` form, `sslmode`, `sslrootcert`,
    /// `sslcert` and `sslkey` included. Certificate and key files are read here, so that a
    /// missing or unreadable one is reported with the configuration rather than at the first
    /// connection.
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let (rest, options) = take_tls_options(url)?;
        let mode = match &options.mode {
            Some(value) => SslMode::parse(value)?,
            None => SslMode::Prefer,
        };
        let identity = match (&options.cert, &options.key) {
            (Some(cert), Some(key)) if mode != SslMode::Disable => {
                Some(client_identity(Path::new(cert), Path::new(key))?)
            }
            (Some(_), Some(_)) | (None, None) => None,
            (Some(_), None) => anyhow::bail!("sslcert is given without sslkey: give both"),
            (None, Some(_)) => anyhow::bail!("sslkey is given without sslcert: give both"),
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
                identity,
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

/// The alert a server sent to end the TLS connection (an unknown authority for the client's
/// certificate, say), which the client reports as an error of communication.
pub fn alert_received(err: &postgres::Error) -> Option<rustls::AlertDescription> {
    let mut source = std::error::Error::source(err);
    while let Some(err) = source {
        let found = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
            None => err.downcast_ref::<rustls::Error>(),
        };
        if let Some(rustls::Error::AlertReceived(alert)) = found {
            return Some(*alert);
        }
        source = err.source();
    }
    None
}

#[derive(Default)]
struct TlsOptions {
    mode: Option<String>,
    root_cert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

/// Takes `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out of a URL's query or a
/// `key=value` string; the rest is returned as it was written.
fn take_tls_options(url: &str) -> anyhow::Result<(String, TlsOptions)> {
    let mut options = TlsOptions::default();
    let mut take = |key: &str, value: String| -> bool {
        match key {
            "sslmode" => options.mode = Some(value),
            "sslrootcert" => options.root_cert = Some(value),
            "sslcert" => options.cert = Some(value),
            "sslkey" => options.key = Some(value),
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

/// A client certificate (its chain) and its private key.
type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn client_config(
    mode: SslMode,
    root_cert: Option<&str>,
    identity: Option<Identity>,
) -> anyhow::Result<ClientConfig> {
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
    let with_identity = |builder: rustls::ConfigBuilder<
        ClientConfig,
        rustls::client::WantsClientCert,
    >| {
        match identity {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .context("sslcert and sslkey cannot be used together (does the key belong to the certificate?)"),
            None => Ok(builder.with_no_client_auth()),
        }
    };
    let roots = match (mode, roots) {
        (SslMode::VerifyFull, Some(roots)) => {
            return with_identity(builder.with_root_certificates(roots));
        }
        (_, Some(roots)) => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()
                .context("cannot use the root certificates")?,
        ),
        (_, None) => None,
    };
    let verifier = Arc::new(Libpq { roots, provider });
    with_identity(
        builder
            .dangerous()
            .with_custom_certificate_verifier(verifier),
    )
}

/// Reads `sslcert` (the client's certificate, then any intermediates) and `sslkey` (its
/// private key, unencrypted PEM). A key file that others may read is refused as libpq refuses
/// it: owned by this process's user with at most `0600`, or by root with at most `0640` (a key
/// shared with a service's group).
fn client_identity(cert: &Path, key: &Path) -> anyhow::Result<Identity> {
    let (cert_shown, key_shown) = (cert.display(), key.display());
    let mut chain = Vec::new();
    for item in CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read sslcert `{cert_shown}`"))?
    {
        chain.push(item.with_context(|| format!("sslcert `{cert_shown}` is not PEM"))?);
    }
    anyhow::ensure!(
        !chain.is_empty(),
        "sslcert `{cert_shown}` holds no certificate"
    );
    let meta =
        std::fs::metadata(key).with_context(|| format!("cannot read sslkey `{key_shown}`"))?;
    let euid = rustix::process::geteuid().as_raw();
    anyhow::ensure!(
        meta.uid() == euid || meta.uid() == 0,
        "sslkey `{key_shown}` belongs to user id {}: it must belong to this process's user \
         ({euid}) or to root",
        meta.uid()
    );
    let mode = meta.mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o740 } else { 0o700 };
    anyhow::ensure!(
        mode & !allowed == 0,
        "sslkey `{key_shown}` may be read by others (mode {mode:04o}): it must be u=rw (0600) \
         or less, or u=rw,g=r (0640) or less when root owns it"
    );
    let text = std::fs::read_to_string(key)
        .with_context(|| format!("cannot read sslkey `{key_shown}`"))?;
    anyhow::ensure!(
        !text.contains("ENCRYPTED"),
        "sslkey `{key_shown}` is encrypted, which is not supported: decrypt it into a file only \
         the service's user can read (`openssl pkey -in KEY -out PLAIN`)"
    );
    let key = PrivateKeyDer::from_pem_slice(text.as_bytes()).with_context(|| {
        format!("sslkey `{key_shown}` holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")
    })?;
    Ok((chain, key))
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

        let (rest, options) = take_tls_options(
            "postgres://u@h/db?sslcert=%2Fetc%2Fw%2Fclient.crt&connect_timeout=3&sslkey=/etc/w/client.key",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@h/db?connect_timeout=3");
        assert_eq!(options.cert.as_deref(), Some("/etc/w/client.crt"));
        assert_eq!(options.key.as_deref(), Some("/etc/w/client.key"));
    }

    /// Runs `openssl` with `args`.
    fn openssl(args: &[&std::ffi::OsStr]) {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_a_readable_private_one() {
        let half = |url: &str| format!("{:#}", Target::parse(url).err().unwrap());
        assert!(
            half("postgres://u@h/db?sslcert=/a.crt").contains("sslcert is given without sslkey")
        );
        assert!(half("host=h sslkey=/a.key").contains("sslkey is given without sslcert"));
        // Not read where no TLS is made, as libpq ignores them then.
        Target::parse("postgres://u@h/db?sslmode=disable&sslcert=/a.crt&sslkey=/a.key").unwrap();
        let err = half("postgres://u@h/db?sslcert=/nonexistent/c.crt&sslkey=/nonexistent/c.key");
        assert!(
            err.contains("cannot read sslcert `/nonexistent/c.crt`"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let (cert, key, other) = (
            dir.path().join("c.crt"),
            dir.path().join("c.key"),
            dir.path().join("other.key"),
        );
        let os = |s: &'static str| std::ffi::OsStr::new(s);
        openssl(&[
            os("req"),
            os("-x509"),
            os("-newkey"),
            os("ec"),
            os("-pkeyopt"),
            os("ec_paramgen_curve:P-256"),
            os("-nodes"),
            os("-days"),
            os("1"),
            os("-subj"),
            os("/CN=workers"),
            os("-keyout"),
            key.as_os_str(),
            os("-out"),
            cert.as_os_str(),
        ]);
        let url =
            |key: &Path| format!("host=h sslcert={} sslkey={}", cert.display(), key.display());
        chmod(&key, 0o600);
        Target::parse(&url(&key)).unwrap();
        chmod(&key, 0o640);
        // Group-readable is allowed only to a key root owns.
        let owned_by_root = rustix::process::geteuid().is_root();
        assert_eq!(Target::parse(&url(&key)).is_ok(), owned_by_root);
        chmod(&key, 0o604);
        let err = half(&url(&key));
        assert!(
            err.contains("may be read by others (mode 0604)") && err.contains("c.key"),
            "{err}"
        );
        chmod(&key, 0o600);

        openssl(&[
            os("pkey"),
            os("-aes256"),
            os("-passout"),
            os("pass:secret"),
            os("-in"),
            key.as_os_str(),
            os("-out"),
            other.as_os_str(),
        ]);
        chmod(&other, 0o600);
        let err = half(&url(&other));
        assert!(
            err.contains("is encrypted, which is not supported"),
            "{err}"
        );
        // A certificate handed as the key is not a key.
        std::fs::copy(&cert, &other).unwrap();
        chmod(&other, 0o600);
        let err = half(&url(&other));
        assert!(err.contains("holds no PEM private key"), "{err}");
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
