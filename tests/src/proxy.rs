//! A fault-injecting TCP proxy for tests: forwards connections from a loopback port to a
//! target; `cut` closes every connection and refuses new ones until `heal`; `silence`
//! stops every open connection for good without closing it (no FIN, no RST: a dead
//! path nobody is told about) and holds new ones unanswered until `heal`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<Conn>>>,
}

/// One side of a forwarded connection and the flag that stalls its pumps.
struct Conn {
    stream: TcpStream,
    stalled: Arc<AtomicBool>,
}

impl Proxy {
    /// A proxy on a free loopback port to `target` (which need not listen yet).
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy port");
        let port = listener.local_addr().expect("proxy addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let silent = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let (c, q, k) = (cut.clone(), silent.clone(), conns.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                if c.load(Ordering::SeqCst) {
                    // Refused while cut: close at once.
                    inbound.shutdown(Shutdown::Both).ok();
                    continue;
                }
                if q.load(Ordering::SeqCst) {
                    // Silent: accepted, never answered, never closed.
                    held.push(inbound);
                    continue;
                }
                let Ok(outbound) = TcpStream::connect(target) else {
                    inbound.shutdown(Shutdown::Both).ok();
                    continue;
                };
                inbound.set_nodelay(true).ok();
                outbound.set_nodelay(true).ok();
                let stalled = Arc::new(AtomicBool::new(false));
                let mut list = k.lock().unwrap_or_else(|e| e.into_inner());
                for s in [&inbound, &outbound] {
                    if let Ok(stream) = s.try_clone() {
                        list.push(Conn {
                            stream,
                            stalled: stalled.clone(),
                        });
                    }
                }
                drop(list);
                pump(&inbound, &outbound, stalled.clone());
                pump(&outbound, &inbound, stalled);
            }
        });
        Proxy {
            port,
            cut,
            silent,
            conns,
        }
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let mut list = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for c in list.drain(..) {
            c.stream.shutdown(Shutdown::Both).ok();
        }
    }

    /// Stops forwarding on every open connection for good, telling neither side, and
    /// holds new connections unanswered until `heal`.
    pub fn silence(&self) {
        self.silent.store(true, Ordering::SeqCst);
        let mut list = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for c in list.drain(..) {
            // The pumps keep their own handles open; this one is no longer needed.
            c.stalled.store(true, Ordering::SeqCst);
        }
    }

    /// Accepts and forwards new connections again (silenced ones stay dead).
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.silent.store(false, Ordering::SeqCst);
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Copies bytes from `from` to `to` on a thread until either side closes; once
/// `stalled`, stops copying and keeps both sockets open.
fn pump(from: &TcpStream, to: &TcpStream, stalled: Arc<AtomicBool>) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let read = from.read(&mut buf);
            if stalled.load(Ordering::SeqCst) {
                // A dead path: nothing forwarded, and neither side ever told (not even
                // when the other side closes).
                std::mem::forget(from);
                std::mem::forget(to);
                return;
            }
            match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        to.shutdown(Shutdown::Both).ok();
        from.shutdown(Shutdown::Both).ok();
    });
}
