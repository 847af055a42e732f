//! The integration tests' control plane: the dev control plane's server core
//! (`examples/dev-cp/server.rs`, today's and the March 2026 server's shapes) plus its
//! fault-injection layer (`examples/dev-cp/faults.rs`) and waits that dump the last requests
//! on timeout.
#![allow(dead_code)]

#[path = "../../examples/dev-cp/faults.rs"]
mod faults;
#[path = "../../examples/dev-cp/server.rs"]
mod server;

use crate::util;
pub use faults::Fault;
use faults::Faults;
use serde_json::Value;
#[allow(unused_imports)]
pub use server::control::{frame_data, ControlConn, Outcome, Upgrade};
#[allow(unused_imports)]
pub use server::{enc, go_str, parse_uuid, rfc3339, Action, Recorded, Server, Version};
use std::time::Duration;

pub struct FakeCp {
    server: Server,
    faults: Faults,
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
        let faults = Faults::default();
        faults.install(&server, false);
        FakeCp { server, faults }
    }

    /// Answers 413 (nginx's page) to every request whose body is over `max` bytes, as nginx
    /// in front of the server does with `client_max_body_size` (1m by default).
    pub fn limit_body(&self, max: usize) {
        self.faults.limit_body(max);
    }

    /// Applies `fault` to the next `times` requests whose raw target (path+query) starts with
    /// `prefix` ("" = every request). Faults are consumed in injection order.
    pub fn inject(&self, prefix: &str, fault: Fault, times: usize) {
        self.faults.inject(prefix, fault, times);
    }
    pub fn clear_faults(&self) {
        self.faults.clear();
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
