//! What Prometheus and promtool read from the agent's /metrics on a node
//! with pods: the classic text format passes `promtool check metrics`
//! (Debian's prometheus), and a scraper asking for OpenMetrics gets it.

use railnet_tests::{Agent, RailFabric, cni};

fn body(response: &str) -> &str {
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("")
}

#[test]
fn a_real_scrape_passes_promtool_and_openmetrics_is_negotiated() {
    let fabric = RailFabric::new(1, 2);
    let node = &fabric.nodes[0];
    let agent = Agent::start(node, &fabric.pools(0));
    let pod = fabric.pod(0);
    let mut addrs = Vec::new();
    for k in 1..=2 {
        let out = cni(
            "ADD",
            &fabric.netconf(k, &agent, "ebpf"),
            "metrics-pod",
            Some(&pod.ns.path()),
            &format!("net{k}"),
        );
        assert!(out.ok, "{}", out.stdout);
        let a = out.json["ips"][0]["address"].as_str().unwrap();
        addrs.push(a.split('/').next().unwrap().to_owned());
    }
    // Traffic, so the per-pod verdict counters have samples.
    assert!(pod.ns.ping(&addrs[0], "172.16.2.254", 3, 56));

    let classic = agent.scrape(node, "/metrics");
    assert!(
        classic.contains("Content-Type: text/plain; version=0.0.4"),
        "{classic}"
    );
    let text = body(&classic);
    assert!(text.contains("railnet_dataplane_packets_total{"), "{text}");
    let (passed, said) = railnet_tests::promtool_check(text);
    assert!(
        passed && said.trim().is_empty(),
        "promtool:\n{said}\n{text}"
    );

    let om = agent.scrape_accepting(
        node,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    );
    assert!(
        om.contains("Content-Type: application/openmetrics-text"),
        "{om}"
    );
    assert!(body(&om).trim_end().ends_with("# EOF"), "{om}");
    assert!(body(&om).contains("# TYPE railnet_dataplane_packets counter"));

    // A request head that arrives in two writes is read whole before the
    // answer (the Accept header is in the second).
    let split = node.run(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9465").unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n")
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        s.write_all(b"Accept: application/openmetrics-text\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    assert!(
        split.contains("Content-Type: application/openmetrics-text"),
        "answered before the whole request came: {}",
        split.lines().next().unwrap_or("")
    );

    // Hardening 8: the agent's /metrics (it listens on the node's
    // address) bears idle, slow and too many connections, and a scrape
    // flood costs one render a second (the unit test of `Rendered`).
    railnet_tests::bounds::check(node, "127.0.0.1:9465".parse().unwrap(), || {
        node.command("curl")
            .args(["-sf", "http://127.0.0.1:9465/metrics"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
}
