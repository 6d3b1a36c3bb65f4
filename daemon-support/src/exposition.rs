//! The two text formats a `/metrics` endpoint serves, chosen by the scraper's `Accept` header:
//! OpenMetrics 1.0 for whoever asks for it (Prometheus does, with a higher weight than the old
//! format), the Prometheus text format 0.0.4 for everyone else (`curl | promtool check metrics`,
//! older scrapers).
//!
//! Both daemons keep their metrics with `prometheus-client`, which encodes OpenMetrics only; the
//! 0.0.4 form is derived from that text here, for the metric types the daemons use (counters,
//! gauges, histograms; no exemplars). The differences that matter: a counter's family is named
//! with its `_total` suffix in `# HELP`/`# TYPE`, there are no `# UNIT` lines, no `_created`
//! samples and no `# EOF`, and `# HELP` text escapes only backslashes and newlines.

/// A text exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    PrometheusText,
}

impl Format {
    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
        }
    }

    /// The format an `Accept` header prefers: OpenMetrics when it is acceptable (q > 0) and
    /// weighs at least as much as `text/plain`; the 0.0.4 text otherwise, and without a header.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::PrometheusText;
        };
        let mut openmetrics: Option<f32> = None;
        let mut text: Option<f32> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let weight = parts
                .filter_map(|parameter| parameter.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, value)| value.trim().parse::<f32>().ok())
                .unwrap_or(0.0);
            let slot = match essence.as_str() {
                "application/openmetrics-text" => &mut openmetrics,
                "text/plain" => &mut text,
                _ => continue,
            };
            *slot = Some(slot.map_or(weight, |earlier| earlier.max(weight)));
        }
        match openmetrics {
            Some(weight) if weight > 0.0 && weight >= text.unwrap_or(0.0) => Format::OpenMetrics,
            _ => Format::PrometheusText,
        }
    }

    /// The format a scrape request's `Accept` header asks for ([`negotiate`](Self::negotiate)).
    pub fn of_request(headers: &hyper::HeaderMap) -> Format {
        Format::negotiate(
            headers
                .get(hyper::header::ACCEPT)
                .and_then(|value| value.to_str().ok()),
        )
    }

    /// `openmetrics` (one or more registries' OpenMetrics text, each with or without its `# EOF`)
    /// in this format, with one `# EOF` at the end for OpenMetrics.
    pub fn render(self, openmetrics: &str) -> String {
        match self {
            Format::OpenMetrics => {
                let mut text = String::with_capacity(openmetrics.len() + 6);
                for line in openmetrics.lines().filter(|line| *line != "# EOF") {
                    text.push_str(line);
                    text.push('\n');
                }
                text.push_str("# EOF\n");
                text
            }
            Format::PrometheusText => prometheus_text(openmetrics),
        }
    }
}

/// OpenMetrics text as the Prometheus text format 0.0.4 (module header).
fn prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // `# HELP` comes before `# TYPE`; a counter's is written once its type is known.
    let mut help: Option<(&str, String)> = None;
    let mut counters: Vec<&str> = Vec::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, help.take(), "");
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text.replace("\\\"", "\"")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "gauge" => ("", "gauge"),
                "histogram" => ("", "histogram"),
                "summary" => ("", "summary"),
                _ => ("", "untyped"),
            };
            if kind == "counter" {
                counters.push(name);
            }
            match help.take() {
                Some((helped, text)) if helped == name => {
                    flush_help(&mut out, Some((helped, text)), suffix);
                }
                other => flush_help(&mut out, other, ""),
            }
            out.push_str("# TYPE ");
            out.push_str(name);
            out.push_str(suffix);
            out.push(' ');
            out.push_str(kind);
            out.push('\n');
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            flush_help(&mut out, help.take(), "");
            let sample_name = line.split(['{', ' ']).next().unwrap_or("");
            let created = sample_name
                .strip_suffix("_created")
                .is_some_and(|family| counters.contains(&family));
            if !created {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    flush_help(&mut out, help, "");
    out
}

fn flush_help(out: &mut String, help: Option<(&str, String)>, suffix: &str) {
    if let Some((name, text)) = help {
        out.push_str("# HELP ");
        out.push_str(name);
        out.push_str(suffix);
        out.push(' ');
        out.push_str(&text);
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_asks_for_openmetrics_and_curl_gets_the_old_text() {
        let prometheus = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,\
                          application/openmetrics-text;version=0.0.1;q=0.5,\
                          text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,\
                          text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("*/*")), Format::PrometheusText);
        assert_eq!(Format::negotiate(None), Format::PrometheusText);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text")),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0, text/plain")),
            Format::PrometheusText
        );
        assert_eq!(
            Format::negotiate(Some("text/plain;q=0.9, application/openmetrics-text;q=0.5")),
            Format::PrometheusText
        );
    }

    #[test]
    fn counters_are_named_with_their_total_and_units_created_and_eof_go() {
        let openmetrics = "# HELP d_requests Requests \\\"served\\\".\n\
                           # TYPE d_requests counter\n\
                           d_requests_total{reason=\"x\"} 3\n\
                           d_requests_created 1.7e9\n\
                           # HELP d_wait_seconds Wait.\n\
                           # TYPE d_wait_seconds histogram\n\
                           # UNIT d_wait_seconds seconds\n\
                           d_wait_seconds_sum 0.5\n\
                           d_wait_seconds_count 1\n\
                           d_wait_seconds_bucket{le=\"+Inf\"} 1\n\
                           # HELP vllm:num_requests_waiting Waiting.\n\
                           # TYPE vllm:num_requests_waiting gauge\n\
                           vllm:num_requests_waiting{model_name=\"m\"} 6\n\
                           # EOF\n";
        assert_eq!(
            Format::PrometheusText.render(openmetrics),
            "# HELP d_requests_total Requests \"served\".\n\
             # TYPE d_requests_total counter\n\
             d_requests_total{reason=\"x\"} 3\n\
             # HELP d_wait_seconds Wait.\n\
             # TYPE d_wait_seconds histogram\n\
             d_wait_seconds_sum 0.5\n\
             d_wait_seconds_count 1\n\
             d_wait_seconds_bucket{le=\"+Inf\"} 1\n\
             # HELP vllm:num_requests_waiting Waiting.\n\
             # TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{model_name=\"m\"} 6\n"
        );
        let joined = Format::OpenMetrics.render("a 1\n# EOF\nb 2\n# EOF\n");
        assert_eq!(joined, "a 1\nb 2\n# EOF\n");
    }
}
