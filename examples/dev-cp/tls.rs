//! An https front for the dev control plane: accepts TLS (rustls with ring, as the agent) on
//! its own port and relays the plain bytes of each connection to a plain server (dev-cp's
//! HTTP and WebSocket endpoints, or a test's), so an agent can run against an `https://`
//! control plane and its `wss://` control channel. `dev-cp serve --tls-cert --tls-key` and the
//! integration tests use it; the certificate comes from the caller (a test makes a CA).
#![allow(dead_code)]

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;

pub struct TlsFront {
    pub port: u16,
}

impl TlsFront {
    /// Serves TLS with `chain` (leaf first) and `key` on 127.0.0.1 (`listen`, or an ephemeral
    /// port), relaying each connection to `backend` (`host:port`).
    pub fn start(
        listen: &str,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        backend: String,
    ) -> Result<TlsFront, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::ALL_VERSIONS)
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("TLS certificate: {e}"))?;
        let config = Arc::new(config);
        let l = TcpListener::bind(listen).map_err(|e| format!("listen on {listen}: {e}"))?;
        let port = l.local_addr().map_err(|e| e.to_string())?.port();
        std::thread::spawn(move || {
            for tcp in l.incoming().flatten() {
                let (config, backend) = (config.clone(), backend.clone());
                std::thread::spawn(move || {
                    if let Ok(conn) = rustls::ServerConnection::new(config) {
                        if let Ok(back) = TcpStream::connect(&backend) {
                            let _ = relay(conn, tcp, back);
                        }
                    }
                });
            }
        });
        Ok(TlsFront { port })
    }
}

/// Copies between the TLS client and the plain backend until either side ends. Blocking
/// sockets; poll(2) says which side has bytes. Plaintext rustls already holds (it can come
/// with the handshake's last flight) goes to the backend before any wait.
fn relay(
    mut conn: rustls::ServerConnection,
    mut tcp: TcpStream,
    mut back: TcpStream,
) -> std::io::Result<()> {
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)?;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        loop {
            match conn.reader().read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => back.write_all(&buf[..n])?,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        while conn.wants_write() {
            conn.write_tls(&mut tcp)?;
        }
        let mut fds = [
            libc::pollfd {
                fd: tcp.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: back.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll writes only the revents of the two pollfds we own.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            if conn.read_tls(&mut tcp)? == 0 {
                return Ok(());
            }
            conn.process_new_packets()
                .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, e))?;
        }
        if fds[1].revents != 0 {
            let n = back.read(&mut buf)?;
            if n == 0 {
                conn.send_close_notify();
                let _ = conn.write_tls(&mut tcp);
                return Ok(());
            }
            conn.writer().write_all(&buf[..n])?;
        }
    }
}
