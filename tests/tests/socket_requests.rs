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
