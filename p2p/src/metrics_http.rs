//! A minimal HTTP/1 endpoint for Prometheus scrapes: `GET /metrics` answers the text
//! exposition produced by a render function; anything else gets 404. Shared by the
//! coordinator and the agent. Requests are bounded (8 KiB of headers, 5 s to send
//! them); each connection is answered once and closed.
//!
//! The body is the Prometheus text format 0.0.4 (what the `content-type` says, what
//! `promtool check metrics` and every scraper read): [`prometheus_text`] turns the
//! OpenMetrics text that `prometheus_client` encodes into it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 64;

/// Serves `GET /metrics` on `listener` until `shutdown` is cancelled.
pub async fn serve_metrics<F>(listener: TcpListener, render: F, shutdown: CancellationToken)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if connections.len() >= MAX_CONNECTIONS {
                    continue; // dropped: the scraper retries
                }
                let render = render.clone();
                connections.spawn(async move {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &*render)).await;
                });
            }
        }
    }
    connections.shutdown().await;
}

async fn answer(
    mut stream: TcpStream,
    render: &(dyn Fn() -> String + Send + Sync),
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut piece = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut piece).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            break;
        }
        buf.extend_from_slice(&piece[..n]);
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (status, body) =
        if method == b"GET" && (path == b"/metrics" || path.starts_with(b"/metrics?")) {
            ("200 OK", render())
        } else {
            ("404 Not Found", "only GET /metrics is served\n".to_owned())
        };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// One metric family as documented: the code registers it with `help`, and the README's
/// tables are generated from the lists of these (`tests/tests/docs.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDoc {
    /// The family name as registered (a counter's samples add `_total`).
    pub name: &'static str,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'static str,
    /// Its labels and their values, for the docs (`—` for none).
    pub labels: &'static str,
    /// The HELP text.
    pub help: &'static str,
}

impl MetricDoc {
    /// The name samples are exposed under (`_total` added to counters).
    pub fn exposed(&self) -> String {
        if self.kind == "counter" && !self.name.ends_with("_total") {
            format!("{}_total", self.name)
        } else {
            self.name.to_owned()
        }
    }
}

/// A registry whose every family is documented in a [`MetricDoc`] list: it takes the HELP
/// texts from the list and remembers what was registered; it renders the Prometheus text
/// format ([`prometheus_text`]).
#[derive(Debug)]
pub struct DocumentedRegistry {
    registry: prometheus_client::registry::Registry,
    docs: &'static [MetricDoc],
    names: Vec<&'static str>,
}

impl DocumentedRegistry {
    /// An empty registry for the families of `docs`.
    pub fn new(docs: &'static [MetricDoc]) -> Self {
        Self {
            registry: prometheus_client::registry::Registry::default(),
            docs,
            names: Vec::new(),
        }
    }

    /// Registers `metric` as `name`, with its documented HELP text.
    ///
    /// # Panics
    ///
    /// If `name` is not in the list (see [`help_of`]).
    pub fn register(
        &mut self,
        name: &'static str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry
            .register(name, help_of(self.docs, name), metric);
        self.names.push(name);
    }

    /// The families registered, in order.
    pub fn registered(&self) -> &[&'static str] {
        &self.names
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        prometheus_text(&out)
    }
}

/// The HELP text of `name` in `docs`.
///
/// # Panics
///
/// If `name` is not documented: every registered family must be (checked by the
/// registries' tests).
pub fn help_of(docs: &[MetricDoc], name: &str) -> &'static str {
    docs.iter()
        .find(|d| d.name == name)
        .map(|d| d.help)
        .unwrap_or_else(|| panic!("metric {name} is not documented"))
}

/// The markdown table of `docs`: name, type, labels, help.
pub fn markdown_table(docs: &[MetricDoc]) -> String {
    let mut out = String::from("| name | type | labels | what it counts |\n|---|---|---|---|\n");
    for d in docs {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            d.exposed(),
            d.kind,
            d.labels,
            d.help
        ));
    }
    out
}

/// The Prometheus text format 0.0.4 of an OpenMetrics exposition: a counter family's
/// `HELP` and `TYPE` name its `_total` samples (OpenMetrics names the family without
/// the suffix, which Prometheus-format readers take as a metric without help text);
/// `_created` samples, `UNIT` lines and the closing `# EOF` are dropped.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let described = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        if let Some((prefix, rest)) = described {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) && !name.ends_with("_total") {
                out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                continue;
            }
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            if name
                .strip_suffix("_created")
                .is_some_and(|family| counters.contains(family))
            {
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[test]
    fn openmetrics_counters_become_prometheus_counters() {
        let om = "# HELP jobs Jobs created.\n# TYPE jobs counter\njobs_total 3\njobs_created 1.7e9\n\
                  # HELP size_bytes Bytes held.\n# TYPE size_bytes gauge\n# UNIT size_bytes bytes\nsize_bytes 5\n\
                  # HELP done_total Already suffixed.\n# TYPE done_total counter\ndone_total{a=\"b\"} 1\n# EOF\n";
        assert_eq!(
            prometheus_text(om),
            "# HELP jobs_total Jobs created.\n# TYPE jobs_total counter\njobs_total 3\n\
             # HELP size_bytes Bytes held.\n# TYPE size_bytes gauge\nsize_bytes 5\n\
             # HELP done_total Already suffixed.\n# TYPE done_total counter\ndone_total{a=\"b\"} 1\n"
        );
    }

    #[tokio::test]
    async fn serves_metrics_and_404s_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let server = tokio::spawn(serve_metrics(
            listener,
            || "up 1\n".to_owned(),
            token.clone(),
        ));
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.ends_with("up 1\n"));
        let missing = get(addr, "GET / HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let junk = get(addr, "\u{0}\u{1}garbage\r\n\r\n").await;
        assert!(junk.starts_with("HTTP/1.1 404"));
        token.cancel();
        server.await.unwrap();
    }
}
