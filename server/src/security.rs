//! Transport security and caller authentication: TLS (optionally mutual) from PEM files and the
//! bearer tokens every call but health checks must carry. Everything is read and checked once at
//! start, so a bad file stops the server with a message naming it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// How long a client may take to complete the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS and authentication settings.
#[derive(Clone, Default, Args, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SecurityConfig {
    /// Server certificate chain (PEM). Serving TLS needs it and `--tls-key`.
    #[arg(
        long,
        env = "POLYHEAD_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// Private key of the server certificate (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long,
        env = "POLYHEAD_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM) that client certificates must be signed by (mutual TLS); clients
    /// without such a certificate cannot connect. Needs `--tls-cert` and `--tls-key`.
    #[arg(
        long,
        env = "POLYHEAD_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// File of accepted bearer tokens, one per line. When a token is configured, every call
    /// except `grpc.health.v1.Health` must carry `authorization: Bearer <token>`.
    #[arg(long, env = "POLYHEAD_AUTH_TOKEN_FILE", value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// An accepted bearer token (prefer `--auth-token-file`: a flag shows in process
    /// listings).
    #[arg(
        long,
        env = "POLYHEAD_AUTH_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub auth_token: Option<String>,
}

impl fmt::Debug for SecurityConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecurityConfig")
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_client_ca", &self.tls_client_ca)
            .field("auth_token_file", &self.auth_token_file)
            .field(
                "auth_token",
                &self.auth_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The checked security settings the server runs with.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// TLS for every connection; `None` serves plaintext.
    pub tls: Option<ServerTlsConfig>,
    /// Accepted bearer tokens; `None` lets every call through.
    pub tokens: Option<Arc<Tokens>>,
}

/// Why the security settings cannot be used. Messages name the file, never a token.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("--{flag} needs {needs}")]
    Incomplete {
        flag: &'static str,
        needs: &'static str,
    },
    #[error("the TLS certificate {} and key {} do not work together: {reason}", cert.display(), key.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

impl SecurityConfig {
    /// Reads and checks the files: PEMs parse, the key matches the certificate, tokens are
    /// well-formed.
    pub fn load(&self) -> Result<Security, SecurityError> {
        Ok(Security {
            tls: self.tls()?,
            tokens: self.tokens()?.map(Arc::new),
        })
    }

    fn tls(&self) -> Result<Option<ServerTlsConfig>, SecurityError> {
        let (cert, key) = match (&self.tls_cert, &self.tls_key, &self.tls_client_ca) {
            (None, None, None) => return Ok(None),
            (Some(cert), Some(key), _) => (cert, key),
            (None, _, Some(_)) => {
                return Err(incomplete("tls-client-ca", "--tls-cert and --tls-key"));
            }
            (Some(_), None, _) => return Err(incomplete("tls-cert", "--tls-key")),
            (None, Some(_), _) => return Err(incomplete("tls-key", "--tls-cert")),
        };
        let cert_pem = read_certificates(cert)?;
        let key_pem = read_key(key)?;
        let mut tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert_pem, key_pem))
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.tls_client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read_certificates(ca)?));
        }
        Server::builder()
            .tls_config(tls.clone())
            .map_err(|e| SecurityError::Mismatch {
                cert: cert.clone(),
                key: key.clone(),
                reason: error_chain(&e),
            })?;
        Ok(Some(tls))
    }

    fn tokens(&self) -> Result<Option<Tokens>, SecurityError> {
        let mut tokens = Vec::new();
        if let Some(path) = &self.auth_token_file {
            let text = read(path)?;
            let text = String::from_utf8(text).map_err(|_| invalid(path, "not UTF-8 text"))?;
            for (number, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                check_token(line)
                    .map_err(|reason| invalid(path, &format!("line {}: {reason}", number + 1)))?;
                tokens.push(line.as_bytes().to_vec());
            }
            if tokens.is_empty() {
                return Err(invalid(path, "holds no token"));
            }
        }
        if let Some(token) = &self.auth_token {
            check_token(token).map_err(|reason| invalid(Path::new("--auth-token"), reason))?;
            tokens.push(token.as_bytes().to_vec());
        }
        Ok((!tokens.is_empty()).then_some(Tokens(tokens)))
    }
}

/// A token travels in an HTTP header: visible ASCII, no spaces.
fn check_token(token: &str) -> Result<(), &'static str> {
    if token.is_empty() {
        Err("the token is empty")
    } else if !token.bytes().all(|b| b.is_ascii_graphic()) {
        Err("a token may only hold visible ASCII characters, without spaces")
    } else {
        Ok(())
    }
}

/// A PEM file holding at least one certificate.
fn read_certificates(path: &Path) -> Result<Vec<u8>, SecurityError> {
    let pem = read(path)?;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| invalid(path, &format!("not a PEM certificate file: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(invalid(path, "holds no PEM certificate"));
    }
    Ok(pem)
}

/// A PEM file holding a private key.
fn read_key(path: &Path) -> Result<Vec<u8>, SecurityError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| invalid(path, &format!("holds no usable PEM private key: {e}")))?;
    Ok(pem)
}

fn read(path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|error| SecurityError::Read {
        path: path.to_owned(),
        error,
    })
}

