//! What every TCP server railnet exposes to callers it does not trust (the
//! webhook, the controller's and the agent's `/metrics`) must bear: idle
//! connections, a client sending its request a byte at a time, more
//! connections than its cap — and it still answers, and lets go of them
//! within its deadlines (hardening 8).

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use crate::Netns;

/// The servers' connection cap (`railnet_agent::http::Limits::default`).
pub const CAP: usize = 64;
/// Their longest deadline before a request has begun (handshake or
/// header); a connection held past it plus slack is a bound broken.
pub const DEADLINE: Duration = Duration::from_secs(5);
const SLACK: Duration = Duration::from_secs(5);

/// Opens a connection to `addr` from inside `ns`.
fn connect(ns: &Netns, addr: SocketAddr) -> TcpStream {
    ns.run(move || TcpStream::connect(addr).expect("connect"))
}

/// Whether the server closed `s` within `within` (read returns end of
/// stream or a reset), rather than keeping it open.
fn closed_within(s: &TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    let mut r = s;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return true,
            // An answer (an error page) before closing is fine.
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Holds idle connections, a slow one (a request header a byte every
/// 300 ms) and more connections than the cap against `addr` in `ns`, and
/// checks that `answers` (a real client's request) still succeeds, that
/// connections beyond the cap are closed at once and the idle and slow
/// ones within the deadlines. Panics naming the bound that broke.
pub fn check(ns: &Netns, addr: SocketAddr, answers: impl Fn() -> bool) {
    // Idle and slow connections, then a real request meanwhile.
    let idle: Vec<TcpStream> = (0..8).map(|_| connect(ns, addr)).collect();
    let slow = connect(ns, addr);
    let dribble = slow.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut s = dribble;
        let started = Instant::now();
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .chain([b'a'; 200].iter())
        {
            if s.write_all(&[*b]).is_err() || started.elapsed() > DEADLINE * 4 {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    assert!(
        answers(),
        "no answer while idle and slow connections are open"
    );
    let started = Instant::now();
    for (i, s) in idle.iter().enumerate() {
        assert!(
            closed_within(s, (DEADLINE + SLACK).saturating_sub(started.elapsed())),
            "idle connection {i} still open {:?} after it was opened (deadline {DEADLINE:?})",
            started.elapsed()
        );
    }
    assert!(
        closed_within(&slow, (DEADLINE + SLACK).saturating_sub(started.elapsed())),
        "a request sent a byte at a time is still being read after {:?} (deadline {DEADLINE:?})",
        started.elapsed()
    );
    let _ = writer.join();
    drop(idle);

    // More connections than the cap: those beyond it are closed as they
    // arrive, long before any deadline would close them.
    let flood: Vec<TcpStream> = (0..CAP + 8).map(|_| connect(ns, addr)).collect();
    let opened = Instant::now();
    let at_once = Duration::from_secs(2);
    assert!(at_once < DEADLINE);
    let beyond = flood
        .iter()
        .skip(CAP)
        .filter(|s| {
            closed_within(
                s,
                at_once
                    .saturating_sub(opened.elapsed())
                    .max(Duration::from_millis(1)),
            )
        })
        .count();
    assert!(
        beyond >= 8,
        "{beyond} of the 8 connections beyond the cap of {CAP} were closed at once; the rest are held"
    );
    drop(flood);
    // Once the flood is gone, a real client is served again.
    let deadline = Instant::now() + DEADLINE + SLACK;
    while !answers() {
        assert!(
            Instant::now() < deadline,
            "no answer {:?} after the flood ended",
            DEADLINE + SLACK
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
