#!/usr/bin/env python3
"""Minimal muvee control plane for `make bench`: answers register, config, an empty task
queue, completions and node metrics, and counts requests. Loopback only."""
import json, sys, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NODE = str(uuid.uuid4())
COUNT = {"n": 0}

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
        COUNT["n"] += 1
        if self.path.startswith("/api/agent/tasks"):
            self.reply([])
        elif self.path == "/api/agent/config":
            self.reply({"registry_addr": "127.0.0.1:5000"})
        else:
            self.reply({"status": "ok"})

    def do_POST(self):
        COUNT["n"] += 1
        n = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(n) or b"{}")
        if self.path == "/api/agent/register":
            body["id"] = NODE
            self.reply(body)
        else:
            self.reply({"status": "ok"})

srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
