//! A tiny git smart-HTTP server for the builder tests: Basic auth in front of
//! `git http-backend` run as CGI. Loopback only; one request per connection.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

pub struct GitHttp {
    port: u16,
    /// Every request as seen: (request line, Authorization header or "").
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

impl GitHttp {
    /// Serves the bare repos under `root` (URL path = path under root) to `user:pass` only.
    pub fn start(root: &Path, user: &str, pass: &str) -> GitHttp {
        GitHttp::start_views(&[(user, pass, root)])
    }

    /// One view per user: `user:pass` sees the repos under its own root at the same URLs.
    pub fn start_views(views: &[(&str, &str, &Path)]) -> GitHttp {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let views: Arc<Vec<View>> = Arc::new(
            views
                .iter()
                .map(|(user, pass, root)| View {
                    auth: format!(
                        "Basic {}",
                        crate::util::base64(format!("{user}:{pass}").as_bytes())
                    ),
                    user: user.to_string(),
                    root: root.to_path_buf(),
                })
                .collect(),
        );
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (views, seen) = (views.clone(), seen2.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &views, &seen);
                });
            }
        });
        GitHttp { port, seen }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<(String, String)> {
        self.seen.lock().unwrap().clone()
    }
}

struct View {
    auth: String,
    user: String,
    root: std::path::PathBuf,
}

fn serve(
    conn: TcpStream,
    views: &[View],
    seen: &Mutex<Vec<(String, String)>>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let request_line = line.trim_end().to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim_end().is_empty() {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let header = |k: &str| {
        headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let body = if header("transfer-encoding").eq_ignore_ascii_case("chunked") {
        read_chunked(&mut r)?
    } else {
        let n: usize = header("content-length").parse().unwrap_or(0);
        let mut b = vec![0; n];
        r.read_exact(&mut b)?;
        b
    };
    let auth = header("authorization");
    seen.lock()
        .unwrap()
        .push((request_line.clone(), auth.clone()));
    let mut out = conn;
    let Some(View { user, root, .. }) = views.iter().find(|v| v.auth == auth) else {
        return out.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or("GET");
    let target = parts.next().unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut cgi = Command::new("git")
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .env("REMOTE_USER", user)
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = cgi.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&body));
    let mut resp = Vec::new();
    cgi.stdout.take().unwrap().read_to_end(&mut resp)?;
    let _ = writer.join();
    cgi.wait()?;
    // CGI output: headers, a blank line, the body; `Status:` sets the HTTP status.
    let split = find(&resp, b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| find(&resp, b"\n\n").map(|i| (i, 2)))
        .unwrap_or((resp.len(), 0));
    let head = String::from_utf8_lossy(&resp[..split.0]).into_owned();
    let body = &resp[(split.0 + split.1).min(resp.len())..];
    let mut status = "200 OK".to_string();
    let mut hdrs = String::new();
    for h in head.lines() {
        match h.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("status") => status = v.trim().to_string(),
            Some(_) => hdrs.push_str(&format!("{h}\r\n")),
            None => {}
        }
    }
    write!(
        out,
        "HTTP/1.1 {status}\r\n{hdrs}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(body)
}

fn read_chunked(r: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        r.read_line(&mut size)?;
        let n =
            usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        let mut chunk = vec![0; n + 2]; // data + CRLF
        r.read_exact(&mut chunk)?;
        if n == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..n]);
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// Makes a bare repo at `bare` from `files` (path, content; a content starting with
/// "symlink:" makes a symlink) committed on `branch`, plus any `extra_branches` with one
/// more file. Returns the full HEAD sha.
pub fn make_repo(
    bare: &Path,
    branch: &str,
    files: &[(&str, &str)],
    extra_branches: &[&str],
) -> String {
    let work = bare.with_extension("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
            .args(args)
            .current_dir(&work)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {:?}", out);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    git(&["init", "-q", "-b", branch]);
    for (path, content) in files {
        let p = work.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        match content.strip_prefix("symlink:") {
            Some(target) => std::os::unix::fs::symlink(target, &p).unwrap(),
            None => std::fs::write(&p, content).unwrap(),
        }
    }
    git(&["add", "-A"]);
    git(&["commit", "-qm", "init"]);
    let head = git(&["rev-parse", "HEAD"]);
    for b in extra_branches {
        git(&["checkout", "-qb", b]);
        std::fs::write(work.join("branch.txt"), b).unwrap();
        git(&["add", "-A"]);
        git(&["commit", "-qm", b]);
        git(&["checkout", "-q", branch]);
    }
    let _ = std::fs::remove_dir_all(bare);
    let out = Command::new("git")
        .args(["clone", "-q", "--bare"])
        .arg(&work)
        .arg(bare)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let _ = std::fs::remove_dir_all(&work);
    head
}
