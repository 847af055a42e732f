//! The integration tests' control plane: the dev control plane's server core
//! (`examples/dev-cp/server.rs`, today's and the March 2026 server's shapes) plus a test-only
//! fault-injection layer and waits that dump the last requests on timeout.
#![allow(dead_code)]

#[path = "../../examples/dev-cp/server.rs"]
mod server;

use crate::util;
use serde_json::Value;
#[allow(unused_imports)]
pub use server::control::{frame_data, ControlConn, Outcome, Upgrade};
#[allow(unused_imports)]
pub use server::{enc, go_str, parse_uuid, rfc3339, Action, Recorded, Server, Version};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Debug)]
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
            Fault::Html => {
                Action::Respond(200, "text/html; charset=utf-8", server::SPA_HTML.into())
            }
            Fault::Garbage => {
                Action::Respond(200, "application/json", b"<<<not json>>>\n".to_vec())
            }
        }
    }
}

type Faults = Arc<Mutex<Vec<(String, Fault, usize)>>>;

/// What nginx answers a body over `client_max_body_size`.
const NGINX_413: &str = "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

pub struct FakeCp {
    server: Server,
    faults: Faults,
    /// Bodies above this many bytes get nginx's 413 (0: no limit).
    body_limit: Arc<AtomicUsize>,
}

impl std::ops::Deref for FakeCp {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

impl FakeCp {
    /// Binds 127.0.0.1:0 and starts serving.
    pub fn start(version: Version, secret: &str) -> FakeCp {
        let server = Server::start(version, secret);
        let faults: Faults = Arc::default();
        let body_limit = Arc::new(AtomicUsize::new(0));
        let (f, limit) = (faults.clone(), body_limit.clone());
        server.set_interceptor(Box::new(move |target: &str, len: usize| {
            let max = limit.load(Ordering::SeqCst);
            if max > 0 && len > max {
                let page = NGINX_413.as_bytes().to_vec();
                return Some((
                    format!("body of {len} bytes over {max}"),
                    Action::Respond(413, "text/html", page),
                ));
            }
            let mut list = f.lock().unwrap_or_else(|e| e.into_inner());
            let hit = list
                .iter_mut()
                .find(|f| f.2 > 0 && target.starts_with(&f.0))
                .map(|f| {
                    f.2 -= 1;
                    f.1.clone()
                });
            list.retain(|f| f.2 > 0);
            hit.map(|f| (format!("{f:?}"), f.action()))
        }));
        FakeCp {
            server,
            faults,
            body_limit,
        }
    }

    /// Answers 413 (nginx's page) to every request whose body is over `max` bytes, as nginx
    /// in front of the server does with `client_max_body_size` (1m by default).
    pub fn limit_body(&self, max: usize) {
        self.body_limit.store(max, Ordering::SeqCst);
    }

    /// Applies `fault` to the next `times` requests whose raw target (path+query) starts with
    /// `prefix` ("" = every request). Faults are consumed in injection order.
    pub fn inject(&self, prefix: &str, fault: Fault, times: usize) {
        self.faults
            .lock()
            .unwrap()
            .push((prefix.into(), fault, times));
    }
    pub fn clear_faults(&self) {
        self.faults.lock().unwrap().clear();
    }

    /// Adds a task for the most recently registered node with this role, waiting up to 30 s for one.
    pub fn add_task_for_role(
        &self,
        role: &str,
        task_type: &str,
        deployment_id: &str,
        payload: Value,
    ) -> String {
        let mut node = None;
        self.wait_for(
            &format!("a node with role {role}"),
            Duration::from_secs(30),
            |cp| {
                node = cp.node_id_for_role(role);
                node.is_some()
            },
        );
        self.add_task(&node.unwrap(), task_type, deployment_id, payload)
    }

    /// Polls `pred` every 50 ms; returns true once it holds. Panics on timeout with a dump of
    /// the last requests.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&FakeCp) -> bool,
    ) -> bool {
        if !util::poll_for(timeout, || pred(self)) {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.dump(40)
            );
        }
        true
    }
}
