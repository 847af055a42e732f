//! A TCP proxy in front of the test registry, so the campaign can make "the registry" refuse
//! for a while without touching the shared one: the agents get its address as
//! `registry_addr`; the engine treats 127.0.0.0/8 as an insecure (plain HTTP) registry.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;

#[derive(Default)]
struct Inner {
    /// Refusals in force (overlapping faults each add one).
    refusing: AtomicUsize,
    stop: AtomicBool,
    /// Both sockets of each open connection, to cut them when refusing.
    conns: Mutex<HashMap<u64, [TcpStream; 2]>>,
    next: AtomicU64,
}

pub struct Proxy {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Proxy {
    pub fn start(upstream: &str) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner::default());
        let (i, up) = (inner.clone(), upstream.to_string());
        thread::Builder::new()
            .name("registry-proxy".into())
            .spawn(move || accept_loop(&listener, &i, &up))?;
        Ok(Proxy { addr, inner })
    }

    /// Starts refusing (new connections are reset, open ones cut) until as many `accept`.
    pub fn refuse(&self) {
        self.inner.refusing.fetch_add(1, SeqCst);
        for (_, pair) in self.inner.conns.lock().unwrap().drain() {
            for c in pair {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }
    pub fn accept(&self) {
        let _ = self
            .inner
            .refusing
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
    }

    pub fn accept_all(&self) {
        self.inner.refusing.store(0, SeqCst);
    }

    pub fn stop(&self) {
        self.inner.stop.store(true, SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the acceptor
        self.refuse();
    }
}

fn accept_loop(listener: &TcpListener, inner: &Arc<Inner>, upstream: &str) {
    for conn in listener.incoming() {
        if inner.stop.load(SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        if inner.refusing.load(SeqCst) > 0 {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect(upstream) else {
            continue;
        };
        let id = inner.next.fetch_add(1, SeqCst);
        if let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) {
            inner.conns.lock().unwrap().insert(id, [a, b]);
        }
        pipe(&client, &server, inner, id);
        pipe(&server, &client, inner, id);
    }
}

/// Copies `from` to `to` on a thread until either side closes.
fn pipe(from: &TcpStream, to: &TcpStream, inner: &Arc<Inner>, id: u64) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let inner = inner.clone();
    let _ = thread::Builder::new().spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
        inner.conns.lock().unwrap().remove(&id);
    });
}
