//! A fault-injecting TCP proxy for tests: forwards connections from a loopback port to a
//! target; `cut` closes every connection and refuses new ones until `heal`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// A proxy on a free loopback port to `target` (which need not listen yet).
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy port");
        let port = listener.local_addr().expect("proxy addr").port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, k) = (cut.clone(), conns.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { continue };
                if c.load(Ordering::SeqCst) {
                    // Refused while cut: close at once.
                    inbound.shutdown(Shutdown::Both).ok();
                    continue;
                }
                let Ok(outbound) = TcpStream::connect(target) else {
                    inbound.shutdown(Shutdown::Both).ok();
                    continue;
                };
                inbound.set_nodelay(true).ok();
                outbound.set_nodelay(true).ok();
                let mut list = k.lock().unwrap_or_else(|e| e.into_inner());
                for s in [&inbound, &outbound] {
                    if let Ok(s) = s.try_clone() {
                        list.push(s);
                    }
                }
                drop(list);
                pump(&inbound, &outbound);
                pump(&outbound, &inbound);
            }
        });
        Proxy { port, cut, conns }
    }

    /// Closes every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let mut list = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        for s in list.drain(..) {
            s.shutdown(Shutdown::Both).ok();
        }
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// Copies bytes from `from` to `to` on a thread until either side closes.
fn pump(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
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
