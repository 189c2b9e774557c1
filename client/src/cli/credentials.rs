//! The global TLS and token options and the [`ClientTls`] they describe. Their environment
//! variables are the client's own: a shell or pod set up for the server (whose certificate and
//! key are POLYHEAD_TLS_CERT and POLYHEAD_TLS_KEY) does not make the CLI present them.

use std::path::PathBuf;

use clap::Args;
use polyhead_client::{ClientError, ClientTls, read_file};

use super::GLOBAL;

/// How the client proves who it is and checks who the server is.
#[derive(Debug, Args)]
pub struct CredentialArgs {
    /// CA certificate (PEM) that signed the server's certificate; turns TLS on.
    #[arg(long, global = true, help_heading = GLOBAL, env = "POLYHEAD_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require one (mutual TLS); needs --tls-key
    /// (the server's own POLYHEAD_TLS_CERT is not read).
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "POLYHEAD_CLIENT_CERT",
        value_name = "FILE",
        requires_all = ["tls_key", "tls_ca"]
    )]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate; needs --tls-cert (the server's own
    /// POLYHEAD_TLS_KEY is not read).
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "POLYHEAD_CLIENT_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Name the server's certificate must carry (default: the host of --server).
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "POLYHEAD_TLS_DOMAIN",
        value_name = "NAME",
        requires = "tls_ca"
    )]
    pub tls_domain: Option<String>,
    /// Bearer token sent with every call.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "POLYHEAD_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

impl CredentialArgs {
    /// Reads the PEM files named by the TLS options; `None` when TLS is off.
    pub fn tls(&self) -> Result<Option<ClientTls>, ClientError> {
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let client_identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((read_file(cert)?, read_file(key)?)),
            _ => None,
        };
        Ok(Some(ClientTls {
            ca_cert_pem: read_file(ca)?,
            client_identity,
            domain: self.tls_domain.clone(),
        }))
    }
}
