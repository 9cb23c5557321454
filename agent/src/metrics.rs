//! `/metrics` (prometheus-client) and `/healthz` on the agent.
//!
//! Request counters and latency histograms live here; pool usage and the
//! pods' dataplane verdict counters are read at scrape time (from the
//! allocator and from the pinned per-CPU maps), so a scrape always shows
//! what the kernel counted, also for pods adopted after a restart. So are
//! the RDMA ports' hardware counters (RDMA netlink, `rdma statistic`).

use std::{net::SocketAddr, sync::Arc};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::{dataplane, rail::RailService};

type Labels = Vec<(String, String)>;

fn latency_histogram() -> Histogram {
    // 100 µs … ~1.6 s: an ADD is milliseconds, a slow one seconds.
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

/// The agent's own metrics.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        }
    }
}

impl Metrics {
    /// Records one request of the CNI socket API.
    pub fn observe(&self, op: &str, ok: bool, seconds: f64) {
        let result = if ok { "ok" } else { "error" };
        self.requests
            .get_or_create(&vec![
                ("op".into(), op.into()),
                ("result".into(), result.into()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("op".into(), op.into())])
            .observe(seconds);
    }

    /// The exposition text of everything, read now.
    pub fn render(&self, service: &RailService) -> String {
        let mut registry = Registry::with_prefix("railnet");
        registry.register(
            "cni_requests",
            "Requests from the CNI binary, by operation and result",
            self.requests.clone(),
        );
        registry.register(
            "cni_request_duration_seconds",
            "Time the agent took per CNI request",
            self.latency.clone(),
        );
        let used = Family::<Labels, Gauge>::default();
        let capacity = Family::<Labels, Gauge>::default();
        for name in service.ipam.pools().keys() {
            if let Some((u, c)) = service.ipam.usage(name) {
                let l = vec![("pool".into(), name.clone())];
                used.get_or_create(&l)
                    .set(i64::try_from(u).unwrap_or(i64::MAX));
                capacity
                    .get_or_create(&l)
                    .set(i64::try_from(c).unwrap_or(i64::MAX));
            }
        }
        registry.register(
            "ipam_pool_used_addresses",
            "Addresses allocated from a pool",
            used,
        );
        registry.register(
            "ipam_pool_capacity_addresses",
            "Addresses a pool can hand out",
            capacity,
        );
        let allocations = Gauge::<i64>::default();
        allocations.set(service.ipam.allocated() as i64);
        registry.register(
            "ipam_allocations",
            "Addresses held on this node",
            allocations,
        );
        if let Some((writes, conflicts)) = service.ipam.api_writes() {
            let accepted = Counter::<u64>::default();
            accepted.inc_by(writes);
            registry.register(
                "ipam_api_writes",
                "Kubernetes mode: writes to RailBlocks the API server accepted",
                accepted,
            );
            let refused = Counter::<u64>::default();
            refused.inc_by(conflicts);
            registry.register(
                "ipam_api_write_conflicts",
                "Kubernetes mode: RailBlock writes refused because another writer changed the block first (retried)",
                refused,
            );
        }
        let packets = Family::<Labels, Counter>::default();
        for pod in dataplane::pinned_pods(&service.pin_root) {
            let pins = dataplane::PodPins::new(&service.pin_root, &pod.container_id);
            if let Ok(counters) = pins.counters() {
                for (rail, verdict, n) in counters {
                    packets
                        .get_or_create(&vec![
                            ("container".into(), pod.container_id.clone()),
                            ("rail".into(), rail.to_string()),
                            ("verdict".into(), verdict.name().into()),
                        ])
                        .inc_by(n);
                }
            }
        }
        registry.register(
            "dataplane_packets",
            "Packets the rail program saw, per pod, rail (0: none) and verdict",
            packets,
        );
        registry.register(
            "rdma_port_hw_counter",
            "Hardware counters of the node's RDMA ports, named as `rdma statistic` names them",
            rdma_counters(&service.node_name, &service.sysfs_root, &service.vf_records),
        );
        let mut out = String::new();
        let _ = encode(&mut out, &registry);
        out
    }
}

/// Every RDMA port's hardware counters, as the agent's netns sees them
/// (the host's: every device in shared mode, those not moved into a pod
/// in exclusive mode), each labelled with the pod and interface holding
/// its VF (found by PCI address in the VF records) — empty for a device
/// no pod holds — and those of devices isolated in pods, read inside each
/// pod's netns. Empty on a node without RDMA.
fn rdma_counters(
    node: &str,
    sysfs: &std::path::Path,
    records: &std::path::Path,
) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    let mut nl = match crate::rdma::RdmaNetlink::open() {
        Ok(nl) => nl,
        Err(e) => {
            // No RDMA subsystem: nothing to count.
            tracing::debug!(error = %e, "RDMA counters: no RDMA netlink");
            return family;
        }
    };
    let devices = match nl.devices() {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "RDMA counters: cannot list the devices");
            return family;
        }
    };
    let count = |device: &str,
                 port: &crate::rdma::RdmaPort,
                 holder: &crate::sriov::Holder,
                 counters: Vec<(String, u64)>| {
        for (name, value) in counters {
            family
                .get_or_create(&vec![
                    ("node".into(), node.to_owned()),
                    ("device".into(), device.to_owned()),
                    ("port".into(), port.port.to_string()),
                    ("netdev".into(), port.netdev.clone().unwrap_or_default()),
                    ("pod".into(), holder.pod.clone()),
                    ("interface".into(), holder.interface.clone()),
                    ("counter".into(), name),
                ])
                .inc_by(value);
        }
    };
    let holders = crate::sriov::holders(records);
    let seen: Vec<String> = devices.iter().map(|d| d.name.clone()).collect();
    for dev in devices {
        let holder = crate::sriov::rdma_device_pci(sysfs, &dev.name)
            .and_then(|pci| holders.get(&pci).cloned())
            .unwrap_or_default();
        let ports = match nl.ports(&dev) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(device = %dev.name, error = %e, "RDMA counters: cannot read the ports");
                continue;
            }
        };
        for port in ports {
            let counters = match nl.counters(&dev, port.port) {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(device = %dev.name, port = port.port, error = %e, "RDMA counters: cannot read them");
                    continue;
                }
            };
            count(&dev.name, &port, &holder, counters);
        }
    }
    // Isolated devices (exclusive mode) are visible only inside their pod's
    // netns: read there, over an RDMA netlink socket opened in it.
    for rec in crate::sriov::rdma_records(records) {
        if rec.netns_inode == 0 || seen.contains(&rec.device) {
            continue;
        }
        let Some(path) = crate::netns::path_of(rec.netns_inode) else {
            continue; // the pod is gone; the kernel returned the device
        };
        let read = crate::rdma::counters_in(&path, &rec.device);
        let ports = match read {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(device = %rec.device, error = %e, "RDMA counters: cannot read them in the pod's netns");
                continue;
            }
        };
        for (port, counters) in ports {
            count(&rec.device, &port, &rec.holder, counters);
        }
    }
    family
}

