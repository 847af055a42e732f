//! Control-plane HTTP client (ureq 3, blocking). Every request carries X-Agent-Secret and has
//! connect and overall timeouts. A 2xx is only success when its body is what the route
//! returns: an HTML page from a wrong URL is an error naming the URL and content type.
//! Clones share one connection pool and one name-lookup thread.

use crate::cp::resolver::Lookups;
use crate::cp::tls::Roots;
use crate::cp::wire::Node;
use crate::task::AgentConfig;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::fmt;
use std::time::Duration;

/// The longest any request may take, connect included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    secret: String,
}

#[derive(Debug)]
pub enum CpError {
    Unauthorized {
        url: String,
    },
    Status {
        url: String,
        code: u16,
        body: String,
    },
    NotJson {
        url: String,
        code: u16,
        content_type: String,
    },
    Transport {
        url: String,
        err: String,
    },
}

impl CpError {
    /// Today's server answers 500 `node … not found` when the node row is gone.
    pub fn is_unknown_node(&self) -> bool {
        matches!(self, CpError::Status { code: 500, body, .. } if body.contains("node") && body.contains("not found"))
    }
    /// The March 2026 server's answer for a route it does not have: chi's plain
    /// `404 page not found`. Any other 404 (a proxy's, a JSON error) may pass.
    pub fn is_missing_route(&self) -> bool {
        matches!(self, CpError::Status { code: 404, body, .. } if body == "404 page not found")
    }
    pub fn status(&self) -> Option<u16> {
        match self {
            CpError::Status { code, .. } | CpError::NotJson { code, .. } => Some(*code),
            CpError::Unauthorized { .. } => Some(401),
            CpError::Transport { .. } => None,
        }
    }
}

impl fmt::Display for CpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpError::Unauthorized { url } => write!(
                f,
                "the control plane rejected AGENT_SECRET (401 from {url}); set the same secret on the agent and the control plane"
            ),
            CpError::Status { url, code, body } => write!(f, "{url} answered {code}: {body}"),
            CpError::NotJson { url, code, content_type } => write!(
                f,
                "{url} answered {code} with content type {content_type:?}, not JSON; is CONTROL_PLANE_URL the control plane's address?"
            ),
            CpError::Transport { url, err } => write!(f, "{url}: {err}"),
        }
    }
}

