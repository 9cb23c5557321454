//! Mode ipoib without InfiniBand (none here: rxe and siw are Ethernet and
//! iWARP, and IPoIB needs an IB port): the request that makes the pod's
//! child is checked byte for byte against iproute2's, and a master that is
//! not an IPoIB interface is refused end to end with nothing left behind.

use railnet_tests::{Agent, Netns, RailFabric, cni, emitted, iproute2_newlink, link_attributes_of};

/// `IFLA_IFNAME`, `IFLA_LINK`, `IFLA_LINKINFO`.
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINKINFO: u16 = 18;

/// railnet's RTM_NEWLINK for an IPoIB child carries what iproute2's `ip
/// link add link ib0 name rn0 type ipoib pkey P mode M umcast 1` does: the
/// same name, parent and link info, byte for byte.
#[test]
fn the_child_request_is_byte_for_byte_what_iproute2_sends() {
    let ns = Netns::new("ipoibgold");
    // iproute2 resolves the parent by name before sending; the kernel then
    // refuses (no IPoIB here), after the bytes are out.
    ns.ip(&["link", "add", "ib0", "type", "veth", "peer", "name", "ib0p"]);
    let parent = ns.ip_json(&["link", "show", "dev", "ib0"])[0]["ifindex"]
        .as_u64()
        .unwrap() as u32;
    for (pkey, mode, words) in [
        (0x8001u16, 0u16, ["0x8001", "datagram"]),
        (0x7fff, 1, ["0x7fff", "connected"]),
    ] {
        let cmd = [
            "link", "add", "link", "ib0", "name", "rn0", "type", "ipoib", "pkey", words[0], "mode",
            words[1], "umcast", "1",
        ];
        let theirs = iproute2_newlink(&ns, &cmd);
        let ours = emitted(&railnet_agent::rtnl::ipoib_request(
            parent, "rn0", pkey, mode,
        ));
        let kinds = [IFLA_IFNAME, IFLA_LINK, IFLA_LINKINFO];
        assert_eq!(
            link_attributes_of(&ours, &kinds),
            link_attributes_of(&theirs, &kinds),
            "`ip {}`",
            cmd.join(" ")
        );
        assert_eq!(&ours[..16], &theirs[..16], "the ifinfomsg header");
    }
}

/// A master that is no IPoIB interface (here an Ethernet veth, a RoCE
/// NIC's kind): ADD is refused naming it and what to use instead, and
/// leaves nothing — no interface in the pod or the node, no address.
#[test]
fn a_master_that_is_not_ipoib_is_refused_with_nothing_left() {
    let fabric = RailFabric::new(1, 1);
    let node = &fabric.nodes[0];
    let agent = Agent::start(node, &fabric.pools(0));
    let mut conf = fabric.netconf(1, &agent, "ebpf");
    conf["mode"] = "ipoib".into();
    conf["pkey"] = "0x8001".into();
    let pod = fabric.pod(0);
    let links_before = node.ip_json(&["link", "show"]).as_array().unwrap().len();
    let add = cni("ADD", &conf, "ib-child", Some(&pod.ns.path()), "net1");
    assert!(!add.ok, "{}", add.stdout);
    let text = format!("{} {}", add.json["msg"], add.json["details"]);
    assert!(
        text.contains("eth1 is not an IPoIB interface") && text.contains("macvlan"),
        "{text}"
    );
    assert!(!pod.ns.has_link("net1"));
    assert_eq!(
        node.ip_json(&["link", "show"]).as_array().unwrap().len(),
        links_before,
        "a child was left in the node"
    );
    assert_eq!(agent.allocations(node), 0);
    // DEL of what never was: success, as the spec asks.
    assert!(cni("DEL", &conf, "ib-child", Some(&pod.ns.path()), "net1").ok);
}
