//! Name resolution for the control-plane client without a thread per request. ureq's default
//! resolver runs every lookup on a new thread once a timeout is set, and it resolves before
//! looking for a pooled connection, so every call paid for a thread and a lookup. Here an IP
//! literal needs no lookup; a name is looked up on one long-lived thread (a one-off thread
//! only while that one is busy, e.g. stuck on a slow DNS server) and the answer is reused for
//! a short while. The request's timeout still bounds the wait.

use crate::sys::wait::Mailbox;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// How long a looked-up answer is reused (Java's default): a control plane that moved is found
/// again within this long, and an idle agent does not ask DNS at every poll.
const REMEMBER: Duration = Duration::from_secs(30);

type Answer = io::Result<Vec<SocketAddr>>;
/// A name to look up, and where its answer goes.
type Job = (String, Arc<Mailbox<Answer>>);

/// The lookup thread's jobs; dropping it (with the client) ends the thread.
struct Worker(Arc<Mailbox<Job>>);

impl Drop for Worker {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Worker")
    }
}

#[derive(Debug, Default)]
pub struct Lookups {
    worker: Mutex<Option<Worker>>,
    busy: Arc<AtomicBool>,
    /// The last answer: the client talks to one host.
    last: Mutex<Option<(String, Instant, Vec<SocketAddr>)>>,
}

impl Resolver for Lookups {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let addr = uri
            .scheme()
            .zip(uri.authority())
            .and_then(|(s, a)| DefaultResolver::host_and_port(s, a))
            .ok_or_else(|| ureq::Error::BadUri(uri.to_string()))?;
        let found = match addr.parse::<SocketAddr>() {
            Ok(a) => vec![a],
            Err(_) if timeout.after.is_not_happening() => addr.to_socket_addrs()?.collect(),
            Err(_) => self.remembered(addr, timeout)?,
        };
        let mut out = self.empty();
        for a in config.ip_family().keep_wanted(found.into_iter()).take(16) {
            out.push(a);
        }
        if out.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        Ok(out)
    }
}

impl Lookups {
    fn remembered(
        &self,
        addr: String,
        timeout: NextTimeout,
    ) -> Result<Vec<SocketAddr>, ureq::Error> {
        if let Some((name, at, found)) = &*self.last.lock().unwrap_or_else(|e| e.into_inner()) {
            if *name == addr && at.elapsed() < REMEMBER {
                return Ok(found.clone());
            }
        }
        let found = self.lookup(addr.clone(), timeout)?;
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((addr, Instant::now(), found.clone()));
        Ok(found)
    }

    fn lookup(&self, addr: String, timeout: NextTimeout) -> Result<Vec<SocketAddr>, ureq::Error> {
        let reply = Arc::new(Mailbox::default());
        let job = (addr, reply.clone());
        if self.busy.swap(true, Ordering::SeqCst) {
            std::thread::spawn(move || answer(job));
        } else if let Err(e) = self.hand_to_worker(job) {
            self.busy.store(false, Ordering::SeqCst);
            return Err(e.into());
        }
        match reply.recv(Instant::now().checked_add(*timeout.after)) {
            Some(found) => Ok(found?),
            None => Err(ureq::Error::Timeout(timeout.reason)),
        }
    }

    /// Sends the job to the lookup thread, starting it first if there is none.
    fn hand_to_worker(&self, job: Job) -> io::Result<()> {
        let mut worker = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = worker.as_ref() {
            // Only a closed mailbox refuses, and only dropping the worker closes it.
            return w
                .0
                .send(job)
                .map_err(|_| io::Error::other("the lookup thread is gone"));
        }
        let jobs = Arc::new(Mailbox::<Job>::default());
        let (rx, busy) = (jobs.clone(), self.busy.clone());
        std::thread::Builder::new()
            .name("lookup".into())
            .spawn(move || {
                while let Some((addr, reply)) = rx.recv(None) {
                    let found = addr.to_socket_addrs().map(|a| a.collect());
                    // Free before answering, so the caller's next lookup finds it free.
                    busy.store(false, Ordering::SeqCst);
                    let _ = reply.send(found);
                }
            })?;
        let _ = jobs.send(job);
        *worker = Some(Worker(jobs));
        Ok(())
    }
}

fn answer((addr, reply): Job) {
    let _ = reply.send(addr.to_socket_addrs().map(|a| a.collect()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(l: &Lookups, url: &str) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let uri: Uri = url.parse().unwrap();
        let t = NextTimeout {
            after: Duration::from_secs(5).into(),
            reason: ureq::Timeout::Global,
            per_read: None,
            per_write: None,
        };
        l.resolve(&uri, &Config::default(), t)
    }

    #[test]
    fn literals_need_no_thread_and_names_reuse_one() {
        let l = Lookups::default();
        let a = resolve(&l, "http://127.0.0.1:8080/api").unwrap();
        assert_eq!(a[0], "127.0.0.1:8080".parse().unwrap());
        assert_eq!(resolve(&l, "http://[::1]/").unwrap()[0].port(), 80);
        assert!(l.worker.lock().unwrap().is_none());
        let a = resolve(&l, "http://localhost:9/").unwrap();
        assert!(a.iter().all(|a| a.port() == 9 && a.ip().is_loopback()));
        assert!(l.worker.lock().unwrap().is_some());
        // Answered from memory: the lookup thread is not asked again.
        *l.worker.lock().unwrap() = None;
        assert_eq!(resolve(&l, "http://localhost:9/").unwrap(), a);
        assert!(l.worker.lock().unwrap().is_none());
        // Another name is looked up, on a new lookup thread.
        assert_eq!(resolve(&l, "http://localhost:10/").unwrap()[0].port(), 10);
        assert!(l.worker.lock().unwrap().is_some());
    }
}