/// Whether an `Accept` header asks for OpenMetrics (Prometheus does; other
/// scrapers and promtool read the classic text format).
pub fn wants_openmetrics(accept: &str) -> bool {
    accept.contains("application/openmetrics-text")
}

/// The content type and body to answer a scrape with, from the
/// OpenMetrics text prometheus-client writes.
pub fn exposition(openmetrics: bool, body: String) -> (&'static str, String) {
    if openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            classic_text(&body),
        )
    }
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition:
/// a counter's HELP and TYPE name its `_total` samples, and there is no
/// `# EOF` or `# UNIT`. prometheus-client writes only OpenMetrics.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Serves `/metrics` and `/healthz` on `addr` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, service: Arc<RailService>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let (metrics, service) = (metrics.clone(), service.clone());
        tokio::spawn(async move {
            // The whole request head, however the client's writes were
            // split (one read may hold only its first line), within 5 s
            // and 8 KiB.
            let mut buf = Vec::with_capacity(1024);
            let head = async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            };
            match tokio::time::timeout(std::time::Duration::from_secs(5), head).await {
                Ok(true) => {}
                _ => return,
            }
            let request = String::from_utf8_lossy(&buf);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            // Prometheus asks for OpenMetrics in its Accept header; other
            // scrapers (and promtool) read the classic text format.
            let openmetrics = request
                .lines()
                .any(|l| l.to_ascii_lowercase().starts_with("accept:") && wants_openmetrics(l));
            let (status, kind, body) = match path {
                "/metrics" => {
                    let body = tokio::task::spawn_blocking(move || metrics.render(&service))
                        .await
                        .unwrap_or_default();
                    let (kind, body) = exposition(openmetrics, body);
                    ("200 OK", kind, body)
                }
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
                _ => (
                    "404 Not Found",
                    "text/plain",
                    "try /metrics or /healthz\n".to_owned(),
                ),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        });
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let om = "# HELP railnet_cni_requests Requests.\n# TYPE railnet_cni_requests counter\n\
                  railnet_cni_requests_total{op=\"add\"} 3\n# HELP railnet_ipam_allocations Held.\n\
                  # TYPE railnet_ipam_allocations gauge\nrailnet_ipam_allocations 2\n# EOF\n";
        assert_eq!(
            classic_text(om),
            "# HELP railnet_cni_requests_total Requests.\n# TYPE railnet_cni_requests_total counter\n\
             railnet_cni_requests_total{op=\"add\"} 3\n# HELP railnet_ipam_allocations Held.\n\
             # TYPE railnet_ipam_allocations gauge\nrailnet_ipam_allocations 2\n"
        );
    }
}
