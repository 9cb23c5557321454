//! Helper for the IPAM power-cut test (run inside a qemu guest by
//! `cargo xtask test`):
//!
//! - `load <socket>`: allocates through the agent as fast as it answers,
//!   printing `ACK <container> <address>` for each acknowledged ADD, until
//!   killed (the power cut);
//! - `dump <database>`: prints `HELD <container> <address>` for every
//!   allocation in the redb store, as a restarted agent would find them.

use std::io::Write;

use railnet_agent::{
    api::{Op, Response},
    ipam::{AllocationStore, RedbStore},
};
use railnet_tests::agent_call;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("load"), Some(socket)) => load(socket),
        (Some("dump"), Some(db)) => {
            let store = RedbStore::open(std::path::Path::new(db)).expect("open the store");
            for a in store.load().expect("read the store") {
                println!("HELD {} {}", a.key.container_id, a.address);
            }
        }
        _ => {
            eprintln!("usage: railnet-ipam-load load <socket> | dump <database>");
            std::process::exit(2);
        }
    }
}

fn load(socket: &str) {
    let socket = std::path::PathBuf::from(socket);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                loop {
                    let r = railnet_tests::rail1_ipam_request(format!("t{t}-{n}"));
                    if let Ok(Response::Ok {
                        ipam: Some(res), ..
                    }) = agent_call(&socket, Op::IpamAdd(r))
                    {
                        let line = format!("ACK t{t}-{n} {}\n", res.ips[0].address.addr());
                        // One write per line so lines never interleave.
                        let _ = std::io::stdout().lock().write_all(line.as_bytes());
                    }
                    n += 1;
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}
