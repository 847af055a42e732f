#!/usr/bin/env python3
"""Minimal muvee control plane for `make bench`: answers register, config, the task queue,
completions, node metrics and deployment logs, and counts what it got. Loopback only.
Bench-only routes: POST /bench/enqueue (a task's type, deployment id and payload) and
GET /bench/stats. BENCH_CP_LOG_DELAY_MS makes every log request take that long."""
import json, os, sys, threading, time, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NODE = str(uuid.uuid4())
DELAY = int(os.environ.get("BENCH_CP_LOG_DELAY_MS", "0")) / 1000.0
LOCK = threading.Lock()
STATE = {"requests": 0, "log_requests": 0, "log_bytes": 0, "log_lines": 0,
         "queue": [], "reports": {}}

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One write per response (flushed after each request), as Go's net/http does for small
    # bodies: headers and body in two writes meet Nagle and the client's delayed ACK, a 40 ms
    # stall and an extra wake-up per call that no real control plane causes.
    wbufsize = -1

    def log_message(self, *a):
        pass

    def reply(self, obj):
        body = (json.dumps(obj) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with LOCK:
            STATE["requests"] += 1
            if self.path.startswith("/api/agent/tasks"):
                tasks, STATE["queue"] = STATE["queue"], []
                return self.reply(tasks)
            if self.path == "/bench/stats":
                return self.reply({k: v for k, v in STATE.items() if k != "queue"})
        if self.path == "/api/agent/config":
            self.reply({"registry_addr": os.environ.get("BENCH_CP_REGISTRY", "127.0.0.1:5000")})
        else:
            self.reply({"status": "ok"})

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(n) or b"{}"
        body = json.loads(raw)
        if "/logs" in self.path and DELAY:
            time.sleep(DELAY)
        with LOCK:
            STATE["requests"] += 1
            if self.path == "/api/agent/register":
                body["id"] = NODE
            elif self.path == "/bench/enqueue":
                task = {"ID": str(uuid.uuid4()), "Type": body["type"], "NodeID": NODE,
                        "DeploymentID": body.get("deployment_id", ""), "Payload": body["payload"]}
                STATE["queue"].append(task)
                return self.reply({"id": task["ID"]})
            elif self.path.endswith("/complete"):
                tid = self.path.split("/")[4]
                STATE["reports"].setdefault(tid, []).append(body.get("status"))
            elif "/logs" in self.path:
                STATE["log_requests"] += 1
                STATE["log_bytes"] += len(raw)
                STATE["log_lines"] += body.get("line", "").count("\n") + 1
        self.reply(body if self.path == "/api/agent/register" else {"status": "ok"})

srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
