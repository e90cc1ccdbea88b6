//! Per-route gateway metrics, served with the agent's on `/metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RequestLabels {
    pub gateway: String,
    /// Empty for requests no route matched.
    pub route: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RouteLabels {
    pub gateway: String,
    pub route: String,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

pub struct GatewayMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: HistogramFamily,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms to about 8 s.
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

impl GatewayMetrics {
    pub fn register(registry: &mut Registry) -> GatewayMetrics {
        let m = GatewayMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        };
        let r = registry.sub_registry_with_prefix("ironmesh_gateway");
        r.register(
            "requests",
            "Requests answered, by gateway, route and status code",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from the request to the end of the response body, by route",
            m.latency.clone(),
        );
        m
    }

    /// Unregistered, for tests.
    pub fn unregistered() -> GatewayMetrics {
        GatewayMetrics::register(&mut Registry::default())
    }
}
