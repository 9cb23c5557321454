//! IPAM under fire: 50 concurrent clients allocating and releasing through
//! the real agent's socket while the agent is killed with SIGKILL at random
//! moments and restarted. At the end every acknowledged allocation has
//! exactly one live owner, every live owner its address, and nothing else
//! is held. Clients behave as kubelet does: a failed ADD is followed by a
//! DEL until one succeeds.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use railnet_agent::{
    api::{IpamRequest, Op, Response},
    ipam::{AllocationStore, RedbStore},
};
use railnet_tests::{Agent, Netns, agent_call};
use serde_json::json;

const CLIENTS: usize = 50;

fn request(c: usize, n: usize) -> IpamRequest {
    railnet_tests::rail1_ipam_request(format!("client{c}-pod{n}"))
}

/// DEL until the agent acknowledges it (it may be down for a while).
fn del_until_acked(socket: &std::path::Path, r: &IpamRequest, stop: &AtomicBool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Response::Ok { .. }) = agent_call(socket, Op::IpamDel(r.clone())) {
            return true;
        }
        if stop.load(Ordering::Relaxed) && Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn sigkill_at_random_moments_loses_and_duplicates_nothing() {
    let node = Netns::new("node");
    let pools = json!({"pools": [{
        "name": "rail1", "subnet": "172.16.0.0/22", "gateway": "172.16.0.1",
    }]});
    let agent = Arc::new(Mutex::new(Agent::start(&node, &pools)));
    let socket = agent.lock().unwrap().socket.clone();
    // Acknowledged live allocations: (container) → address.
    let acked: Arc<Mutex<HashMap<String, IpAddr>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (socket, acked, stop) = (socket.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut live: Vec<IpamRequest> = Vec::new();
                let mut n = 0;
                let mut acks = 0;
                while !stop.load(Ordering::Relaxed) {
                    // Mostly ADD while few are held, otherwise DEL one.
                    if live.len() < 4 || (n % 3 != 0 && live.len() < 8) {
                        let r = request(c, n);
                        n += 1;
                        match agent_call(&socket, Op::IpamAdd(r.clone())) {
                            Ok(Response::Ok {
                                ipam: Some(res), ..
                            }) => {
                                let addr = res.ips[0].address.addr();
                                acked.lock().unwrap().insert(r.container_id.clone(), addr);
                                live.push(r);
                                acks += 1;
                            }
                            // Failed or unknown: kubelet follows up with DEL.
                            _ => {
                                assert!(
                                    del_until_acked(&socket, &r, &stop),
                                    "DEL never acknowledged"
                                );
                            }
                        }
                    } else {
                        let r = live.remove(n % live.len());
                        n += 1;
                        if matches!(
                            agent_call(&socket, Op::IpamDel(r.clone())),
                            Ok(Response::Ok { .. })
                        ) || del_until_acked(&socket, &r, &stop)
                        {
                            acked.lock().unwrap().remove(&r.container_id);
                        }
                    }
                }
                acks
            })
        })
        .collect();

    // Kill the agent 6 times at random-ish moments, restart each time.
    let mut seed = 0x9e37_79b9_u64;
    let mut kills = 0;
    for _ in 0..6 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(150 + (seed >> 33) % 400));
        let mut a = agent.lock().unwrap();
        a.kill9();
        kills += 1;
        std::thread::sleep(Duration::from_millis(50));
        a.spawn(&node);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let acks: usize = clients.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(
        acks > 200,
        "only {acks} acknowledged ADDs: the load was too light to mean much"
    );

    // Read what is on disk with the agent stopped.
    let state = {
        let mut a = agent.lock().unwrap();
        a.stop();
        a.state_path()
    };
    let records = RedbStore::open(&state).unwrap().load().unwrap();
    let acked = acked.lock().unwrap();
    let mut seen = HashSet::new();
    for r in &records {
        assert!(seen.insert(r.address), "{} held twice", r.address);
    }
    let on_disk: HashMap<String, IpAddr> = records
        .iter()
        .map(|r| (r.key.container_id.clone(), r.address))
        .collect();
    for (cid, addr) in acked.iter() {
        assert_eq!(
            on_disk.get(cid),
            Some(addr),
            "acknowledged {cid} → {addr} lost"
        );
    }
    let leaked: Vec<_> = on_disk.keys().filter(|c| !acked.contains_key(*c)).collect();
    assert!(leaked.is_empty(), "held without a live owner: {leaked:?}");
    eprintln!(
        "{kills} SIGKILLs, {acks} acknowledged ADDs, {} live at the end, 0 duplicates, 0 leaks",
        acked.len()
    );
}