impl Client {
    pub fn new(base: &str, secret: &str, roots: &Roots) -> Client {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .user_agent(concat!("muvee-agent/", env!("CARGO_PKG_VERSION")))
            .tls_config(roots.ureq())
            .build();
        let agent = ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::DefaultConnector::new(),
            Lookups::default(),
        );
        Client {
            agent,
            base: base.trim_end_matches('/').to_string(),
            secret: secret.to_string(),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// GET without a body, POST with one (JSON bytes), within `timeout` when given (else
    /// REQUEST_TIMEOUT). Returns the parsed JSON body, or Null for 204.
    fn call(
        &self,
        path: &str,
        body: Option<&[u8]>,
        timeout: Option<Duration>,
    ) -> Result<Value, CpError> {
        let url = format!("{}{}", self.base, path);
        let shown = url.split('?').next().unwrap_or(&url).to_string();
        let transport = |e: ureq::Error| CpError::Transport {
            url: shown.clone(),
            err: e.to_string(),
        };
        let result = match body {
            None => {
                let mut req = self.agent.get(&url);
                if !self.secret.is_empty() {
                    req = req.header("X-Agent-Secret", &self.secret);
                }
                req.call()
            }
            Some(bytes) => {
                let mut req = self
                    .agent
                    .post(&url)
                    .header("Content-Type", "application/json");
                if !self.secret.is_empty() {
                    req = req.header("X-Agent-Secret", &self.secret);
                }
                if let Some(t) = timeout {
                    req = req.config().timeout_global(Some(t)).build();
                }
                req.send(bytes)
            }
        };
        let mut resp = result.map_err(transport)?;
        let code = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text = resp.body_mut().read_to_string().map_err(transport)?;
        if code == 401 {
            return Err(CpError::Unauthorized { url: shown });
        }
        if !(200..300).contains(&code) {
            let mut body: String = text.trim().chars().take(300).collect();
            body = crate::sys::redact::scrub(&body).into_owned();
            return Err(CpError::Status {
                url: shown,
                code,
                body,
            });
        }
        if code == 204 {
            return Ok(Value::Null);
        }
        if !content_type.contains("json") {
            return Err(CpError::NotJson {
                url: shown,
                code,
                content_type,
            });
        }
        serde_json::from_str(&text).map_err(|_| CpError::NotJson {
            url: shown,
            code,
            content_type,
        })
    }

    fn typed<T: DeserializeOwned>(&self, path: &str, v: Value) -> Result<T, CpError> {
        serde_json::from_value(v).map_err(|e| CpError::Transport {
            url: format!("{}{}", self.base, path),
            err: format!("unexpected response shape: {e}"),
        })
    }

    pub fn register(&self, node: &Node) -> Result<Node, CpError> {
        let path = "/api/agent/register";
        let v = self.call(
            path,
            Some(&serde_json::to_vec(node).unwrap_or_default()),
            None,
        )?;
        self.typed(path, v)
    }

    pub fn config(&self) -> Result<AgentConfig, CpError> {
        let path = "/api/agent/config";
        let v = self.call(path, None, None)?;
        self.typed(path, v)
    }

    /// Pending tasks, each still raw so one malformed task cannot fail the whole poll.
    pub fn poll(&self, node_id: &str) -> Result<Vec<Value>, CpError> {
        let path = format!("/api/agent/tasks?node_id={node_id}");
        match self.call(&path, None, None)? {
            Value::Array(items) => Ok(items),
            Value::Null => Ok(Vec::new()),
            other => self.typed(&path, other),
        }
    }

    /// `body` is a serialized [`crate::task::Completion`], stored verbatim in the outbox.
    pub fn complete(&self, task_id: &str, body: &[u8]) -> Result<(), CpError> {
        self.call(
            &format!("/api/agent/tasks/{task_id}/complete"),
            Some(body),
            None,
        )
        .map(drop)
    }

    /// Appends `text` to a deployment's log; the request ends within `timeout`.
    pub fn append_log(
        &self,
        deployment_id: &str,
        text: &str,
        timeout: Duration,
    ) -> Result<(), CpError> {
        let body = serde_json::to_vec(&serde_json::json!({ "line": text })).unwrap_or_default();
        self.call(
            &format!("/api/deployments/{deployment_id}/logs"),
            Some(&body),
            Some(timeout),
        )
        .map(drop)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<(), CpError> {
        self.call(
            path,
            Some(&serde_json::to_vec(body).unwrap_or_default()),
            None,
        )
        .map(drop)
    }
}

/// The status a plain `GET url` gets (any status), for probing a registry. A client of its
/// own: the agent secret must never reach another server.
pub fn http_status(url: &str, timeout: Duration) -> Result<u16, CpError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .user_agent(concat!("muvee-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let resp = agent.get(url).call().map_err(|e| CpError::Transport {
        url: url.to_string(),
        err: e.to_string(),
    })?;
    Ok(resp.status().as_u16())
}

/// Capped exponential backoff with full jitter: uniform in [0, min(cap, base·2^n)], at least
/// 100 ms so a tight failure loop is impossible.
pub struct Backoff {
    attempt: u32,
    base: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            attempt: 0,
            base,
            cap,
        }
    }
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let frac = (crate::sys::sync::random_u64() % 10_000) as f64 / 10_000.0;
        ceiling.mul_f64(frac).max(Duration::from_millis(100))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let delays: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays
            .iter()
            .all(|d| *d <= Duration::from_secs(60) && *d >= Duration::from_millis(100)));
        assert!(delays[0] <= Duration::from_secs(1));
        // Jitter: not all of the capped delays are equal.
        assert!(delays[10..].windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn classifies_errors() {
        let e = CpError::Status {
            url: "u".into(),
            code: 500,
            body: r#"{"error":"node 5d1c not found"}"#.into(),
        };
        assert!(e.is_unknown_node());
        let e = CpError::NotJson {
            url: "http://x//api/agent/tasks".into(),
            code: 200,
            content_type: "text/html".into(),
        };
        assert!(e.to_string().contains("text/html") && e.to_string().contains("//api/agent/tasks"));
    }
}
