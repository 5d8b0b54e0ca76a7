//! `/metrics/json`: the same samples as `/metrics`, grouped by subsystem so an
//! operator can `jq '.upstream'` or `jq '.requests'`.

use prometheus::proto::{MetricFamily, MetricType};
use serde_json::{Map, Value, json};

/// Which top-level group a metric belongs to, by its name.
fn group_of(name: &str) -> &'static str {
    let name = name.strip_prefix("gatehouse_").unwrap_or(name);
    if name.starts_with("upstream_") {
        "upstream"
    } else if name.starts_with("http_") {
        "requests"
    } else if name.starts_with("config_") || name.starts_with("shutdown_") {
        "process"
    } else if name.starts_with("cache_") {
        "cache"
    } else if name.starts_with("ratelimit_") {
        "ratelimit"
    } else {
        "other"
    }
}

fn sample(metric: &prometheus::proto::Metric, kind: MetricType) -> Value {
    let mut out = Map::new();
    for label in metric.get_label() {
        out.insert(label.name().to_string(), Value::from(label.value()));
    }
    match kind {
        MetricType::COUNTER => {
            out.insert("value".into(), json!(metric.get_counter().get_value()));
        }
        MetricType::GAUGE => {
            out.insert("value".into(), json!(metric.get_gauge().get_value()));
        }
        MetricType::HISTOGRAM => {
            let h = metric.get_histogram();
            out.insert("count".into(), json!(h.get_sample_count()));
            out.insert("sum".into(), json!(h.get_sample_sum()));
            let buckets: Map<String, Value> = h
                .get_bucket()
                .iter()
                .map(|b| (b.upper_bound().to_string(), json!(b.cumulative_count())))
                .collect();
            out.insert("buckets".into(), Value::Object(buckets));
        }
        _ => {}
    }
    Value::Object(out)
}

/// Group metric families as `{group: {metric_name: [samples]}}`; `extra`
/// sections (such as per-upstream state) are merged in under their group.
pub fn render(families: &[MetricFamily], extra: Map<String, Value>) -> Value {
    let mut root = Map::new();
    for family in families {
        let group = group_of(family.name());
        let name = family
            .name()
            .strip_prefix("gatehouse_")
            .unwrap_or(family.name())
            .to_string();
        let samples: Vec<Value> = family
            .get_metric()
            .iter()
            .map(|m| sample(m, family.get_field_type()))
            .collect();
        let entry = root
            .entry(group)
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(map) = entry {
            map.insert(name, Value::Array(samples));
        }
    }
    for (group, value) in extra {
        let entry = root
            .entry(group)
            .or_insert_with(|| Value::Object(Map::new()));
        if let (Value::Object(map), Value::Object(add)) = (entry, value) {
            map.extend(add);
        }
    }
    Value::Object(root)
}
