//! The dev control plane (`examples/dev-cp`): today's build → deploy chain, the shapes of the
//! tasks it enqueues, the deployment rows it keeps, and its CLI.

use crate::fake_cp::{FakeCp, Version};
use crate::util;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SECRET: &str = "dev-cp-test-secret";

fn call(url: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let a: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let full = format!("{url}{path}");
    let mut res = match body {
        None => {
            assert_eq!(method, "GET");
            a.get(&full).header("X-Agent-Secret", SECRET).call()
        }
        Some(b) => a
            .post(&full)
            .header("X-Agent-Secret", SECRET)
            .header("Content-Type", "application/json")
            .send(b.as_bytes()),
    }
    .unwrap();
    let status = res.status().as_u16();
    (status, res.body_mut().read_to_string().unwrap())
}

fn json_of(url: &str, method: &str, path: &str, body: Option<&str>) -> Value {
    let (status, text) = call(url, method, path, body);
    assert_eq!(status, 200, "{method} {path}: {text}");
    serde_json::from_str(&text).unwrap()
}

/// Registers a node as the agent does; returns its id.
fn register(url: &str, host: &str, role: &str) -> String {
    let body = json!({"id": "00000000-0000-0000-0000-000000000000", "hostname": host,
        "role": role, "host_ip": "127.0.0.1", "max_storage_bytes": 1, "used_storage_bytes": 0,
        "last_seen_at": "0001-01-01T00:00:00Z", "created_at": "0001-01-01T00:00:00Z"});
    let v = json_of(url, "POST", "/api/agent/register", Some(&body.to_string()));
    v["id"].as_str().unwrap().to_string()
}

fn poll(url: &str, node: &str) -> Vec<Value> {
    let v = json_of(
        url,
        "GET",
        &format!("/api/agent/tasks?node_id={node}"),
        None,
    );
    v.as_array().unwrap().clone()
}

fn report(url: &str, task: &Value, body: Value) {
    let id = task["ID"].as_str().unwrap();
    let path = format!("/api/agent/tasks/{id}/complete");
    json_of(url, "POST", &path, Some(&body.to_string()));
}

fn deployment(cp: &FakeCp, id: &str) -> Value {
    let ds = cp.deployments();
    ds.into_iter().find(|d| d["id"] == id).unwrap()
}

#[test]
fn a_build_reported_running_then_completed_chains_into_a_deploy_on_the_deploy_node() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let url = cp.url();
    let builder = register(&url, "b1", "builder");
    let deployer = register(&url, "d1", "deploy");
    let dataset = json!([{"id": "d5d5d5d5-0000-4000-8000-00000000000d", "name": "words",
        "nfs_path": "words", "version": 2, "size_bytes": 10, "mount_mode": "dependency"}]);
    let out = json_of(
        &url,
        "POST",
        "/dev/build",
        Some(
            &json!({"git_url": "file:///repo", "domain_prefix": "app", "datasets": dataset,
                     "env_vars": {"GREETING": "hi"}, "container_port": 8080})
            .to_string(),
        ),
    );
    let dep = out["deployment_id"].as_str().unwrap().to_string();
    assert!(poll(&url, &deployer).is_empty());
    let tasks = poll(&url, &builder);
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let build = &tasks[0];
    // The poll row has today's server's shape: Go field names, in declaration order.
    let keys: Vec<&str> = build
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    let mut want = vec![
        "ID",
        "Type",
        "NodeID",
        "DeploymentID",
        "Payload",
        "PayloadJSON",
        "Status",
        "Result",
        "CreatedAt",
        "UpdatedAt",
    ];
    want.sort();
    let mut got = keys.clone();
    got.sort();
    assert_eq!(got, want);
    assert_eq!(build["Type"], "build");
    assert_eq!(build["NodeID"], builder.as_str());
    assert_eq!(build["DeploymentID"], dep.as_str());
    let p = &build["Payload"];
    assert_eq!(p["git_url"], "file:///repo");
    assert_eq!(p["git_branch"], "main");
    assert_eq!(p["dockerfile_path"], "Dockerfile");
    assert_eq!(p["deployment_id"], dep.as_str());
    assert_eq!(p["domain_prefix"], "app");
    assert_eq!(p["project_id"], out["project_id"]);

    report(&url, build, json!({"status": "running"}));
    assert_eq!(deployment(&cp, &dep)["status"], "building");
    let tag = "127.0.0.1:5000/p:abc";
    report(
        &url,
        build,
        json!({"status": "completed", "image_tag": tag}),
    );
    let build_id = build["ID"].as_str().unwrap();
    assert_eq!(
        cp.task_result(build_id),
        format!("{{\"image_tag\":\"{tag}\"}}")
    );
    cp.chain_now();
    assert_eq!(
        cp.task_result(build_id),
        format!("{{\"image_tag\":\"{tag}\"}}_dispatched")
    );
    cp.chain_now(); // dispatched once only
    let tasks = poll(&url, &deployer);
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let deploy = &tasks[0];
    assert_eq!(deploy["Type"], "deploy");
    assert_eq!(deploy["DeploymentID"], dep.as_str());
    let p = &deploy["Payload"];
    assert_eq!(p["image_tag"], tag);
    assert_eq!(p["datasets"], dataset);
    assert_eq!(p["env_vars"], json!({"GREETING": "hi"}));
    assert_eq!(p["container_port"], 8080);
    assert_eq!(p["domain_prefix"], "app");
    assert_eq!(p["auth_required"], false);
    assert_eq!(deployment(&cp, &dep)["status"], "deploying");

    report(&url, deploy, json!({"status": "running"}));
    report(
        &url,
        deploy,
        json!({"status": "completed", "host_port": 32768}),
    );
    let d = deployment(&cp, &dep);
    assert_eq!(
        (d["status"].as_str(), d["host_port"].as_i64()),
        (Some("running"), Some(32768))
    );

    // A redeploy of the same project stops the old deployment.
    let out2 = cp
        .enqueue(json!({"image_tag": tag, "domain_prefix": "app"}))
        .unwrap();
    assert_eq!(out2["project_id"], out["project_id"]);
    let t = poll(&url, &deployer);
    report(
        &url,
        &t[0],
        json!({"status": "completed", "host_port": 32769}),
    );
    assert_eq!(deployment(&cp, &dep)["status"], "stopped");
}

