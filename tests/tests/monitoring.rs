//! The chart's dashboards and alerts against the real thing: Debian's
//! Prometheus scrapes two agents on the netns fabric while their pods send
//! traffic, and every panel's query (its template variables substituted as
//! Grafana would) must return series through Prometheus's HTTP API; each
//! alert is tested firing and not firing with `promtool test rules`.

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use railnet_tests::{Agent, Netns, RailFabric, ScratchDir, cni, veth_between};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dashboards() -> Vec<(String, Value)> {
    ["cluster", "node", "pods"]
        .iter()
        .map(|name| {
            let path = repo().join(format!("charts/railnet/monitoring/dashboards/{name}.json"));
            let text = std::fs::read_to_string(&path).unwrap();
            (name.to_string(), serde_json::from_str(&text).unwrap())
        })
        .collect()
}

#[test]
fn every_alert_fires_when_it_should_and_stays_quiet_otherwise() {
    let out = Command::new("promtool")
        .args(["test", "rules", "alerts_test.yaml"])
        .current_dir(repo().join("tests/monitoring"))
        .output()
        .expect("promtool (Debian's prometheus; cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The rules the test ran are the ones the chart ships.
    let (rendered, ok) = helm_template(&[
        "--set",
        "monitoring.alerts.enabled=true",
        "--set",
        "monitoring.dashboards.enabled=true",
    ]);
    assert!(ok, "{rendered}");
    let docs: Vec<Value> = serde_norway::Deserializer::from_str(&rendered)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .collect();
    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule with monitoring.alerts.enabled");
    let file: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("charts/railnet/monitoring/alerts.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(rule["spec"], file, "the PrometheusRule is alerts.yaml");
    for (name, dashboard) in dashboards() {
        let map = docs
            .iter()
            .find(|d| {
                d["kind"] == "ConfigMap"
                    && d["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.ends_with(&format!("-dashboard-{name}")))
            })
            .unwrap_or_else(|| panic!("no ConfigMap for dashboard {name}"));
        assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
        let data: Value = serde_json::from_str(
            map["data"][format!("railnet-{name}.json")]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(data, dashboard, "the ConfigMap holds {name}.json as it is");
    }
    let (off, ok) = helm_template(&[]);
    assert!(ok, "{off}");
    assert!(
        !off.contains("PrometheusRule") && !off.contains("-dashboard-"),
        "monitoring is off by default"
    );
}

fn helm_template(set: &[&str]) -> (String, bool) {
    let helm = std::env::var("RAILNET_HELM").unwrap_or_else(|_| "helm".into());
    let out = Command::new(helm)
        .arg("template")
        .arg("t")
        .arg(repo().join("charts/railnet"))
        .args(set)
        .output()
        .expect("helm (cargo xtask setup installs it; RAILNET_HELM names it)");
    (
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        out.status.success(),
    )
}

/// Metrics no device here can produce: the RDMA port counters and states
/// need an RDMA device, which this machine's netns fabric has none of (the
/// qemu RDMA tests, `tests/tests/rdma.rs`, read these series from real
/// soft-RoCE ports). A panel querying them is checked for its variables,
/// not its data.
const NEEDS_RDMA: &[&str] = &[
    "railnet_rdma_port_hw_counter_total",
    "railnet_rdma_port_active",
];

#[test]
fn every_dashboard_panel_has_data_from_a_real_prometheus() {
    let fabric = RailFabric::new(2, 2);
    // A monitoring netns with a link to each node: the agents serve
    // /metrics on that link, as they do on a node's own address.
    let mon = Netns::new("mon");
    for n in 0..2 {
        let (link, node) = (format!("m{n}"), &fabric.nodes[n]);
        veth_between(&mon, &link, node, "mgmt");
        mon.ip(&["addr", "add", &format!("10.250.{n}.1/30"), "dev", &link]);
        mon.ip(&["link", "set", &link, "up"]);
        node.ip(&["addr", "add", &format!("10.250.{n}.2/30"), "dev", "mgmt"]);
        node.ip(&["link", "set", "mgmt", "up"]);
    }
    let agents: Vec<Agent> = (0..2)
        .map(|n| {
            let address = format!("10.250.{n}.2:9465");
            Agent::start_with(
                &fabric.nodes[n],
                &fabric.pools(n),
                &["--metrics-address", &address],
            )
        })
        .collect();
    // One two-rail pod per node, traffic between them on both rails and
    // across them, and one ADD the agent refuses (a master the node lacks).
    let pods: Vec<_> = (0..2).map(|n| fabric.pod(n)).collect();
    let mut ips = [Vec::new(), Vec::new()];
    for n in 0..2 {
        for k in 1..=2 {
            let out = cni(
                "ADD",
                &fabric.netconf(k, &agents[n], "ebpf"),
                &format!("mon-{n}"),
                Some(&pods[n].ns.path()),
                &format!("net{k}"),
            );
            assert!(out.ok, "{}", out.stdout);
            let ip = out.json["ips"][0]["address"].as_str().unwrap();
            ips[n].push(ip.split('/').next().unwrap().to_owned());
        }
    }
    let mut bad = fabric.netconf(2, &agents[0], "ebpf");
    bad["master"] = "nosuchnic".into();
    assert!(!cni("ADD", &bad, "mon-bad", Some(&pods[0].ns.path()), "net9").ok);

    let prometheus = Prometheus::start(&mon, &["10.250.0.2:9465", "10.250.1.2:9465"]);
    let traffic = || {
        for (from, to) in ips[0].iter().zip(&ips[1]) {
            assert!(pods[0].ns.ping(from, to, 3, 56));
        }
        // From rail 2's address to the other pod's rail 1: the kernel picks
        // net1 (on-link), the program steers it back onto rail 2.
        assert!(pods[0].ns.ping(&ips[0][1], &ips[1][0], 3, 56));
    };
    traffic();
    // Two scrapes of everything, with traffic between them, before asking.
    prometheus.wait_for_samples("railnet_dataplane_packets_total", 2);
    traffic();
    std::thread::sleep(Duration::from_secs(3));

    let mut empty = Vec::new();
    for (file, dashboard) in dashboards() {
        let vars = variables(&dashboard);
        for v in dashboard["templating"]["list"].as_array().unwrap() {
            if let Some(query) = v["query"]["query"].as_str() {
                let (metric, label) = label_values(query).unwrap_or_else(|| {
                    panic!("{file}: variable {} is not label_values(…)", v["name"])
                });
                if prometheus
                    .label_values(&substitute(metric, &vars), label)
                    .is_empty()
                {
                    empty.push(format!("{file}: variable {} ({query})", v["name"]));
                }
            }
        }
        for panel in dashboard["panels"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap();
            for target in panel["targets"].as_array().unwrap() {
                let expr = substitute(target["expr"].as_str().unwrap(), &vars);
                assert!(
                    !expr.contains('$'),
                    "{file}: panel {title:?} uses a variable the dashboard does not define: {expr}"
                );
                let series = prometheus.query(&expr);
                if series.is_empty() && !NEEDS_RDMA.iter().any(|m| expr.contains(m)) {
                    empty.push(format!("{file}: panel {title:?}: {expr}"));
                }
            }
        }
    }
    assert!(
        empty.is_empty(),
        "panels with no data:\n  {}",
        empty.join("\n  ")
    );
    // The README's picture of the main panels, drawn from this very
    // Prometheus (`RAILNET_DASHBOARD_PICTURE=<file.svg>`): a minute of
    // traffic first, so the lines have a shape.
    if let Some(path) = std::env::var_os("RAILNET_DASHBOARD_PICTURE") {
        let start = now();
        for i in 0..40 {
            traffic();
            // Churn, as a job's pods come and go: a third pod's rail
            // added and deleted, and now and then an ADD refused.
            let churn = fabric.netconf(1, &agents[1], "ebpf");
            let extra = fabric.pod(1);
            if cni("ADD", &churn, "mon-churn", Some(&extra.ns.path()), "net1").ok {
                assert!(cni("DEL", &churn, "mon-churn", Some(&extra.ns.path()), "net1").ok);
            }
            if i % 10 == 5 {
                let mut bad = fabric.netconf(1, &agents[1], "ebpf");
                bad["master"] = "nosuchnic".into();
                let _ = cni("ADD", &bad, "mon-bad2", Some(&pods[1].ns.path()), "net9");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let panels = [
            ("cluster", "CNI requests"),
            ("cluster", "CNI request latency"),
            ("node", "Rail program verdicts"),
            ("pods", "Packets per pod and rail"),
        ];
        picture(&prometheus, &panels, start, now(), Path::new(&path));
    }
    // A pod's traffic carries its namespace and name, not only its
    // container (what the pods dashboard selects on).
    let labelled = prometheus.query(
        r#"railnet_dataplane_packets_total{namespace="default", pod="demo", container="mon-1"}"#,
    );
    assert!(!labelled.is_empty(), "no packets labelled with their pod");
    for n in 0..2 {
        for k in 1..=2 {
            let out = cni(
                "DEL",
                &fabric.netconf(k, &agents[n], "ebpf"),
                &format!("mon-{n}"),
                Some(&pods[n].ns.path()),
                &format!("net{k}"),
            );
            assert!(out.ok, "{}", out.stdout);
        }
    }
}

/// The dashboard's own variables (the data source aside).
fn variables(dashboard: &Value) -> Vec<String> {
    dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] != "datasource")
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect()
}

/// A query as Grafana sends it with every variable at "All" (`.*`) and a
/// rate interval fitting the test's 1 s scrapes.
fn substitute(expr: &str, vars: &[String]) -> String {
    let mut out = expr.replace("$__rate_interval", "10s");
    for v in vars {
        out = out
            .replace(&format!("${{{v}}}"), ".*")
            .replace(&format!("${v}"), ".*");
    }
    out
}

/// `label_values(metric{…}, label)` → (metric selector, label).
fn label_values(query: &str) -> Option<(&str, &str)> {
    let inner = query.strip_prefix("label_values(")?.strip_suffix(')')?;
    let (metric, label) = inner.rsplit_once(',')?;
    Some((metric.trim(), label.trim()))
}

/// A Prometheus server in a netns of the test's, its data in a temporary
/// directory; stopped (by its PID) when dropped.
struct Prometheus<'a> {
    ns: &'a Netns,
    child: Child,
    dir: ScratchDir,
}

const LISTEN: &str = "127.0.0.1:9090";

impl<'a> Prometheus<'a> {
    fn start(ns: &'a Netns, targets: &[&str]) -> Self {
        let dir = ScratchDir::new("prometheus");
        let config = dir.path().join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n  - job_name: railnet-agent\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = ns
            .command("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={LISTEN}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's prometheus; cargo xtask setup installs it)");
        let p = Prometheus { ns, child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !p.get("/-/ready").starts_with("HTTP/1.0 200") {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// A GET on the API, answered in the netns.
    fn get(&self, path: &str) -> String {
        let path = path.to_owned();
        self.ns.run(move || {
            // HTTP/1.0: the answer comes whole, never chunked.
            let Ok(mut s) = std::net::TcpStream::connect(LISTEN) else {
                return String::new();
            };
            let request = format!("GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n");
            let mut out = String::new();
            if s.write_all(request.as_bytes()).is_err() || s.read_to_string(&mut out).is_err() {
                return String::new();
            }
            out
        })
    }

    fn api(&self, path: &str) -> Value {
        let response = self.get(path);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or("");
        let json: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{path}: {e}:\n{response}\n{}", self.log()));
        assert_eq!(json["status"], "success", "{path}: {json}");
        json["data"].clone()
    }

    /// The series an instant query returns.
    fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(expr)));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// The values `label` takes on the series `selector` matches.
    fn label_values(&self, selector: &str, label: &str) -> Vec<Value> {
        let data = self.api(&format!(
            "/api/v1/label/{label}/values?match[]={}",
            encode(selector)
        ));
        data.as_array().cloned().unwrap_or_default()
    }

    /// Waits until every target has `n` samples of `metric`.
    fn wait_for_samples(&self, metric: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let counts = self.query(&format!("count_over_time({metric}[1m])"));
            let instances: std::collections::BTreeSet<String> = counts
                .iter()
                .filter(|s| {
                    s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<usize>().ok())
                        .is_some_and(|c| c >= n)
                })
                .filter_map(|s| s["metric"]["instance"].as_str().map(str::to_owned))
                .collect();
            if instances.len() >= 2 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {n} samples of {metric} from both agents: {counts:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encoding for a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Draws `panels` (dashboard, title) as Grafana would show them between
/// `start` and `end`, from `prometheus`'s data, into an SVG at `path`: a
/// picture for the README, made by the test rather than by hand.
fn picture(prometheus: &Prometheus, panels: &[(&str, &str)], start: f64, end: f64, path: &Path) {
    const W: f64 = 460.0;
    const H: f64 = 250.0;
    const COLORS: [&str; 8] = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    ];
    let dashboards = dashboards();
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>"#,
        2.0 * W + 30.0,
        H * panels.len().div_ceil(2) as f64 + 20.0
    );
    for (i, (file, title)) in panels.iter().enumerate() {
        let (_, dashboard) = dashboards.iter().find(|(f, _)| f == file).unwrap();
        let panel = dashboard["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["title"] == *title)
            .unwrap_or_else(|| panic!("{file}: no panel {title:?}"));
        let vars = variables(dashboard);
        let (x0, y0) = (
            10.0 + (i % 2) as f64 * (W + 10.0),
            10.0 + (i / 2) as f64 * H,
        );
        let mut lines: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for target in panel["targets"].as_array().unwrap() {
            let expr = substitute(target["expr"].as_str().unwrap(), &vars);
            let legend = target["legendFormat"].as_str().unwrap_or("");
            let data = prometheus.api(&format!(
                "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step=1",
                encode(&expr)
            ));
            for series in data["result"].as_array().cloned().unwrap_or_default() {
                let mut name = legend.to_owned();
                if let Some(labels) = series["metric"].as_object() {
                    for (k, v) in labels {
                        name = name.replace(&format!("{{{{{k}}}}}"), v.as_str().unwrap_or(""));
                    }
                }
                let points = series["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|v| Some((v[0].as_f64()?, v[1].as_str()?.parse::<f64>().ok()?)))
                    .filter(|(_, y)| y.is_finite())
                    .collect();
                lines.push((name, points));
            }
        }
        let unit = panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or("");
        let top = lines
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
            .fold(0.0_f64, f64::max)
            .max(1e-9);
        let (px, py, pw, ph) = (x0 + 40.0, y0 + 22.0, W - 50.0, H - 110.0);
        svg += &format!(
            r##"<text x="{x0}" y="{}" font-size="13" font-weight="bold">{} / {}</text><rect x="{px}" y="{py}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/><text x="{x0}" y="{}">{}</text><text x="{x0}" y="{}">0</text>"##,
            y0 + 14.0,
            xml(file),
            xml(title),
            py + 10.0,
            xml(&format!("{top:.3} {unit}")),
            py + ph
        );
        for (n, (name, points)) in lines.iter().take(COLORS.len()).enumerate() {
            let color = COLORS[n];
            let path: Vec<String> = points
                .iter()
                .map(|(t, y)| {
                    format!(
                        "{:.1},{:.1}",
                        px + (t - start) / (end - start) * pw,
                        py + ph - y / top * ph
                    )
                })
                .collect();
            svg += &format!(
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/><rect x="{}" y="{}" width="10" height="3" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
                path.join(" "),
                px + (n % 2) as f64 * pw / 2.0,
                py + ph + 14.0 + (n / 2) as f64 * 14.0,
                px + 14.0 + (n % 2) as f64 * pw / 2.0,
                py + ph + 18.0 + (n / 2) as f64 * 14.0,
                xml(name)
            );
        }
    }
    svg += "</svg>\n";
    std::fs::write(path, svg).unwrap();
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
