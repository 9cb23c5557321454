//! What a request on the agent's socket cannot do, whoever sends it: be
//! handed another pod's addresses by naming its container, or pass a file
//! that is not a network namespace as the pod's.

use std::os::fd::AsFd;

use railnet_agent::api::{Op, Response};
use railnet_tests::{Agent, RailFabric, agent_call_with_fd, cni, rail1_ipam_request, unique};

/// A repeat ADD naming a container whose interface was made in another
/// netns is refused: the caller is not handed that pod's address, and the
/// pod keeps it.
#[test]
fn an_add_naming_another_pod_s_container_from_another_netns_is_refused() {
    let fabric = RailFabric::new(1, 1);
    let agent = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let conf = fabric.netconf(1, &agent, "ebpf");
    let (pod, intruder) = (fabric.pod(0), fabric.pod(0));
    let cid = unique("victim");
    let first = cni("ADD", &conf, &cid, Some(&pod.ns.path()), "net1");
    assert!(first.ok, "{}", first.stdout);
    let again = cni("ADD", &conf, &cid, Some(&intruder.ns.path()), "net1");
    assert!(
        !again.ok,
        "another netns was given the pod's address: {}",
        again.stdout
    );
    assert!(
        again
            .stdout
            .contains("holds addresses made for another network namespace"),
        "{}",
        again.stdout
    );
    assert!(!intruder.ns.has_link("net1"));
    assert_eq!(
        agent.allocations(&fabric.nodes[0]),
        1,
        "the pod lost its address"
    );
    assert!(pod.ns.has_link("net1"));
    assert!(cni("DEL", &conf, &cid, Some(&pod.ns.path()), "net1").ok);
    assert_eq!(agent.allocations(&fabric.nodes[0]), 0);
}

/// An IPAM request whose fd is a regular file, not a netns, is refused
/// before any address (the CNI checks too; the agent does not rely on it).
#[test]
fn a_request_with_a_file_that_is_no_netns_is_refused() {
    let fabric = RailFabric::new(1, 1);
    let agent = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let dir = railnet_tests::ScratchDir::new("not-netns");
    let file = std::fs::File::create(dir.path().join("f")).unwrap();
    let resp = agent_call_with_fd(
        &agent.socket,
        Op::IpamAdd(rail1_ipam_request(unique("c"))),
        Some(file.as_fd()),
    )
    .unwrap();
    match resp {
        Response::Error(e) => {
            assert_eq!(e.code, 4, "{e:?}");
            assert!(e.msg.contains("not a network namespace"), "{e:?}");
        }
        other => panic!("accepted: {other:?}"),
    }
    assert_eq!(agent.allocations(&fabric.nodes[0]), 0);
}

/// Hardening 8: a client that connects and sends its request a byte now
/// and then is cut off once the request deadline has passed (each byte
/// would renew a per-read timeout), idle connections are cut too, and
/// meanwhile the agent answers others.
#[test]
fn a_request_trickled_a_byte_at_a_time_is_cut_off_while_others_are_served() {
    use std::{
        io::{Read, Write},
        os::unix::net::UnixStream,
        time::{Duration, Instant},
    };
    let fabric = RailFabric::new(1, 1);
    let agent = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let deadline = railnet_agent::server::REQUEST_DEADLINE;
    let idle: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&agent.socket).unwrap())
        .collect();
    let slow = UnixStream::connect(&agent.socket).unwrap();
    let started = Instant::now();
    let mut writer = slow.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        // A length prefix announcing 200 bytes, then a byte every 500 ms.
        let mut bytes = 200u32.to_le_bytes().to_vec();
        bytes.extend([b' '; 200]);
        for b in bytes {
            if writer.write_all(&[b]).is_err() {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        None
    });
    // Others are served meanwhile.
    let status = agent_call_with_fd(&agent.socket, Op::Status, None).unwrap();
    assert!(matches!(status, Response::Ok { .. }), "{status:?}");
    // The trickle is cut within the deadline (and a little slack).
    let cut = trickle.join().unwrap();
    assert!(
        cut.is_some_and(|t| t < deadline + Duration::from_secs(3)),
        "a request trickled in for {:?} was still being read (deadline {deadline:?})",
        started.elapsed()
    );
    // So are the idle ones.
    for (i, mut s) in idle.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 64];
        assert!(
            !matches!(s.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "idle connection {i} still open after {:?}",
            started.elapsed()
        );
    }
    drop(slow);
}

