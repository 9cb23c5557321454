//! `/metrics` (prometheus-client) and `/healthz` on the agent.
//!
//! Request counters and latency histograms live here; pool usage and the
//! pods' dataplane verdict counters are read at scrape time (from the
//! allocator and from the pinned per-CPU maps), so a scrape always shows
//! what the kernel counted, also for pods adopted after a restart. So are
//! the RDMA ports' hardware counters (RDMA netlink, `rdma statistic`).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

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
use tokio::net::TcpListener;

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
    /// Addresses the sweep released (their pods' DEL never came).
    swept: Counter,
    /// With `--host-rules`: the host rules and routes railnet keeps.
    host_rules: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            swept: Counter::default(),
            host_rules: Family::default(),
        }
    }
}

impl Metrics {
    /// Records one request of the CNI socket API and, if it failed, why
    /// (the `reason` label: [`crate::api::ApiError::metric_label`]).
    pub fn observe(&self, op: &str, failed: Option<&crate::api::ApiError>, seconds: f64) {
        let mut labels = vec![("op".into(), op.into())];
        match failed {
            None => labels.push(("result".into(), "ok".into())),
            Some(e) => {
                labels.push(("result".into(), "error".into()));
                labels.push(("reason".into(), e.metric_label().into()));
            }
        }
        self.requests.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&vec![("op".into(), op.into())])
            .observe(seconds);
    }

    /// The host rules and routes kept now (`--host-rules`).
    pub fn host_rules(&self, rules: usize, routes: usize) {
        for (kind, n) in [("rule", rules), ("route", routes)] {
            self.host_rules
                .get_or_create(&vec![("kind".into(), kind.into())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Counts addresses the sweep released.
    pub fn swept(&self, addresses: usize) {
        self.swept.inc_by(addresses as u64);
    }

    /// The exposition text of everything, read now.
    pub fn render(&self, service: &RailService) -> String {
        let mut registry = Registry::with_prefix("railnet");
        registry.register(
            "cni_requests",
            "Requests from the CNI binary, by operation, result and (failed ones) reason",
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
        registry.register(
            "host_rules",
            "With --host-rules: the host's not-to-RDMA-CIDR and per-rail-address rules and their routes railnet keeps",
            self.host_rules.clone(),
        );
        registry.register(
            "sweep_released_addresses",
            "Addresses the sweep released because their pod's netns was gone and no DEL had come",
            self.swept.clone(),
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
        // The pod each container belongs to, as its ADD recorded it: a
        // macvlan pod's traffic carries its namespace and name too.
        let pods = service
            .pod_info
            .as_ref()
            .map(|info| info.pods())
            .unwrap_or_default();
        for pod in dataplane::pinned_pods(&service.pin_root) {
            let pins = dataplane::PodPins::new(&service.pin_root, &pod.container_id);
            let (namespace, name) = pods
                .get(&pod.container_id)
                .and_then(|p| p.split_once('/'))
                .unwrap_or(("", ""));
            if let Ok(counters) = pins.counters() {
                for (rail, verdict, n) in counters {
                    packets
                        .get_or_create(&vec![
                            ("container".into(), pod.container_id.clone()),
                            ("namespace".into(), namespace.to_owned()),
                            ("pod".into(), name.to_owned()),
                            ("rail".into(), rail.to_string()),
                            ("verdict".into(), verdict.name().into()),
                        ])
                        .inc_by(n);
                }
            }
        }
        registry.register(
            "dataplane_packets",
            "Packets the rail program saw, per pod (container, and namespace and name when the runtime said), rail (0: none) and verdict",
            packets,
        );
        let (counters, active) =
            rdma_counters(&service.node_name, &service.sysfs_root, &service.vf_records);
        registry.register(
            "rdma_port_hw_counter",
            "Hardware counters of the node's RDMA ports, named as `rdma statistic` names them",
            counters,
        );
        registry.register(
            "rdma_port_active",
            "1 while an RDMA port is ACTIVE (`rdma link` state), 0 otherwise: its rail carries no RDMA",
            active,
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
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
) -> (Family<Labels, Counter>, Family<Labels, Gauge>) {
    let family = Family::<Labels, Counter>::default();
    let active = Family::<Labels, Gauge>::default();
    let mut nl = match crate::rdma::RdmaNetlink::open() {
        Ok(nl) => nl,
        Err(e) => {
            // No RDMA subsystem: nothing to count.
            tracing::debug!(error = %e, "RDMA counters: no RDMA netlink");
            return (family, active);
        }
    };
    let devices = match nl.devices() {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "RDMA counters: cannot list the devices");
            return (family, active);
        }
    };
    let count = |device: &str,
                 port: &crate::rdma::RdmaPort,
                 holder: &crate::sriov::Holder,
                 counters: Vec<(String, u64)>| {
        /// `enum ib_port_state`'s IB_PORT_ACTIVE.
        const ACTIVE: u8 = 4;
        // The port's labels, once: its state and each counter carry them.
        let labels: Labels = vec![
            ("node".into(), node.to_owned()),
            ("device".into(), device.to_owned()),
            ("port".into(), port.port.to_string()),
            ("netdev".into(), port.netdev.clone().unwrap_or_default()),
            ("pod".into(), holder.pod.clone()),
            ("interface".into(), holder.interface.clone()),
        ];
        active
            .get_or_create(&labels)
            .set(i64::from(port.state == Some(ACTIVE)));
        for (name, value) in counters {
            let mut with_counter = labels.clone();
            with_counter.push(("counter".into(), name));
            family.get_or_create(&with_counter).inc_by(value);
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
                    // Its state is still worth saying.
                    tracing::debug!(device = %dev.name, port = port.port, error = %e, "RDMA counters: cannot read them");
                    Vec::new()
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
    (family, active)
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

/// A render reused for a while (a second, in the agent), one render at
/// a time: a render walks every pinned map, RDMA netlink and `/proc`, so
/// many scrapers (or one client asking in a loop) cost at most one walk
/// per `max_age`, not one per request.
#[derive(Debug)]
pub struct Rendered {
    max_age: Duration,
    last: tokio::sync::Mutex<Option<(Instant, Arc<String>)>>,
}

impl Rendered {
    /// Renders reused for `max_age`.
    pub fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The last render if younger than `max_age`, else a new one by
    /// `render` (off the runtime: it blocks). Callers that arrive during a
    /// render wait for it and share it.
    pub async fn get(&self, render: impl FnOnce() -> String + Send + 'static) -> Arc<String> {
        let mut last = self.last.lock().await;
        if let Some((at, body)) = &*last
            && at.elapsed() < self.max_age
        {
            return body.clone();
        }
        let body = Arc::new(
            tokio::task::spawn_blocking(render)
                .await
                .unwrap_or_default(),
        );
        *last = Some((Instant::now(), body.clone()));
        body
    }
}

/// Serves `/metrics` and `/healthz` until the task is dropped, within
/// [`crate::http::Limits`] (it listens on the node's address); a render
/// is reused for `max_age`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    service: Arc<RailService>,
    max_age: Duration,
) {
    let rendered = Arc::new(Rendered::new(max_age));
    serve_exposition(listener, move || {
        let (metrics, service, rendered) = (metrics.clone(), service.clone(), rendered.clone());
        async move { (*rendered.get(move || metrics.render(&service)).await).clone() }
    })
    .await;
}

/// Serves `GET /metrics` from `render` (OpenMetrics text; the classic text
/// format unless the scraper asks for OpenMetrics) and `/healthz`, plain
/// HTTP within [`crate::http::Limits`], until dropped: the agent's and the
/// controller's endpoint.
pub async fn serve_exposition<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = String> + Send + 'static,
{
    let handler = move |req: hyper::Request<hyper::body::Incoming>| {
        let render = render.clone();
        async move {
            // Prometheus asks for OpenMetrics in its Accept header; other
            // scrapers (and promtool) read the classic text format.
            let openmetrics = req
                .headers()
                .get("accept")
                .and_then(|a| a.to_str().ok())
                .is_some_and(wants_openmetrics);
            match req.uri().path() {
                "/metrics" => {
                    let (kind, body) = exposition(openmetrics, render().await);
                    crate::http::reply(200, kind, body)
                }
                "/healthz" => crate::http::reply(200, "text/plain", "ok\n"),
                _ => crate::http::reply(404, "text/plain", "try /metrics or /healthz\n"),
            }
        }
    };
    crate::http::serve(
        listener,
        crate::http::Limits::default(),
        crate::http::Plain,
        handler,
    )
    .await;
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hardening 8: scrapes at once share one render; a render is
    /// reused until it is `max_age` old.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scrapes_at_once_cost_one_render() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let renders = Arc::new(AtomicUsize::new(0));
        let rendered = Arc::new(Rendered::new(Duration::from_millis(500)));
        let scrape = || {
            let (renders, rendered) = (renders.clone(), rendered.clone());
            tokio::spawn(async move {
                rendered
                    .get(move || {
                        std::thread::sleep(Duration::from_millis(50));
                        format!("render {}", renders.fetch_add(1, Ordering::SeqCst) + 1)
                    })
                    .await
            })
        };
        let all: Vec<_> = (0..20).map(|_| scrape()).collect();
        for s in all {
            assert_eq!(*s.await.unwrap(), "render 1");
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(*scrape().await.unwrap(), "render 2");
        assert_eq!(renders.load(Ordering::SeqCst), 2);
    }

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
