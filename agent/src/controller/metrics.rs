//! The controller's (and the webhook's) Prometheus metrics.

use super::Pass;

/// The controller's `/metrics` (and the webhook's): each metric is
/// registered once, when the struct is made; a scrape only encodes.
#[derive(Debug)]
pub struct Metrics {
    /// 1 while this replica leads.
    pub leader: prometheus_client::metrics::gauge::Gauge,
    /// NADs created.
    pub nads_created: prometheus_client::metrics::counter::Counter,
    /// NADs put back after a hand edit.
    pub nads_repaired: prometheus_client::metrics::counter::Counter,
    /// RailNetworks that cannot be rendered, at the last pass.
    pub networks_refused: prometheus_client::metrics::gauge::Gauge,
    /// Passes (reconcile or sweep) that failed.
    pub pass_errors: prometheus_client::metrics::counter::Counter,
    /// Claims of gone pods released.
    pub claims_released: prometheus_client::metrics::counter::Counter,
    /// Blocks of gone nodes given back.
    pub blocks_given_back: prometheus_client::metrics::counter::Counter,
    /// Webhook answers by result (`unchanged`, `patched`, `denied`,
    /// `bad_request`).
    pub webhook: prometheus_client::metrics::family::Family<
        Vec<(String, String)>,
        prometheus_client::metrics::counter::Counter,
    >,
    registry: prometheus_client::registry::Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            leader: Default::default(),
            nads_created: Default::default(),
            nads_repaired: Default::default(),
            networks_refused: Default::default(),
            pass_errors: Default::default(),
            claims_released: Default::default(),
            blocks_given_back: Default::default(),
            webhook: Default::default(),
            registry: prometheus_client::registry::Registry::with_prefix("railnet_controller"),
        };
        let r = &mut m.registry;
        r.register(
            "leader",
            "1 while this replica leads (holds the Lease)",
            m.leader.clone(),
        );
        r.register(
            "nads_created",
            "NetworkAttachmentDefinitions rendered from RailNetworks",
            m.nads_created.clone(),
        );
        r.register(
            "nads_repaired",
            "NetworkAttachmentDefinitions put back after they were edited",
            m.nads_repaired.clone(),
        );
        r.register(
            "networks_refused",
            "RailNetworks that cannot be rendered (their status says why)",
            m.networks_refused.clone(),
        );
        r.register(
            "pass_errors",
            "Passes that failed (retried next interval)",
            m.pass_errors.clone(),
        );
        r.register(
            "claims_released",
            "Address claims of pods that are gone, released",
            m.claims_released.clone(),
        );
        r.register(
            "blocks_given_back",
            "Address blocks of nodes that are gone, given back",
            m.blocks_given_back.clone(),
        );
        r.register(
            "webhook_requests",
            "RDMA resource-injection webhook answers, by result",
            m.webhook.clone(),
        );
        m
    }
}

impl Metrics {
    /// Counts one pass's outcome.
    pub fn record(&self, pass: &Pass) {
        self.nads_created.inc_by(pass.created as u64);
        self.nads_repaired.inc_by(pass.repaired as u64);
        self.networks_refused.set(pass.refused as i64);
    }

    /// Counts one webhook answer.
    pub fn webhook_answer(&self, result: &str) {
        self.webhook
            .get_or_create(&vec![("result".to_owned(), result.to_owned())])
            .inc();
    }

    /// The exposition (OpenMetrics text).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves the controller's `GET /metrics` and `/healthz` (see
/// [`crate::metrics::serve_exposition`]) until dropped.
pub async fn serve_metrics(listener: tokio::net::TcpListener, metrics: std::sync::Arc<Metrics>) {
    crate::metrics::serve_exposition(listener, move || {
        let metrics = metrics.clone();
        async move { metrics.render() }
    })
    .await;
}
