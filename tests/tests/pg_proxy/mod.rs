//! A TCP proxy between a store and the PostgreSQL server that can cut the
//! connection around one `COMMIT`, at an exact point of the protocol:
//! before the server gets it, or after the server answered it but before
//! the store hears the answer. It reads the messages it passes (a type
//! byte, then a length that counts itself), so it knows where it is.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Where to cut the connection that sends the next `COMMIT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The server never gets the `COMMIT`: it rolls the transaction back.
    BeforeCommit,
    /// The server commits and answers; the answer is lost.
    AfterCommit,
}

/// A running proxy; its threads live as long as the test process.
pub struct Proxy {
    url: String,
    shared: Arc<Shared>,
}

struct Shared {
    armed: Mutex<Option<Cut>>,
    cuts: AtomicUsize,
}

impl Proxy {
    /// Starts a proxy to the server of `url` (a TCP host and port).
    pub fn start(url: &str) -> Proxy {
        let config = tokio_postgres::Config::from_str(url).expect("a valid server URL");
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            other => panic!("the proxy needs a TCP server, not {other:?}"),
        };
        let upstream = format!(
            "{host}:{}",
            config.get_ports().first().copied().unwrap_or(5432)
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            armed: Mutex::new(None),
            cuts: AtomicUsize::new(0),
        });
        let accepting = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let client = client.unwrap();
                let server = TcpStream::connect(&upstream).unwrap();
                pump(client, server, accepting.clone());
            }
        });
        let mut url = format!("host=127.0.0.1 port={port}");
        if let Some(user) = config.get_user() {
            url.push_str(&format!(" user='{user}'"));
        }
        if let Some(password) = config.get_password() {
            url.push_str(&format!(
                " password='{}'",
                String::from_utf8_lossy(password)
            ));
        }
        if let Some(dbname) = config.get_dbname() {
            url.push_str(&format!(" dbname='{dbname}'"));
        }
        Proxy { url, shared }
    }

    /// The connection string of the server through the proxy.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Cuts the connection that sends the next `COMMIT`, as `cut` says.
    pub fn arm(&self, cut: Cut) {
        *self.shared.armed.lock().unwrap() = Some(cut);
    }

    /// How many connections were cut.
    pub fn cuts(&self) -> usize {
        self.shared.cuts.load(Ordering::SeqCst)
    }
}

/// Passes messages both ways between `client` and `server`, each way on a
/// thread of its own.
fn pump(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    // Set once the COMMIT whose answer is to be lost went through.
    let losing = Arc::new(AtomicBool::new(false));
    let clone = |s: &TcpStream| s.try_clone().unwrap();
    let (mut from_client, mut to_server) = (clone(&client), clone(&server));
    let (upstream_shared, upstream_losing) = (shared.clone(), losing.clone());
    std::thread::spawn(move || {
        // The startup message has no type byte; every later one has.
        let mut typed = false;
        while let Ok(message) = read_message(&mut from_client, typed) {
            typed = true;
            if message.kind == Some(b'Q') && message.body() == b"COMMIT\0" {
                let armed = upstream_shared.armed.lock().unwrap().take();
                match armed {
                    Some(Cut::BeforeCommit) => {
                        upstream_shared.cuts.fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    Some(Cut::AfterCommit) => upstream_losing.store(true, Ordering::SeqCst),
                    None => {}
                }
            }
            if to_server.write_all(&message.raw).is_err() {
                break;
            }
        }
        cut(&from_client, &to_server);
    });
    let (mut from_server, to_client) = (server, client);
    std::thread::spawn(move || {
        let mut to_client_writer = clone(&to_client);
        while let Ok(message) = read_message(&mut from_server, true) {
            if losing.load(Ordering::SeqCst)
                && message.kind == Some(b'C')
                && message.body() == b"COMMIT\0"
            {
                shared.cuts.fetch_add(1, Ordering::SeqCst);
                break;
            }
            if to_client_writer.write_all(&message.raw).is_err() {
                break;
            }
        }
        cut(&to_client, &from_server);
    });
}

/// Closes both ends of a proxied connection.
fn cut(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// One protocol message as read.
struct Message {
    kind: Option<u8>,
    /// The whole message, to pass on.
    raw: Vec<u8>,
}

impl Message {
    fn body(&self) -> &[u8] {
        &self.raw[if self.kind.is_some() { 5 } else { 4 }..]
    }
}

fn read_message(stream: &mut TcpStream, typed: bool) -> std::io::Result<Message> {
    let mut raw = Vec::new();
    let kind = if typed {
        let mut kind = [0u8; 1];
        stream.read_exact(&mut kind)?;
        raw.push(kind[0]);
        Some(kind[0])
    } else {
        None
    };
    let mut length = [0u8; 4];
    stream.read_exact(&mut length)?;
    raw.extend_from_slice(&length);
    let length = u32::from_be_bytes(length) as usize;
    let mut body = vec![0u8; length.saturating_sub(4)];
    stream.read_exact(&mut body)?;
    raw.extend_from_slice(&body);
    Ok(Message { kind, raw })
}
