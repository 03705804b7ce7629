//! Reading a node's OpenMetrics endpoint (`kith run --metrics`): a small text-format parser
//! and the few figures the bench derives from it.
//!
//! Names (from `node/src/metrics.rs`): `kith_messages_sent_total`,
//! `kith_messages_received_total`; gossipsub's per-topic receive counts with duplicates
//! (`gossipsub_topic_msg_recv_counts_unfiltered_total`) and without
//! (`gossipsub_topic_msg_recv_counts_total`); the transport's byte counters
//! (`libp2p_bandwidth_bytes_total{protocols,direction}`). Families are matched by suffix so a
//! different registry prefix still works.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Largest metrics page read.
const MAX_METRICS_BYTES: usize = 16 * 1024 * 1024;

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_total`, `_bucket`, … suffix as written).
    pub name: String,
    /// Label pairs.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// Why a metrics page could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("metrics line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

/// Parses the OpenMetrics (or Prometheus) text format; comments and `# EOF` are skipped.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: &str| ParseError {
            line: i + 1,
            reason: reason.to_owned(),
        };
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .ok_or_else(|| bad("no value"))?;
        let name = &line[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(bad("bad metric name"));
        }
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let end = loop {
                // Skip separators.
                while let Some((_, c)) = chars.peek() {
                    if *c == ',' || c.is_whitespace() {
                        chars.next();
                    } else {
                        break;
                    }
                }
                let Some(&(start, c)) = chars.peek() else {
                    return Err(bad("unterminated labels"));
                };
                if c == '}' {
                    break start + 1;
                }
                let mut key = String::new();
                for (_, c) in chars.by_ref() {
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(bad("label value without quotes"));
                }
                let mut value = String::new();
                let mut closed = false;
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(other) => value.push(other),
                            None => return Err(bad("dangling escape")),
                        },
                        '"' => {
                            closed = true;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                if !closed {
                    return Err(bad("unterminated label value"));
                }
                labels.insert(key.trim().to_owned(), value);
            };
            rest = &body[end..];
        }
        let value_text = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| bad("no value"))?;
        let value = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| bad("value is not a number"))?,
        };
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// The figures the bench uses from one scrape. `None` where the family is absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Figures {
    /// `kith_messages_sent_total`.
    pub messages_sent: Option<f64>,
    /// `kith_messages_received_total`.
    pub messages_received: Option<f64>,
    /// Gossip messages received on all topics, duplicates included.
    pub gossip_received_unfiltered: Option<f64>,
    /// Gossip messages received on all topics, duplicates filtered out.
    pub gossip_received: Option<f64>,
    /// Bytes sent by the transports.
    pub bytes_out: Option<f64>,
    /// Bytes received by the transports.
    pub bytes_in: Option<f64>,
    /// History sync request frames this node sent (`kith_sync_bytes_total`).
    pub sync_request_sent: Option<f64>,
    /// History sync response frames this node received (`kith_sync_bytes_total`).
    pub sync_response_received: Option<f64>,
    /// CPU seconds of the engine thread in the group engine
    /// (`kith_engine_cpu_seconds_total{part="mls"}`).
    pub cpu_mls: Option<f64>,
    /// CPU seconds of the engine thread in the store (`…{part="store"}`).
    pub cpu_store: Option<f64>,
    /// Connected peers the node graylists now (`kith_peers_graylisted`).
    pub peers_graylisted: Option<f64>,
    /// Peers cut off or limited (`kith_peer_faults_total`), by fault.
    pub peer_faults: std::collections::BTreeMap<String, f64>,
}

fn engine_cpu(s: &Sample, part: &str) -> bool {
    s.name == "kith_engine_cpu_seconds_total" && s.labels.get("part").is_some_and(|p| p == part)
}

fn sum_where(samples: &[Sample], pred: impl Fn(&Sample) -> bool) -> Option<f64> {
    let mut found = false;
    let mut total = 0.0;
    for s in samples.iter().filter(|s| pred(s)) {
        found = true;
        total += s.value;
    }
    found.then_some(total)
}

impl Figures {
    /// Extracts the figures from parsed samples.
    pub fn from_samples(samples: &[Sample]) -> Figures {
        let direction = |s: &Sample, want: &str| {
            s.labels
                .get("direction")
                .is_some_and(|d| d.eq_ignore_ascii_case(want))
        };
        let bandwidth =
            |s: &Sample| s.name.contains("bandwidth") && s.name.ends_with("bytes_total");
        Figures {
            messages_sent: sum_where(samples, |s| s.name == "kith_messages_sent_total"),
            messages_received: sum_where(samples, |s| s.name == "kith_messages_received_total"),
            gossip_received_unfiltered: sum_where(samples, |s| {
                s.name
                    .ends_with("gossipsub_topic_msg_recv_counts_unfiltered_total")
            }),
            gossip_received: sum_where(samples, |s| {
                s.name.ends_with("gossipsub_topic_msg_recv_counts_total")
            }),
            bytes_out: sum_where(samples, |s| bandwidth(s) && direction(s, "outbound")),
            bytes_in: sum_where(samples, |s| bandwidth(s) && direction(s, "inbound")),
            sync_request_sent: sum_where(samples, |s| {
                s.name == "kith_sync_bytes_total" && direction(s, "request_sent")
            }),
            sync_response_received: sum_where(samples, |s| {
                s.name == "kith_sync_bytes_total" && direction(s, "response_received")
            }),
            cpu_mls: sum_where(samples, |s| engine_cpu(s, "mls")),
            cpu_store: sum_where(samples, |s| engine_cpu(s, "store")),
            peers_graylisted: sum_where(samples, |s| s.name == "kith_peers_graylisted"),
            peer_faults: samples
                .iter()
                .filter(|s| s.name == "kith_peer_faults_total")
                .filter_map(|s| Some((s.labels.get("fault")?.clone(), s.value)))
                .collect(),
        }
    }

