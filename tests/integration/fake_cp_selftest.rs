//! Self-test of the fake control plane: checks the wire shapes from
//! control-plane-protocol.md with a plain ureq 3 client, for both server versions.

use crate::fake_cp::{parse_uuid, FakeCp, Fault, Version};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const SECRET: &str = "s3cret-s3cret-s3cret-s3cret-s3cret";
const BOTH: [Version; 2] = [Version::March, Version::Today];

struct Resp {
    status: u16,
    ctype: String,
    nosniff: bool,
    body: String,
}

fn agent(timeout: Duration) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build();
    config.into()
}

fn call(
    cp: &FakeCp,
    method: &str,
    path: &str,
    secret: Option<&str>,
    body: Option<&str>,
) -> Result<Resp, ureq::Error> {
    let url = format!("{}{path}", cp.url());
    let a = agent(Duration::from_secs(5));
    let mut res = match body {
        None => {
            let mut req = a.get(&url);
            if let Some(s) = secret {
                req = req.header("X-Agent-Secret", s);
            }
            assert_eq!(method, "GET");
            req.call()?
        }
        Some(b) => {
            let mut req = a.post(&url).header("Content-Type", "application/json");
            if let Some(s) = secret {
                req = req.header("X-Agent-Secret", s);
            }
            req.send(b.as_bytes())?
        }
    };
    let hdr = |n: &str| {
        let v = res.headers().get(n);
        v.map(|v| v.to_str().unwrap().to_string())
    };
    let (ctype, nosniff) = (
        hdr("content-type").unwrap_or_default(),
        hdr("x-content-type-options"),
    );
    Ok(Resp {
        status: res.status().as_u16(),
        ctype,
        nosniff: nosniff.as_deref() == Some("nosniff"),
        body: res.body_mut().read_to_string()?,
    })
}

fn get(cp: &FakeCp, path: &str) -> Resp {
    call(cp, "GET", path, Some(SECRET), None).expect("GET")
}
fn post(cp: &FakeCp, path: &str, body: &str) -> Resp {
    call(cp, "POST", path, Some(SECRET), Some(body)).expect("POST")
}

fn assert_json(r: &Resp, status: u16, body: &str) {
    assert_eq!(
        (r.status, r.ctype.as_str(), r.body.as_str()),
        (status, "application/json", body)
    );
}

const REG: &str = r#"{"id":"00000000-0000-0000-0000-000000000000","hostname":"h1","role":"deploy","host_ip":"10.0.0.5","max_storage_bytes":107374182400,"used_storage_bytes":0,"last_seen_at":"0001-01-01T00:00:00Z","created_at":"0001-01-01T00:00:00Z"}"#;

