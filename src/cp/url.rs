//! CONTROL_PLANE_URL, parsed once when the configuration loads. The HTTP client, the control
//! channel and host-IP detection all take their parts (scheme, host, port, base path) from
//! this one value instead of parsing the text again.

use std::fmt;
use std::str::FromStr;

/// `http[s]://host[:port][/base]`, without trailing slashes; no credentials in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpUrl {
    /// The normalised text: what requests are built on and what logs show.
    text: String,
    https: bool,
    /// The authority as written (`cp:8080`, `[fd00::1]`).
    authority: String,
    /// Without brackets.
    host: String,
    port: u16,
    /// The base path without a trailing slash ("" for none).
    path: String,
}

/// The text is not an `http://` or `https://` URL with a host.
#[derive(Debug, PartialEq, Eq)]
pub struct NotAUrl;

impl fmt::Display for NotAUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not an http://host[:port] or https://host[:port] URL")
    }
}

impl std::error::Error for NotAUrl {}

impl FromStr for CpUrl {
    type Err = NotAUrl;

    /// Blanks around it and trailing slashes are dropped.
    fn from_str(raw: &str) -> Result<CpUrl, NotAUrl> {
        let text = raw.trim().trim_end_matches('/');
        let uri: http::Uri = text.parse().map_err(|_| NotAUrl)?;
        let https = match text.split_once("://").map(|(s, _)| s) {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(NotAUrl),
        };
        let authority = uri.authority().ok_or(NotAUrl)?.as_str();
        if authority.contains('@') {
            return Err(NotAUrl);
        }
        let bracketed = uri.host().ok_or(NotAUrl)?;
        let host = bracketed.trim_start_matches('[').trim_end_matches(']');
        let port = match authority.strip_prefix(bracketed).ok_or(NotAUrl)? {
            "" => {
                if https {
                    443
                } else {
                    80
                }
            }
            after => after
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .ok_or(NotAUrl)?,
        };
        if host.is_empty() {
            return Err(NotAUrl);
        }
        Ok(CpUrl {
            text: text.to_string(),
            https,
            authority: authority.to_string(),
            host: host.to_string(),
            port,
            path: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

impl CpUrl {
    pub fn as_str(&self) -> &str {
        &self.text
    }
    pub fn is_https(&self) -> bool {
        self.https
    }
    /// The authority as written: `cp.example:8080`, `[fd00::1]`.
    pub fn authority(&self) -> &str {
        &self.authority
    }
    /// The host without brackets: `fd00::1`.
    pub fn host(&self) -> &str {
        &self.host
    }
    /// The port, or the scheme's default.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// `host:port` to connect to (an IPv6 host bracketed), the default port filled in.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
    /// The base path without a trailing slash: "" or `/base`.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// The URL of `route` (which starts with '/') under this base.
    pub fn join(&self, route: &str) -> String {
        format!("{}{route}", self.text)
    }
}

impl fmt::Display for CpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq<&str> for CpUrl {
    fn eq(&self, other: &&str) -> bool {
        self.text == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(s: &str) -> Option<(bool, String, u16)> {
        let u: CpUrl = s.parse().ok()?;
        Some((u.is_https(), u.host().to_string(), u.port()))
    }

    #[test]
    fn parses_scheme_host_port_and_base() {
        assert_eq!(
            parts("http://[fd00::1]:8080/x"),
            Some((false, "fd00::1".into(), 8080))
        );
        assert_eq!(
            parts("https://cp.example"),
            Some((true, "cp.example".into(), 443))
        );
        assert_eq!(parts("http://u:p@cp"), None);
        for bad in [
            "ftp://x",
            "http://",
            "http:///x",
            "http://h:",
            "http://h:abc",
            "http://h:99999",
            "cp:8080",
            "HTTP://x",
        ] {
            assert_eq!(parts(bad), None, "{bad}");
        }
        let u: CpUrl = " http://cp.example:8080/base// ".parse().unwrap();
        assert_eq!(u, "http://cp.example:8080/base");
        assert_eq!((u.authority(), u.path()), ("cp.example:8080", "/base"));
        assert_eq!(
            u.join("/api/agent/config"),
            "http://cp.example:8080/base/api/agent/config"
        );
        let u: CpUrl = "http://[::1]".parse().unwrap();
        assert_eq!((u.host_port(), u.path()), ("[::1]:80".to_string(), ""));
    }
}