    /// `after - before` for each figure present in both.
    pub fn delta(before: &Figures, after: &Figures) -> Figures {
        let d = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        Figures {
            messages_sent: d(before.messages_sent, after.messages_sent),
            messages_received: d(before.messages_received, after.messages_received),
            gossip_received_unfiltered: d(
                before.gossip_received_unfiltered,
                after.gossip_received_unfiltered,
            ),
            gossip_received: d(before.gossip_received, after.gossip_received),
            bytes_out: d(before.bytes_out, after.bytes_out),
            bytes_in: d(before.bytes_in, after.bytes_in),
            sync_request_sent: d(before.sync_request_sent, after.sync_request_sent),
            sync_response_received: d(before.sync_response_received, after.sync_response_received),
            cpu_mls: d(before.cpu_mls, after.cpu_mls),
            cpu_store: d(before.cpu_store, after.cpu_store),
            peers_graylisted: after.peers_graylisted,
            peer_faults: after
                .peer_faults
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v - before.peer_faults.get(k).copied().unwrap_or(0.0),
                    )
                })
                .collect(),
        }
    }
}

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The HTTP exchange failed.
    #[error("GET {url}: {reason}")]
    Http {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The page did not parse.
    #[error("{url}: {error}")]
    Parse {
        /// The URL.
        url: String,
        /// Why.
        error: ParseError,
    },
}

/// Scrapes `http://<addr>/metrics` (no authentication: the endpoint is loopback-only).
pub async fn scrape(http: &reqwest::Client, addr: &str) -> Result<Figures, ScrapeError> {
    let url = format!("http://{addr}/metrics");
    let http_err = |reason: String| ScrapeError::Http {
        url: url.clone(),
        reason,
    };
    let mut response = http
        .get(&url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| http_err(e.to_string()))?;
    if !response.status().is_success() {
        return Err(http_err(format!("HTTP {}", response.status())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| http_err(e.to_string()))?
    {
        if body.len() + chunk.len() > MAX_METRICS_BYTES {
            return Err(http_err("metrics page too large".to_owned()));
        }
        body.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&body);
    let samples = parse(&text).map_err(|error| ScrapeError::Parse {
        url: url.clone(),
        error,
    })?;
    Ok(Figures::from_samples(&samples))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP kith_messages_sent Text messages this node sent.
# TYPE kith_messages_sent counter
kith_messages_sent_total 12
kith_messages_received_total 40
# TYPE gossipsub_topic_msg_recv_counts_unfiltered counter
gossipsub_topic_msg_recv_counts_unfiltered_total{hash="kith/g/ab"} 100
gossipsub_topic_msg_recv_counts_unfiltered_total{hash="kith/g/cd"} 20
gossipsub_topic_msg_recv_counts_total{hash="kith/g/ab"} 50
gossipsub_topic_msg_recv_counts_total{hash="kith/g/cd"} 10
libp2p_bandwidth_bytes_total{protocols="/ip4/tcp",direction="Outbound"} 1000
libp2p_bandwidth_bytes_total{protocols="/ip4/udp/quic-v1",direction="Outbound"} 24
libp2p_bandwidth_bytes_total{protocols="/ip4/tcp",direction="Inbound"} 900
kith_engine_cpu_seconds_total{part="mls"} 0.25
kith_engine_cpu_seconds_total{part="store"} 0.5
odd_total{a="x\"y,z}",b="\\"} 1.5e3 1700000000
hist_bucket{le="+Inf"} +Inf
# EOF
"#;

    #[test]
    fn parses_and_extracts() {
        let samples = parse(PAGE).unwrap();
        let odd = samples.iter().find(|s| s.name == "odd_total").unwrap();
        assert_eq!(odd.labels["a"], "x\"y,z}");
        assert_eq!(odd.labels["b"], "\\");
        assert_eq!(odd.value, 1500.0);
        let f = Figures::from_samples(&samples);
        assert_eq!(f.messages_sent, Some(12.0));
        assert_eq!(f.messages_received, Some(40.0));
        assert_eq!(f.gossip_received_unfiltered, Some(120.0));
        assert_eq!(f.gossip_received, Some(60.0));
        assert_eq!(f.bytes_out, Some(1024.0));
        assert_eq!(f.bytes_in, Some(900.0));
        assert_eq!(f.cpu_mls, Some(0.25));
        assert_eq!(f.cpu_store, Some(0.5));
        let none = Figures::from_samples(&[]);
        assert_eq!(none, Figures::default());
        let d = Figures::delta(&none, &f);
        assert_eq!(d.bytes_out, None);
        let d = Figures::delta(&f, &f);
        assert_eq!(d.gossip_received, Some(0.0));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for bad in [
            "name",
            "na me{} 1",
            "x{a=\"1\" 2",
            "x{a=1} 2",
            "x{a=\"1} 2",
            "x 1e",
            "x{a=\"\\",
            "{} 1",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
