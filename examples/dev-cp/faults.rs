//! Fault injection for the dev control plane, per route, through the server's interceptor hook
//! ([`super::server::Server::set_interceptor`]): status pages (5xx, 4xx, the web UI's HTML,
//! non-JSON), stalls and slow answers, and connection resets. A fault lasts for a number of
//! requests (the integration tests) or until a deadline (the dev-cp binary and the chaos
//! campaign). The dev-cp binary drives it over `GET /dev/faults?route=R&fault=F&secs=S`
//! (`dev-cp fault R F S`), `GET /dev/faults?clear`, and `GET /dev/faults` lists what is active.
#![allow(dead_code)]

use super::server::{Action, Server, SPA_HTML};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// Answer with this status, content type and body instead of the real handler.
    Status(u16, &'static str, String),
    /// Read the request, sleep, then handle it normally (state changes happen after the sleep).
    Hang(Duration),
    /// Close the socket with a TCP RST without answering.
    Reset,
    /// 200 text/html (as if routed to the web UI).
    Html,
    /// 200 application/json whose body is not JSON.
    Garbage,
}

impl Fault {
    fn action(&self) -> Action {
        match self {
            Fault::Status(code, ctype, body) => Action::Respond(*code, ctype, body.clone().into()),
            Fault::Hang(d) => Action::Delay(*d),
            Fault::Reset => Action::Reset,
            Fault::Html => Action::Respond(200, "text/html; charset=utf-8", SPA_HTML.into()),
            Fault::Garbage => {
                Action::Respond(200, "application/json", b"<<<not json>>>\n".to_vec())
            }
        }
    }

    /// `500`…`599` and `400`…`499` (a JSON error body, or a proxy's text page for 502/504
    /// and 413), `html`, `garbage`, `reset`, `hang:MS` (a stall), `slow:MS`.
    pub fn parse(s: &str) -> Option<Fault> {
        if let Some((kind, ms)) = s.split_once(':') {
            let d = Duration::from_millis(ms.parse().ok()?);
            return matches!(kind, "hang" | "slow").then_some(Fault::Hang(d));
        }
        match s {
            "html" => Some(Fault::Html),
            "garbage" => Some(Fault::Garbage),
            "reset" => Some(Fault::Reset),
            _ => {
                let code: u16 = s.parse().ok().filter(|c| (400..600).contains(c))?;
                Some(Fault::status(code))
            }
        }
    }

    /// What a proxy (text) or the server itself (JSON) answers with `code`.
    pub fn status(code: u16) -> Fault {
        match code {
            413 | 502 | 504 => Fault::Status(
                code,
                "text/html",
                format!("<html><body><h1>{code}</h1>nginx</body></html>\n"),
            ),
            _ => Fault::Status(
                code,
                "application/json",
                format!("{{\"error\":\"injected fault {code}\"}}\n"),
            ),
        }
    }

    /// The short name [`Fault::parse`] reads back.
    pub fn name(&self) -> String {
        match self {
            Fault::Status(code, ..) => code.to_string(),
            Fault::Hang(d) => format!("hang:{}", d.as_millis()),
            Fault::Reset => "reset".into(),
            Fault::Html => "html".into(),
            Fault::Garbage => "garbage".into(),
        }
    }
}

/// The agent-facing routes by name, as raw-target prefixes. `poll` is `/api/agent/tasks?…`;
/// `complete` is `/api/agent/tasks/{id}/complete`.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("poll", &["/api/agent/tasks?"]),
    ("complete", &["/api/agent/tasks/"]),
    ("logs", &["/api/deployments/"]),
    ("register", &["/api/agent/register"]),
    ("config", &["/api/agent/config"]),
    (
        "metrics",
        &[
            "/api/agent/container-statuses",
            "/api/agent/container-metrics",
            "/api/agent/node-metrics",
        ],
    ),
    ("health", &["/api/agent/health-report"]),
    ("control", &["/api/agent/control"]),
    ("all", &["/api/"]),
];

pub fn route_prefixes(route: &str) -> Option<&'static [&'static str]> {
    ROUTES.iter().find(|r| r.0 == route).map(|r| r.1)
}

enum Limit {
    Times(usize),
    Until(Instant),
}

struct Rule {
    prefixes: Vec<String>,
    /// How it was asked for (route name or prefix), for listings.
    label: String,
    fault: Fault,
    limit: Limit,
}

impl Rule {
    fn live(&self, now: Instant) -> bool {
        match self.limit {
            Limit::Times(n) => n > 0,
            Limit::Until(t) => now < t,
        }
    }
}

/// What nginx answers a body over `client_max_body_size`.
const NGINX_413: &str = "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

/// The active faults; cloning shares them.
#[derive(Clone, Default)]
pub struct Faults {
    rules: Arc<Mutex<Vec<Rule>>>,
    /// Bodies above this many bytes get nginx's 413 (0: no limit).
    body_limit: Arc<AtomicUsize>,
}