fn invalid(path: &Path, reason: &str) -> SecurityError {
    SecurityError::Invalid {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

fn incomplete(flag: &'static str, needs: &'static str) -> SecurityError {
    SecurityError::Incomplete { flag, needs }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// The accepted bearer tokens.
pub struct Tokens(Vec<Vec<u8>>);

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tokens({} redacted)", self.0.len())
    }
}

impl Tokens {
    /// Whether an `authorization` header value carries an accepted bearer token. Every token
    /// is compared, in constant time, so timing tells nothing about which one nearly matched.
    pub fn accepts(&self, authorization: &[u8]) -> bool {
        let Some(candidate) = bearer(authorization) else {
            return false;
        };
        let mut matched = 0u8;
        for token in &self.0 {
            matched |= u8::from(constant_time_eq(candidate, token));
        }
        matched == 1
    }
}

/// The token of a `Bearer` credential: the scheme is case-insensitive, surrounding and
/// separating whitespace is ignored.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let split = value.iter().position(u8::is_ascii_whitespace)?;
    let (scheme, token) = value.split_at(split);
    let token = token.trim_ascii();
    (scheme.eq_ignore_ascii_case(b"bearer") && !token.is_empty()).then_some(token)
}

/// Compares `candidate` with `secret` in time that depends only on their lengths.
pub fn constant_time_eq(candidate: &[u8], secret: &[u8]) -> bool {
    let mut diff = u8::from(candidate.len() != secret.len());
    for (i, s) in secret.iter().enumerate() {
        diff |= candidate.get(i).copied().unwrap_or(0) ^ s;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_matches_only_equal_slices() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cres", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"s3cret\0", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn bearer_credentials_are_parsed() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"  Bearer \t  abc  "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Bearer   "), None);
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearerabc"), None);
        assert_eq!(bearer(b"abc"), None);
        assert_eq!(bearer(b""), None);
    }

    #[test]
    fn tokens_accept_any_configured_one() {
        let tokens = Tokens(vec![b"first".to_vec(), b"second".to_vec()]);
        assert!(tokens.accepts(b"Bearer first"));
        assert!(tokens.accepts(b"bearer  second"));
        assert!(!tokens.accepts(b"Bearer third"));
        assert!(!tokens.accepts(b"first"));
        assert!(!tokens.accepts(b""));
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("write");
        file
    }

    #[test]
    fn token_files_hold_one_token_per_line() {
        let f = file("alpha\n\n  beta  \n");
        let config = SecurityConfig {
            auth_token_file: Some(f.path().to_owned()),
            auth_token: Some("gamma".into()),
            ..SecurityConfig::default()
        };
        let tokens = config.load().expect("load").tokens.expect("tokens");
        for token in ["alpha", "beta", "gamma"] {
            assert!(
                tokens.accepts(format!("Bearer {token}").as_bytes()),
                "{token}"
            );
        }
        assert_eq!(format!("{tokens:?}"), "Tokens(3 redacted)");
    }

    #[test]
    fn bad_files_are_named() {
        let empty = file("\n  \n");
        let config = SecurityConfig {
            auth_token_file: Some(empty.path().to_owned()),
            ..SecurityConfig::default()
        };
        let err = config.load().expect_err("no token").to_string();
        assert!(
            err.contains(&empty.path().display().to_string()) && err.contains("no token"),
            "{err}"
        );
        let spaced = file("good\nhas space\n");
        let config = SecurityConfig {
            auth_token_file: Some(spaced.path().to_owned()),
            ..SecurityConfig::default()
        };
        let err = config.load().expect_err("space").to_string();
        assert!(
            err.contains("line 2") && !err.contains("has space"),
            "{err}"
        );
        let not_pem = file("hello");
        let config = SecurityConfig {
            tls_cert: Some(not_pem.path().to_owned()),
            tls_key: Some(PathBuf::from("/nonexistent/key.pem")),
            ..SecurityConfig::default()
        };
        let err = config.load().expect_err("not a cert").to_string();
        assert!(err.contains(&not_pem.path().display().to_string()), "{err}");
    }

    #[test]
    fn pairs_must_be_complete() {
        let only_ca = SecurityConfig {
            tls_client_ca: Some(PathBuf::from("ca.pem")),
            ..SecurityConfig::default()
        };
        let err = only_ca.load().expect_err("no server cert").to_string();
        assert!(err.contains("--tls-client-ca"), "{err}");
        let only_cert = SecurityConfig {
            tls_cert: Some(PathBuf::from("cert.pem")),
            ..SecurityConfig::default()
        };
        let err = only_cert.load().expect_err("no key").to_string();
        assert_eq!(err, "--tls-cert needs --tls-key");
    }

    #[test]
    fn print_config_redacts_tokens() {
        let config = crate::config_layers::parse([
            "polyhead-server",
            "--auth-token",
            "hunter2",
            "--auth-token-file",
            "/etc/polyhead/tokens",
            "--tls-cert",
            "/etc/polyhead/cert.pem",
            "--tls-key",
            "/etc/polyhead/key.pem",
        ])
        .expect("parse");
        let text = crate::config_layers::render(&config);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("auth-token = \"<redacted>\""), "{text}");
        assert!(
            text.contains("tls-cert = \"/etc/polyhead/cert.pem\""),
            "{text}"
        );
    }

    #[test]
    fn debug_redacts_the_token() {
        let config = SecurityConfig {
            auth_token: Some("hunter2".into()),
            ..SecurityConfig::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