/// Hardening 8: only root (or the agent's own user) may call the agent,
/// also if the socket's mode is loosened (here: 0666): a caller running
/// as another user is told so, and nothing is done for it.
#[test]
fn a_caller_that_is_not_root_is_refused_even_if_the_socket_is_open_to_it() {
    use std::os::unix::fs::PermissionsExt;
    let fabric = RailFabric::new(1, 1);
    let agent = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    for p in [agent.socket.parent().unwrap(), agent.socket.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let socket = agent.socket.clone();
    let answer = std::thread::spawn(move || {
        // This thread only (a raw syscall, not libc's all-threads
        // setresuid): the kernel records the caller's credentials at
        // connect.
        let dropped = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
        assert_eq!(dropped, 0, "cannot drop to uid 65534");
        agent_call_with_fd(&socket, Op::IpamAdd(rail1_ipam_request(unique("c"))), None)
    })
    .join()
    .unwrap()
    .unwrap();
    match answer {
        Response::Error(e) => assert!(e.msg.contains("only root may call"), "{e:?}"),
        other => panic!("a non-root caller was served: {other:?}"),
    }
    assert_eq!(agent.allocations(&fabric.nodes[0]), 0);
    // Root still is.
    let status = agent_call_with_fd(&agent.socket, Op::Status, None).unwrap();
    assert!(matches!(status, Response::Ok { .. }), "{status:?}");
}

/// Across a rolling upgrade the agent may be newer than the CNI on the
/// node: an ADD carrying the config as text only (what railnet's previous
/// CNI sent) is served as before. A typed config is checked again by the
/// agent, not trusted: one the CNI would have refused (rail 0) is refused
/// before anything is made.
#[test]
fn an_older_cnis_text_only_add_is_served_and_a_typed_config_is_checked_again() {
    use railnet_agent::{api::Attachment, netconf::NetConf};
    let fabric = RailFabric::new(1, 1);
    let agent = Agent::start(&fabric.nodes[0], &fabric.pools(0));
    let conf = fabric.netconf(1, &agent, "ebpf");
    let (old, forged) = (fabric.pod(0), fabric.pod(0));
    let add = |cid: &str, typed: Option<NetConf>, pod: &railnet_tests::FabricPod| {
        let netns = std::fs::File::open(pod.ns.path()).unwrap();
        let att = Attachment {
            container_id: cid.into(),
            ifname: "net1".into(),
            netconf: conf.clone(),
            conf: typed,
            args: Default::default(),
        };
        agent_call_with_fd(&agent.socket, Op::Add(att), Some(netns.as_fd())).unwrap()
    };
    let cid = unique("old-cni");
    match add(&cid, None, &old) {
        Response::Ok {
            result: Some(r), ..
        } => assert_eq!(r.interface.name, "net1"),
        other => panic!("a text-only ADD was not served: {other:?}"),
    }
    assert!(old.ns.has_link("net1"));

    let mut bad = NetConf::parse(conf.to_string().as_bytes()).unwrap();
    bad.rail = 0;
    match add(&unique("forged"), Some(bad), &forged) {
        Response::Error(e) => {
            assert_eq!(e.code, 7, "{e:?}");
            assert!(e.details.contains("rail 0 is out of range"), "{e:?}");
        }
        other => panic!("a typed config the CNI would refuse was served: {other:?}"),
    }
    assert!(!forged.ns.has_link("net1"));
    assert_eq!(agent.allocations(&fabric.nodes[0]), 1);
    assert!(cni("DEL", &conf, &cid, Some(&old.ns.path()), "net1").ok);
    assert_eq!(agent.allocations(&fabric.nodes[0]), 0);
}