impl Faults {
    /// Makes `server` consult these faults (and answer `/dev/faults` when `dev_routes`).
    pub fn install(&self, server: &Server, dev_routes: bool) {
        let me = self.clone();
        server.set_interceptor(Box::new(move |target: &str, len: usize| {
            if dev_routes && (target == "/dev/faults" || target.starts_with("/dev/faults?")) {
                return Some(("dev".into(), me.dev_route(target)));
            }
            let max = me.body_limit.load(SeqCst);
            if max > 0 && len > max {
                let page = NGINX_413.as_bytes().to_vec();
                let name = format!("body of {len} bytes over {max}");
                return Some((name, Action::Respond(413, "text/html", page)));
            }
            me.hit(target).map(|f| (f.name(), f.action()))
        }));
    }

    /// Answers 413 (nginx's page) to every request whose body is over `max` bytes, as nginx
    /// in front of the server does with `client_max_body_size` (1m by default); 0: no limit.
    pub fn limit_body(&self, max: usize) {
        self.body_limit.store(max, SeqCst);
    }

    /// Applies `fault` to the next `times` requests whose raw target (path+query) starts with
    /// `prefix` ("" = every request). Faults are consumed in injection order.
    pub fn inject(&self, prefix: &str, fault: Fault, times: usize) {
        self.push(vec![prefix.into()], prefix, fault, Limit::Times(times));
    }

    /// Applies `fault` to every request of `route` (a name of [`ROUTES`]) for `dur`.
    pub fn inject_for(&self, route: &str, fault: Fault, dur: Duration) -> bool {
        let Some(prefixes) = route_prefixes(route) else {
            return false;
        };
        let prefixes = prefixes.iter().map(|p| p.to_string()).collect();
        let until = Limit::Until(Instant::now() + dur);
        self.push(prefixes, route, fault, until);
        true
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The active faults, one `label fault` line each.
    pub fn list(&self) -> Vec<String> {
        let now = Instant::now();
        let rules = self.lock();
        let live = rules.iter().filter(|r| r.live(now));
        live.map(|r| format!("{} {}", r.label, r.fault.name()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Rule>> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, prefixes: Vec<String>, label: &str, fault: Fault, limit: Limit) {
        let label = label.to_string();
        self.lock().push(Rule {
            prefixes,
            label,
            fault,
            limit,
        });
    }

    fn hit(&self, target: &str) -> Option<Fault> {
        let now = Instant::now();
        let mut rules = self.lock();
        rules.retain(|r| r.live(now));
        let rule = rules
            .iter_mut()
            .find(|r| r.prefixes.iter().any(|p| target.starts_with(p.as_str())))?;
        if let Limit::Times(n) = &mut rule.limit {
            *n -= 1;
        }
        Some(rule.fault.clone())
    }

    fn dev_route(&self, target: &str) -> Action {
        let query = target.split_once('?').map_or("", |q| q.1);
        let get = |k: &str| {
            let pairs = query.split('&').filter_map(|kv| kv.split_once('='));
            pairs
                .into_iter()
                .find(|p| p.0 == k)
                .map(|p| p.1.to_string())
        };
        let answer = |code: u16, text: String| {
            Action::Respond(code, "text/plain; charset=utf-8", (text + "\n").into())
        };
        if query == "clear" {
            self.clear();
            return answer(200, "cleared".into());
        }
        if query.is_empty() {
            return answer(200, self.list().join("\n"));
        }
        let fault = get("fault").and_then(|f| Fault::parse(&f));
        let secs = get("secs").and_then(|s| s.parse::<f64>().ok());
        let route = get("route").unwrap_or_default();
        match (fault, secs) {
            (Some(f), Some(s)) if s > 0.0 && s < 1e6 => {
                if self.inject_for(&route, f, Duration::from_secs_f64(s)) {
                    answer(200, self.list().join("\n"))
                } else {
                    let names: Vec<&str> = ROUTES.iter().map(|r| r.0).collect();
                    answer(400, format!("route must be one of {}", names.join(", ")))
                }
            }
            _ => answer(400, "give route=R&fault=F&secs=S (F: 503, 404, 413, html, garbage, reset, hang:MS, slow:MS)".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_names_read_back() {
        for f in ["503", "404", "413", "html", "garbage", "reset", "hang:1500"] {
            assert_eq!(Fault::parse(f).unwrap().name(), f);
        }
        assert_eq!(
            Fault::parse("slow:20"),
            Some(Fault::Hang(Duration::from_millis(20)))
        );
        assert_eq!(Fault::parse("200"), None);
        assert_eq!(Fault::parse("stall"), None);
    }

    #[test]
    fn counted_and_timed_faults_match_their_routes_only() {
        let f = Faults::default();
        f.inject("/api/agent/config", Fault::Reset, 1);
        assert!(f.inject_for("poll", Fault::Html, Duration::from_secs(60)));
        assert_eq!(f.hit("/api/agent/config"), Some(Fault::Reset));
        assert_eq!(f.hit("/api/agent/config"), None);
        assert_eq!(f.hit("/api/agent/tasks?node_id=x"), Some(Fault::Html));
        assert_eq!(f.hit("/api/agent/tasks/x/complete"), None);
        assert!(!f.inject_for("nope", Fault::Html, Duration::from_secs(1)));
        f.clear();
        assert_eq!(f.hit("/api/agent/tasks?node_id=x"), None);
    }
}