fn register(cp: &FakeCp, hostname: &str, role: &str) -> (String, String) {
    let body = REG
        .replace("\"h1\"", &format!("{hostname:?}"))
        .replace("\"deploy\"", &format!("{role:?}"));
    let r = post(cp, "/api/agent/register", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    (v["id"].as_str().unwrap().to_string(), r.body)
}

#[test]
fn fake_cp_unauthorized_is_plain_text() {
    for v in BOTH {
        let cp = FakeCp::start(v, SECRET);
        for secret in [None, Some("wrong")] {
            let r = call(&cp, "GET", "/api/agent/config", secret, None).unwrap();
            assert_eq!(
                (r.status, r.ctype.as_str(), r.body.as_str()),
                (401, "text/plain; charset=utf-8", "unauthorized\n")
            );
            assert!(r.nosniff);
            let r = call(&cp, "POST", "/api/agent/register", secret, Some(REG)).unwrap();
            assert_eq!(r.status, 401);
        }
        assert_eq!(cp.register_count(), 0);
        assert!(cp.requests().iter().all(|r| !r.secret_ok));
        assert_eq!(get(&cp, "/api/agent/config").status, 200);
        assert!(cp.requests().last().unwrap().secret_ok);
    }
    // Empty server secret: March accepts everything, Today rejects everything.
    let march = FakeCp::start(Version::March, "");
    assert_eq!(
        call(&march, "GET", "/api/agent/config", None, None)
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        call(&march, "GET", "/api/agent/config", Some("x"), None)
            .unwrap()
            .status,
        200
    );
    let today = FakeCp::start(Version::Today, "");
    assert_eq!(
        call(&today, "GET", "/api/agent/config", None, None)
            .unwrap()
            .status,
        401
    );
    assert_eq!(
        call(&today, "GET", "/api/agent/config", Some(""), None)
            .unwrap()
            .status,
        401
    );
}

#[test]
fn fake_cp_non_api_paths_get_html() {
    for v in BOTH {
        let cp = FakeCp::start(v, SECRET);
        for path in ["//api/agent/config", "/", "/healthz", "/apps/x"] {
            let r = call(&cp, "GET", path, None, None).unwrap();
            assert_eq!(
                (r.status, r.ctype.as_str()),
                (200, "text/html; charset=utf-8"),
                "{path}"
            );
            assert!(r.body.starts_with("<!doctype html>"));
        }
        assert_eq!(cp.requests()[0].target, "//api/agent/config");
        let r = post(&cp, "//api/agent/register", REG);
        assert_eq!(
            (r.status, r.ctype.as_str()),
            (200, "text/html; charset=utf-8")
        );
        assert_eq!(cp.register_count(), 0);
        // Unknown API path: chi 404; wrong method: 405.
        let r = get(&cp, "/api/agent/nope");
        assert_eq!((r.status, r.body.as_str()), (404, "404 page not found\n"));
        assert_eq!(get(&cp, "/api/agent/register").status, 405);
    }
}

#[test]
fn fake_cp_register_upsert() {
    for v in BOTH {
        let cp = FakeCp::start(v, SECRET);
        let (id, body) = register(&cp, "h1", "deploy");
        assert!(parse_uuid(&id).is_ok() && id.as_bytes()[14] == b'4', "{id}");
        let prefix = format!(
            "{{\"id\":\"{id}\",\"hostname\":\"h1\",\"role\":\"deploy\",\"host_ip\":\"10.0.0.5\",\
             \"max_storage_bytes\":107374182400,\"used_storage_bytes\":0,\"last_seen_at\":\""
        );
        assert!(
            body.starts_with(&prefix) && body.ends_with("Z\"}\n"),
            "{body}"
        );
        let v1: Value = serde_json::from_str(&body).unwrap();
        let created = v1["created_at"].as_str().unwrap();
        assert!(
            created.starts_with("20") && created.ends_with('Z') && created.contains('.'),
            "{created}"
        );
        // Re-register: same id, created_at echoes the client's zero time.
        let (id2, body2) = register(&cp, "h1", "deploy");
        assert_eq!(id2, id);
        assert!(
            body2.ends_with(",\"created_at\":\"0001-01-01T00:00:00Z\"}\n"),
            "{body2}"
        );
        // Same hostname, other role: March updates the same row, Today inserts a new one.
        let (id3, _) = register(&cp, "h1", "builder");
        assert_eq!(id3 == id, v == Version::March);
        assert_eq!(cp.nodes().len(), if v == Version::March { 1 } else { 2 });
        assert_eq!(cp.register_count(), 3);
        assert_eq!(
            cp.node_id_for_role("builder").as_deref(),
            Some(id3.as_str())
        );
        // Bad role → 500 check constraint; bad JSON / types → 400.
        let r = post(
            &cp,
            "/api/agent/register",
            &REG.replace("\"deploy\"", "\"web\""),
        );
        let want = r#"{"error":"ERROR: new row for relation \"nodes\" violates check constraint \"nodes_role_check\" (SQLSTATE 23514)"}"#;
        assert_json(&r, 500, &format!("{want}\n"));
        for bad in [
            "{",
            "",
            "[1]",
            r#"{"hostname":5,"role":"deploy"}"#,
            r#"{"role":"deploy","id":"x"}"#,
        ] {
            let r = post(&cp, "/api/agent/register", bad);
            assert_eq!(
                (r.status, r.ctype.as_str()),
                (400, "application/json"),
                "{bad}: {}",
                r.body
            );
            assert!(r.body.starts_with("{\"error\":\"") && r.body.ends_with("\"}\n"));
        }
        // Go matches keys case-insensitively and ignores unknown ones.
        let r = post(
            &cp,
            "/api/agent/register",
            r#"{"Hostname":"h2","ROLE":"builder","extra":1}"#,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r
            .body
            .contains(r#""hostname":"h2","role":"builder","host_ip":"","max_storage_bytes":0"#));
    }
}

#[test]
fn fake_cp_config_map_sorted() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let r = get(&cp, "/api/agent/config");
    let want = r#"{"base_domain":"localhost","dataset_nfs_base_path":"","registry_addr":"localhost:5000","registry_password":"","registry_user":"","volume_nfs_base_path":""}"#;
    assert_json(&r, 200, &format!("{want}\n"));
    cp.set_config("registry_user", "muvee");
    cp.set_config("registry_password", "p<&>");
    let r = get(&cp, "/api/agent/config");
    assert!(
        r.body
            .contains(r#""registry_password":"p\u003c\u0026\u003e","registry_user":"muvee","#),
        "{}",
        r.body
    );
}

#[test]
fn fake_cp_poll_errors_and_unknown_nodes() {
    for v in BOTH {
        let cp = FakeCp::start(v, SECRET);
        let r = get(&cp, "/api/agent/tasks");
        assert_json(&r, 400, "{\"error\":\"invalid UUID length: 0\"}\n");
        let r = get(&cp, "/api/agent/tasks?node_id=abc");
        assert_json(&r, 400, "{\"error\":\"invalid UUID length: 3\"}\n");
        let r = get(
            &cp,
            "/api/agent/tasks?node_id=zzzzzzzz-0000-4000-8000-000000000000",
        );
        assert_json(&r, 400, "{\"error\":\"invalid UUID format\"}\n");
        let unknown = "5d1c2b3a-0e9f-4a8b-b7c6-d5e4f3a2b1c0";
        let r = get(&cp, &format!("/api/agent/tasks?node_id={unknown}"));
        match v {
            Version::March => assert_json(&r, 200, "[]\n"),
            Version::Today => assert_json(
                &r,
                500,
                &format!("{{\"error\":\"node {unknown} not found\"}}\n"),
            ),
        }
        let (id, _) = register(&cp, "h1", "deploy");
        assert_json(
            &get(&cp, &format!("/api/agent/tasks?node_id={id}")),
            200,
            "[]\n",
        );
        // Poll = heartbeat only on Today.
        let before = cp.last_seen(&id).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        get(
            &cp,
            &format!("/api/agent/tasks?node_id={}", id.to_uppercase()),
        );
        assert_eq!(cp.last_seen(&id).unwrap() > before, v == Version::Today);
        cp.forget_nodes();
        let r = get(&cp, &format!("/api/agent/tasks?node_id={id}"));
        match v {
            Version::March => assert_json(&r, 200, "[]\n"),
            Version::Today => {
                assert_json(&r, 500, &format!("{{\"error\":\"node {id} not found\"}}\n"))
            }
        }
    }
}

#[test]
fn fake_cp_poll_go_cased_tasks() {
    for v in BOTH {
        let cp = FakeCp::start(v, SECRET);
        let (node, _) = register(&cp, "b1", "builder");
        let dep = "c0ffee00-1234-4abc-9def-000000000001";
        let payload = json!({"git_url": "https://x/<r>.git", "git_branch": "main", "deployment_id": dep,
                             "tail": 200, "datasets": null, "env_vars": {"B": "2", "A": "1"}, "ok": true});
        let task = cp.add_task_for_role("builder", "build", dep, payload);
        let r = get(&cp, &format!("/api/agent/tasks?node_id={node}"));
        assert_eq!((r.status, r.ctype.as_str()), (200, "application/json"));
        let head = format!(
            "[{{\"ID\":\"{task}\",\"Type\":\"build\",\"NodeID\":\"{node}\",\"DeploymentID\":\"{dep}\",\
             \"Payload\":{{\"datasets\":null,\"deployment_id\":\"{dep}\",\"env_vars\":{{\"A\":\"1\",\"B\":\"2\"}},\
             \"git_branch\":\"main\",\"git_url\":\"https://x/\\u003cr\\u003e.git\",\"ok\":true,\"tail\":200}},\
             \"PayloadJSON\":\"{{\\\"ok\\\": true, \\\"tail\\\": 200, \\\"git_url\\\": \\\"https://x/\\u003cr\\u003e.git\\\", \
             \\\"datasets\\\": null, \\\"env_vars\\\": {{\\\"A\\\": \\\"1\\\", \\\"B\\\": \\\"2\\\"}}, \
             \\\"git_branch\\\": \\\"main\\\", \\\"deployment_id\\\": \\\"{dep}\\\"}}\",\
             \"Status\":\"pending\",\"Result\":\"\",\"CreatedAt\":\""
        );
        assert!(
            r.body.starts_with(&head),
            "\n got: {}\nwant: {head}",
            r.body
        );
        assert!(r.body.ends_with("Z\"}]\n"), "{}", r.body);
        let arr: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(arr[0]["CreatedAt"], arr[0]["UpdatedAt"]);
        let pj: Value = serde_json::from_str(arr[0]["PayloadJSON"].as_str().unwrap()).unwrap();
        assert_eq!(pj, arr[0]["Payload"]);
        // Up to 10, oldest first; running/completed/failed tasks are no longer returned.
        let ids: Vec<String> = (0..11)
            .map(|i| cp.add_task(&node, "cleanup", dep, json!({ "i": i })))
            .collect();
        let r = get(&cp, &format!("/api/agent/tasks?node_id={node}"));
        let got: Vec<Value> = serde_json::from_str(&r.body).unwrap();
        let got: Vec<&str> = got.iter().map(|t| t["ID"].as_str().unwrap()).collect();
        assert_eq!(got[0], task);
        assert_eq!(
            got[1..],
            ids[..9].iter().map(String::as_str).collect::<Vec<_>>()[..]
        );
        post(
            &cp,
            &format!("/api/agent/tasks/{task}/complete"),
            r#"{"status":"running"}"#,
        );
        post(
            &cp,
            &format!("/api/agent/tasks/{}/complete", ids[0]),
            r#"{"status":"pending"}"#,
        );
        let r = get(&cp, &format!("/api/agent/tasks?node_id={node}"));
        let got: Vec<Value> = serde_json::from_str(&r.body).unwrap();
        assert_eq!(got.len(), 10);
        assert_eq!(got[0]["ID"], ids[0].as_str());
        assert_eq!(got[9]["ID"], ids[9].as_str());
    }
}

#[test]
fn fake_cp_complete() {
    for v in BOTH {
        let cp = FakeCp::start(v, SECRET);
        let (node, _) = register(&cp, "b1", "builder");
        let t = cp.add_task(
            &node,
            "build",
            "c0ffee00-1234-4abc-9def-000000000001",
            json!({}),
        );
        let path = format!("/api/agent/tasks/{t}/complete");
        assert_json(
            &post(&cp, &path, r#"{"status":"running"}"#),
            200,
            "{\"status\":\"ok\"}\n",
        );
        assert_eq!(cp.task_status(&t), "running");
        let r = post(&cp, &path, r#"{"status":"bogus"}"#);
        let want = r#"{"error":"ERROR: new row for relation \"tasks\" violates check constraint \"tasks_status_check\" (SQLSTATE 23514)"}"#;
        assert_json(&r, 500, &format!("{want}\n"));
        assert_eq!(post(&cp, &path, r#"{"status":"#).status, 400);
        assert_eq!(
            post(&cp, &path, r#"{"status":"completed","host_port":"x"}"#).status,
            400
        );
        let done = r#"{"image_tag":"reg/p:abc","status":"completed"}"#;
        assert_json(&post(&cp, &path, done), 200, "{\"status\":\"ok\"}\n");
        assert_eq!(cp.task_status(&t), "completed");
        let want_result = if v == Version::Today {
            r#"{"image_tag":"reg/p:abc"}"#
        } else {
            ""
        };
        assert_eq!(cp.task_result(&t), want_result);
        let raw = cp.completion_bodies_raw(&t);
        assert_eq!(raw.len(), 5);
        assert_eq!(raw[0], br#"{"status":"running"}"#);
        assert_eq!(raw[4], done.as_bytes());
        let parsed = cp.completions(&t);
        assert_eq!(parsed[0], json!({"status": "running"}));
        assert_eq!(parsed[2], Value::Null);
        assert_eq!(parsed[4]["image_tag"], "reg/p:abc");
        // Failure result is stored verbatim.
        let t2 = cp.add_task(&node, "build", "", json!({}));
        post(
            &cp,
            &format!("/api/agent/tasks/{t2}/complete"),
            r#"{"result":"boom","status":"failed"}"#,
        );
        assert_eq!(
            (cp.task_status(&t2), cp.task_result(&t2)),
            ("failed".into(), "boom".into())
        );
        // A NUL in a text column: today's server answers 500 and keeps nothing.
        let r = post(
            &cp,
            &format!("/api/agent/tasks/{t2}/complete"),
            r#"{"result":"a\u0000b","status":"failed"}"#,
        );
        if v == Version::Today {
            let want = r#"{"error":"ERROR: invalid byte sequence for encoding \"UTF8\": 0x00 (SQLSTATE 22021)"}"#;
            assert_json(&r, 500, &format!("{want}\n"));
            assert_eq!(cp.task_result(&t2), "boom");
            let logs = format!(
                "/api/deployments/{}/logs",
                "c0ffee00-1234-4abc-9def-000000000001"
            );
            assert_json(
                &post(&cp, &logs, r#"{"line":"x\u0000"}"#),
                500,
                &format!("{want}\n"),
            );
        }
        // Unknown id → 200; malformed id → Today 400, March 200.
        let r = post(
            &cp,
            "/api/agent/tasks/9b2e7c40-1d7a-4f0e-8c55-6a0f3e2d9b10/complete",
            r#"{"status":"bogus"}"#,
        );
        assert_json(&r, 200, "{\"status\":\"ok\"}\n");
        let r = post(
            &cp,
            "/api/agent/tasks/abc/complete",
            r#"{"status":"completed"}"#,
        );
        match v {
            Version::March => assert_json(&r, 200, "{\"status\":\"ok\"}\n"),
            Version::Today => assert_json(
                &r,
                400,
                "{\"error\":\"invalid id \\\"abc\\\": invalid UUID length: 3\"}\n",
            ),
        }
    }
}

#[test]
fn fake_cp_logs_health_metrics() {
    let dep = "c0ffee00-1234-4abc-9def-000000000001";
    let logs = format!("/api/deployments/{dep}/logs");
    let march = FakeCp::start(Version::March, SECRET);
    for (path, body) in [
        (logs.as_str(), r#"{"line":"x"}"#),
        ("/api/agent/health-report?node_id=x", "[]"),
    ] {
        let r = post(&march, path, body);
        assert_eq!(
            (r.status, r.ctype.as_str(), r.body.as_str()),
            (404, "text/plain; charset=utf-8", "404 page not found\n")
        );
    }
    assert!(march.logs(dep).is_empty());

    let today = FakeCp::start(Version::Today, SECRET);
    assert_json(
        &post(&today, &logs, r##"{"line":"#5 [2/4] RUN npm ci"}"##),
        200,
        "{\"status\":\"ok\"}\n",
    );
    post(&today, &logs, r#"{"line":"a\nb"}"#);
    assert_eq!(
        today.logs(&dep.to_uppercase()),
        b"#5 [2/4] RUN npm ci\na\nb\n"
    );
    assert_eq!(
        call(&today, "POST", &logs, None, Some(r#"{"line":"x"}"#))
            .unwrap()
            .status,
        401
    );
    assert_eq!(
        post(&today, "/api/deployments/abc/logs", r#"{"line":"x"}"#).status,
        400
    );
    let (node, _) = register(&today, "d1", "deploy");
    let r = post(
        &today,
        &format!("/api/agent/health-report?node_id={node}"),
        r#"[{"name":"docker","status":"ok","message":"27"}]"#,
    );
    assert_eq!((r.status, r.body.as_str()), (204, ""));
    assert_eq!(today.nodes()[0]["health_report"][0]["name"], "docker");
    let r = post(&today, "/api/agent/health-report?node_id=x", "[]");
    assert_json(&r, 400, "{\"error\":\"invalid node_id\"}\n");

    for cp in [&march, &today] {
        let nm = format!(r#"{{"node_id":"{node}","cpu_percent":12.5,"load1":0.4}}"#);
        assert_json(
            &post(cp, "/api/agent/node-metrics", &nm),
            200,
            "{\"status\":\"ok\"}\n",
        );
        assert_json(
            &post(cp, "/api/agent/node-metrics", r#"{"node_id":"x"}"#),
            400,
            "{\"error\":\"invalid node_id\"}\n",
        );
        let st = r#"[{"domain_prefix":"myapp","restart_count":0,"oom_killed":false}]"#;
        assert_json(
            &post(cp, "/api/agent/container-statuses", st),
            200,
            "{\"status\":\"ok\"}\n",
        );
        assert_json(
            &post(cp, "/api/agent/container-metrics", "[]"),
            200,
            "{\"status\":\"ok\"}\n",
        );
        assert_eq!(post(cp, "/api/agent/container-metrics", "{}").status, 400);
        // Element fields are decoded into Go types, as both servers do.
        let m = r#"[{"domain_prefix":"myapp","cpu_percent":1.37,"mem_usage_bytes":52428800,"mem_limit_bytes":4294967296,"net_rx_bytes":1200000,"net_tx_bytes":345000,"block_read_bytes":0,"block_write_bytes":4096},null]"#;
        assert_json(
            &post(cp, "/api/agent/container-metrics", m),
            200,
            "{\"status\":\"ok\"}\n",
        );
        assert_eq!(
            cp.posted("/api/agent/container-metrics").last().unwrap()[0]["cpu_percent"],
            1.37
        );
        for (path, bad, err) in [
            (
                "container-metrics",
                r#"[{"mem_usage_bytes":1.5}]"#,
                "containerMetric.mem_usage_bytes of type int64",
            ),
            (
                "container-metrics",
                r#"[{"cpu_percent":"1%"}]"#,
                "containerMetric.cpu_percent of type float64",
            ),
            (
                "container-metrics",
                r#"["x"]"#,
                "Go value of type api.containerMetric",
            ),
            (
                "container-statuses",
                r#"[{"oom_killed":"no"}]"#,
                "containerStatus.oom_killed of type bool",
            ),
            (
                "container-statuses",
                r#"[{"host_port":"80"}]"#,
                "containerStatus.host_port of type int64",
            ),
        ] {
            let r = post(cp, &format!("/api/agent/{path}"), bad);
            assert_eq!(r.status, 400, "{bad}");
            assert!(r.body.contains(err), "{bad}: {}", r.body);
        }
        assert_eq!(cp.posted("/api/agent/node-metrics")[0]["cpu_percent"], 12.5);
        assert_eq!(
            cp.posted("/api/agent/container-statuses")[0][0]["domain_prefix"],
            "myapp"
        );
    }
}

#[test]
fn fake_cp_faults() {
    let cp = FakeCp::start(Version::Today, SECRET);
    cp.inject(
        "/api/agent/config",
        Fault::Status(503, "text/plain", "busy".into()),
        2,
    );
    cp.inject("/api/agent/config", Fault::Html, 1);
    cp.inject("/api/agent/config", Fault::Garbage, 1);
    let statuses: Vec<(u16, String)> = (0..5)
        .map(|_| get(&cp, "/api/agent/config"))
        .map(|r| (r.status, r.ctype))
        .collect();
    let ct = |s: &str| s.to_string();
    assert_eq!(
        statuses,
        [
            (503, ct("text/plain")),
            (503, ct("text/plain")),
            (200, ct("text/html; charset=utf-8")),
            (200, ct("application/json")),
            (200, ct("application/json"))
        ]
    );
    assert!(serde_json::from_str::<Value>(&get(&cp, "/api/agent/config").body).is_ok());
    // Prefix "" matches everything; faulted requests are still recorded.
    cp.inject("", Fault::Reset, 1);
    assert!(call(&cp, "GET", "/api/agent/config", Some(SECRET), None).is_err());
    let last = cp.requests().pop().unwrap();
    assert_eq!((last.fault.as_deref(), last.status), (Some("reset"), None));
    // Hang: the client times out; the request is handled after the delay.
    let (node, _) = register(&cp, "d1", "deploy");
    let t = cp.add_task(&node, "deploy", "", json!({}));
    cp.inject("/api/agent/tasks/", Fault::Hang(Duration::from_secs(6)), 1);
    let url = format!("{}/api/agent/tasks/{t}/complete", cp.url());
    let start = Instant::now();
    let res = agent(Duration::from_secs(1))
        .post(&url)
        .header("X-Agent-Secret", SECRET)
        .send(r#"{"status":"running"}"#);
    assert!(res.is_err() && start.elapsed() < Duration::from_secs(5));
    assert_eq!(cp.task_status(&t), "pending");
    cp.wait_for("hung completion", Duration::from_secs(10), |cp| {
        cp.task_status(&t) == "running"
    });
    // wait_for panics with a dump of recent requests.
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cp.wait_for("never", Duration::from_millis(100), |_| false);
    }))
    .unwrap_err();
    let msg = err.downcast_ref::<String>().unwrap();
    assert!(
        msg.contains("waiting for never") && msg.contains("POST /api/agent/tasks/"),
        "{msg}"
    );
}

#[test]
fn fake_cp_down_and_up_keep_port_and_state() {
    let cp = FakeCp::start(Version::Today, SECRET);
    let url = cp.url();
    let (node, _) = register(&cp, "d1", "deploy");
    let pooled = agent(Duration::from_secs(2));
    let cfg = format!("{url}/api/agent/config");
    assert_eq!(
        pooled
            .get(&cfg)
            .header("X-Agent-Secret", SECRET)
            .call()
            .unwrap()
            .status(),
        200
    );
    cp.go_down();
    assert!(TcpStream::connect(url.trim_start_matches("http://")).is_err());
    assert!(call(&cp, "GET", "/api/agent/config", Some(SECRET), None).is_err());
    cp.come_up();
    assert_eq!(cp.url(), url);
    let r = get(&cp, &format!("/api/agent/tasks?node_id={node}"));
    assert_json(&r, 200, "[]\n");
    // A client that pooled a connection from before the outage recovers (at worst after one error).
    let ok = (0..2).any(|_| {
        pooled
            .get(&cfg)
            .header("X-Agent-Secret", SECRET)
            .call()
            .is_ok_and(|r| r.status() == 200)
    });
    assert!(ok);
    let addr = url.trim_start_matches("http://").to_string();
    drop(cp);
    assert!(
        TcpStream::connect(&addr).is_err(),
        "listener closed on drop"
    );
}

#[test]
fn fake_cp_keep_alive_and_chunked() {
    let cp = FakeCp::start(Version::March, "");
    let mut s = TcpStream::connect(cp.url().trim_start_matches("http://")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let reg = REG.replace("\"h1\"", "\"h9\"");
    let req = format!(
        "GET /api/agent/config HTTP/1.1\r\nHost: x\r\n\r\n\
         POST /api/agent/register HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{reg}\r\n0\r\n\r\n\
         GET /api/agent/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        reg.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{out}");
    assert!(out.contains("\"hostname\":\"h9\""));
    assert!(
        out.ends_with("\"volume_nfs_base_path\":\"\"}\n") && out.contains("Connection: close\r\n")
    );
    assert_eq!(cp.nodes()[0]["hostname"], "h9");
}

/// Today's control channel (§1.10): 401, 400 and 404 before any upgrade; `hello` with the
/// node id, `pong` for `ping`, frames both ways; a newer connection of the node closes the
/// older one; the test hooks refuse upgrades or say hello and close.
#[test]
fn fake_cp_control_channel() {
    use crate::fake_cp::Upgrade;
    use tungstenite::client::IntoClientRequest;
    use tungstenite::Message;
    let node = "0b0e1c2d-0000-4000-8000-00000000c0de";
    let path = format!("/api/agent/control?node_id={node}");
    let march = FakeCp::start(Version::March, SECRET);
    let r = call(&march, "GET", &path, Some(SECRET), None).unwrap();
    assert_eq!((r.status, r.body.as_str()), (404, "404 page not found\n"));
    let cp = FakeCp::start(Version::Today, SECRET);
    assert_eq!(
        call(&cp, "GET", &path, Some("wrong"), None).unwrap().status,
        401
    );
    let r = call(
        &cp,
        "GET",
        "/api/agent/control?node_id=nope",
        Some(SECRET),
        None,
    )
    .unwrap();
    assert_eq!((r.status, r.body.as_str()), (400, "invalid node_id\n"));
    assert_eq!(
        call(&cp, "GET", &path, Some(SECRET), None).unwrap().status,
        400
    );

    // Err: the status of a refused upgrade.
    let dial = || -> Result<tungstenite::WebSocket<TcpStream>, u16> {
        let url = format!("ws://127.0.0.1:{}{path}", cp.port());
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("X-Agent-Secret", SECRET.parse().unwrap());
        let s = TcpStream::connect(("127.0.0.1", cp.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match tungstenite::client(req, s) {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                Err(r.status().as_u16())
            }
            Err(e) => panic!("handshake: {e}"),
        }
    };
    let text = |ws: &mut tungstenite::WebSocket<TcpStream>| -> Value {
        match ws.read().unwrap() {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            m => panic!("not a text frame: {m:?}"),
        }
    };
    let mut ws = dial().unwrap();
    assert_eq!(text(&mut ws), json!({"type": "hello", "node_id": node}));
    let server = cp.control().accept(Duration::from_secs(5)).unwrap();
    assert_eq!((server.node_id(), server.target()), (node, path.as_str()));
    ws.send(Message::text(r#"{"type":"ping"}"#)).unwrap();
    assert_eq!(text(&mut ws), json!({"type": "pong"}));
    let exit = json!({"type": "exit", "session": "s1", "code": 2});
    ws.send(Message::text(exit.to_string())).unwrap();
    assert_eq!(server.recv(Duration::from_secs(5)), Some(exit));
    server.resize("s1", 80, 24).unwrap();
    let resize = json!({"type": "resize", "session": "s1", "cols": 80, "rows": 24});
    assert_eq!(text(&mut ws), resize);

    // A newer connection of the node closes the older one.
    let mut newer = dial().unwrap();
    assert_eq!(text(&mut newer)["type"], "hello");
    assert!(
        ws.read().is_err() || ws.read().is_err(),
        "the older one is closed"
    );
    assert_eq!(server.recv(Duration::from_secs(5)), None);
    assert!(server.is_closed());

    cp.control().set_upgrade(Upgrade::Refuse(503));
    assert_eq!(dial().err(), Some(503));
    cp.control().set_upgrade(Upgrade::HelloThenClose);
    let mut ws = dial().unwrap();
    assert_eq!(text(&mut ws)["type"], "hello");
    assert!(matches!(ws.read(), Ok(Message::Close(_))));
    let statuses: Vec<Option<u16>> = cp
        .requests_to("/api/agent/control")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(
        statuses,
        [
            Some(401),
            Some(400),
            Some(400),
            Some(101),
            Some(101),
            Some(503),
            Some(101)
        ]
    );
}