#[test]
fn a_build_never_reported_running_is_not_chained_and_failures_reach_the_log() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let url = cp.url();
    let builder = register(&url, "b1", "builder");
    let deployer = register(&url, "d1", "deploy");
    let out = cp.enqueue(json!({"git_url": "file:///r"})).unwrap();
    let dep = out["deployment_id"].as_str().unwrap();
    let build = poll(&url, &builder).remove(0);
    report(
        &url,
        &build,
        json!({"status": "completed", "image_tag": "x:1"}),
    );
    cp.chain_now();
    assert!(
        poll(&url, &deployer).is_empty(),
        "today's server needs `running` first"
    );
    assert_eq!(deployment(&cp, dep)["status"], "pending");

    let out = cp.enqueue(json!({"git_url": "file:///r"})).unwrap();
    let dep = out["deployment_id"].as_str().unwrap();
    let build = poll(&url, &builder).remove(0);
    report(&url, &build, json!({"status": "running"}));
    report(
        &url,
        &build,
        json!({"status": "failed", "result": "git clone: exit status 128"}),
    );
    assert_eq!(deployment(&cp, dep)["status"], "failed");
    assert_eq!(cp.logs(dep), b"git clone: exit status 128\n");

    // A deploy that reports no host port fails its deployment, as today's server does.
    let out = cp.enqueue(json!({"image_tag": "x:1"})).unwrap();
    let dep = out["deployment_id"].as_str().unwrap();
    let t = poll(&url, &deployer).remove(0);
    report(&url, &t, json!({"status": "completed"}));
    assert_eq!(deployment(&cp, dep)["status"], "failed");
    assert_eq!(
        cp.logs(dep),
        b"deploy completed but no host_port reported\n"
    );
    // Without a node of the role, enqueueing says so.
    let lone = FakeCp::start(Version::Today, SECRET);
    let e = lone.enqueue(json!({"git_url": "file:///r"})).unwrap_err();
    assert!(e.contains("no builder node"), "{e}");
}

/// The dev-cp binary, built if `cargo test --test integration` did not build the examples.
fn example_bin() -> PathBuf {
    let bin = util::bin().parent().unwrap().join("examples/dev-cp");
    if !bin.exists() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "--example", "dev-cp", "--quiet"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(st.success());
    }
    bin
}

/// `dev-cp serve` on a free port with `secret` and `args`; stopped when dropped.
pub struct DevCp {
    pub url: String,
    child: Child,
}

impl DevCp {
    pub fn serve(secret: &str, args: &[&str]) -> DevCp {
        let port_file = util::temp_dir("dev-cp").join("port");
        let child = Command::new(example_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--secret", secret])
            .args(args)
            .arg("--port-file")
            .arg(&port_file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut cp = DevCp {
            url: String::new(),
            child,
        };
        assert!(util::poll(10, || port_file.exists()));
        let port = std::fs::read_to_string(&port_file).unwrap();
        cp.url = format!("http://127.0.0.1:{}", port.trim());
        cp
    }

    /// Runs the CLI against this server: (success, stdout + stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(example_bin())
            .args(args)
            .env("DEV_CP_URL", &self.url)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

impl Drop for DevCp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_dev_cp_binary_serves_and_its_cli_enqueues_and_lists() {
    let server = DevCp::serve(SECRET, &["--registry", "r:5000"]);
    let url = server.url.clone();
    let cfg = json_of(&url, "GET", "/api/agent/config", None);
    assert_eq!(cfg["registry_addr"], "r:5000");
    let cli = |args: &[&str]| server.cli(args);
    let (ok, text) = cli(&["build", "file:///x"]);
    assert!(!ok && text.contains("no builder node registered"), "{text}");
    let builder = register(&url, "b1", "builder");
    let (ok, text) = cli(&[
        "build",
        "file:///x",
        "--prefix",
        "cli",
        "--dataset",
        "words=w@3",
    ]);
    assert!(ok, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let dep = v["deployment_id"].as_str().unwrap().to_string();
    let tasks = poll(&url, &builder);
    assert_eq!(tasks[0]["Payload"]["domain_prefix"], "cli");
    let (ok, text) = cli(&["tasks"]);
    assert!(
        ok && text.contains("build") && text.contains("pending"),
        "{text}"
    );
    let (ok, text) = cli(&["logs", &dep]);
    assert!(ok && text.is_empty(), "{text}");
    let (ok, text) = cli(&["stats"]);
    assert!(ok && text.contains("\"log_requests\": 0"), "{text}");
}
