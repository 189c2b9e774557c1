//! Server addresses: `host:port`, `http://host:port` or `https://host:port`, normalised into the
//! URI the channel connects to, with the scheme checked against the TLS settings.

use crate::error::{ClientError, Result};

/// Turns `host:port`, `http://host:port` or `https://host:port` into the URI the channel
/// connects to; a bare `host:port` becomes `http://host:port`.
///
/// Surrounding whitespace and a trailing `/` are dropped.
pub fn normalize_addr(addr: &str) -> Result<String> {
    parse_addr(addr, "http")
}

/// [`normalize_addr`] for a client with (`tls`) or without TLS settings: a bare `host:port`
/// takes the matching scheme, and a scheme that contradicts the settings is refused.
pub(crate) fn resolve_addr(addr: &str, tls: bool) -> Result<String> {
    let uri = parse_addr(addr, if tls { "https" } else { "http" })?;
    let reason = match (uri.starts_with("https://"), tls) {
        (true, false) => "https:// needs the CA certificate that signed the server's (--tls-ca)",
        (false, true) => "TLS settings were given; use https:// or a bare host:port",
        _ => return Ok(uri),
    };
    Err(ClientError::InvalidAddress {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    })
}

/// Parses an address, giving a bare `host:port` the scheme `default`.
fn parse_addr(addr: &str, default: &str) -> Result<String> {
    let invalid = |reason: &str| ClientError::InvalidAddress {
        addr: addr.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = addr.trim();
    let (scheme, rest) = trimmed.split_once("://").unwrap_or((default, trimmed));
    if scheme != "http" && scheme != "https" {
        return Err(invalid(&format!("unsupported scheme {scheme:?}")));
    }
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() {
        return Err(invalid("missing host"));
    }
    let uri = format!("{scheme}://{authority}");
    match uri.parse::<tonic::codegen::http::Uri>() {
        Ok(parsed) if parsed.host().is_some_and(|host| !host.is_empty()) => Ok(uri),
        Ok(_) => Err(invalid("missing host")),
        Err(err) => Err(invalid(&err.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_normalised() {
        let ok = |addr: &str| normalize_addr(addr).ok();
        assert_eq!(
            ok("127.0.0.1:50051").as_deref(),
            Some("http://127.0.0.1:50051")
        );
        assert_eq!(
            ok("http://127.0.0.1:50051").as_deref(),
            Some("http://127.0.0.1:50051")
        );
        assert_eq!(
            ok(" localhost:9000/ ").as_deref(),
            Some("http://localhost:9000")
        );
        assert_eq!(ok("[::1]:50051").as_deref(), Some("http://[::1]:50051"));
        assert_eq!(ok("polyhead").as_deref(), Some("http://polyhead"));
    }

    #[test]
    fn bad_addresses_are_rejected() {
        for addr in ["", "  ", "http://", "https://", "ftp://host:1", "ho st:1"] {
            let err = normalize_addr(addr).err();
            assert!(
                matches!(err, Some(ClientError::InvalidAddress { .. })),
                "{addr:?} gave {err:?}"
            );
        }
    }

    #[test]
    fn tls_settings_pick_the_scheme() {
        assert_eq!(
            normalize_addr("https://host:1").ok().as_deref(),
            Some("https://host:1")
        );
        assert_eq!(
            resolve_addr("host:1", true).ok().as_deref(),
            Some("https://host:1")
        );
        let reason = |addr: &str, tls: bool| resolve_addr(addr, tls).err().map(|e| e.to_string());
        assert_eq!(
            reason("https://host:1", false).as_deref(),
            Some(
                "invalid server address \"https://host:1\": https:// needs the CA certificate \
                 that signed the server's (--tls-ca)"
            )
        );
        assert!(reason("http://host:1", true).is_some_and(|r| r.contains("use https://")));
    }
}
