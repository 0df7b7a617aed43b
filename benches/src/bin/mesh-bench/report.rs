//! The Markdown report: tables of every figure, the machine, the headline
//! ratios and the plots, spliced into docs/benchmarks.md between
//! `<!-- mesh-bench:begin -->` and `<!-- mesh-bench:end -->`.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result, bail};

use crate::results::Results;

pub const BEGIN: &str = "<!-- mesh-bench:begin -->";
pub const END: &str = "<!-- mesh-bench:end -->";
/// The README's short version of the report.
pub const README_BEGIN: &str = "<!-- mesh-bench:readme:begin -->";
pub const README_END: &str = "<!-- mesh-bench:readme:end -->";

fn fmt(value: Option<f64>) -> String {
    match value {
        None => "–".into(),
        Some(v) if !v.is_finite() => "–".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b?).filter(|r| r.is_finite())
}

fn diff(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? - b?)
}

/// A difference with its sign (+12, -3).
fn signed(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_finite() && v >= 0.0 => format!("+{}", fmt(Some(v))),
        other => fmt(other),
    }
}

/// A count, as an integer with thousands separators.
fn count(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_finite() => {
            let digits = format!("{:.0}", v.abs());
            let mut out = String::new();
            for (i, ch) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i) % 3 == 0 {
                    out.push(',');
                }
                out.push(ch);
            }
            if v < 0.0 { format!("-{out}") } else { out }
        }
        _ => "–".into(),
    }
}

/// The headline comparisons, as (what, value) lines.
pub fn headlines(r: &Results) -> Vec<(String, String)> {
    let v = |k: &str| r.value(k);
    let top = r.config.scale_steps.last().copied().unwrap_or(0);
    let mut lines = Vec::new();
    let mut push = |what: String, value: String| lines.push((what, value));
    let has_sidecar = r.modes.iter().any(|m| m == "sidecar");
    if has_sidecar {
        let (node, side) = (
            v(&format!("scale.{top}.node.memory_mib")),
            v(&format!("scale.{top}.sidecar.memory_mib")),
        );
        push(
            format!("data-plane memory at {top} pods per node, node / sidecar"),
            format!(
                "{} MiB / {} MiB = {}x",
                fmt(node),
                fmt(side),
                fmt(ratio(node, side))
            ),
        );
        let (node, side) = (
            v("cpu.1000rps.node.cores_per_1k_rps"),
            v("cpu.1000rps.sidecar.cores_per_1k_rps"),
        );
        push(
            "CPU per 1,000 req/s (1 KiB each way), node / sidecar".into(),
            format!(
                "{} / {} cores = {}x",
                fmt(node),
                fmt(side),
                fmt(ratio(node, side))
            ),
        );
        let (node, side) = (
            v(&format!("scale.{top}.node.cpu_s_per_1k")),
            v(&format!("scale.{top}.sidecar.cpu_s_per_1k")),
        );
        push(
            format!("CPU s per 1,000 requests over {top} pods per node, node / sidecar"),
            format!(
                "{} / {} = {}x",
                fmt(node),
                fmt(side),
                fmt(ratio(node, side))
            ),
        );
    }
    let plain_p99 = v("latency.1000rps.plaintext.p99");
    for mode in r.modes.iter().filter(|m| *m != "plaintext") {
        push(
            format!("added p99 at 1,000 req/s, {mode} mode"),
            format!(
                "{} µs",
                signed(diff(v(&format!("latency.1000rps.{mode}.p99")), plain_p99))
            ),
        );
    }
    for mode in r.modes.iter().filter(|m| *m != "plaintext") {
        push(
            format!("{mode} mode / plaintext: connections/s, iperf3 1 stream, 4 streams"),
            format!(
                "{}x, {}x, {}x",
                fmt(ratio(
                    v(&format!("conn_rate.{mode}.per_s")),
                    v("conn_rate.plaintext.per_s")
                )),
                fmt(ratio(
                    v(&format!("iperf.1.{mode}.gbps")),
                    v("iperf.1.plaintext.gbps")
                )),
                fmt(ratio(
                    v(&format!("iperf.4.{mode}.gbps")),
                    v("iperf.4.plaintext.gbps")
                )),
            ),
        );
    }
    push(
        "node mode's memory per added pod (linear fit)".into(),
        format!("{} KiB", fmt(v("scale.node.slope_kib_per_pod"))),
    );
    lines
}

/// How busy the host was during the rounds, as a clause of the report's
/// first paragraph (empty for results from before it was measured).
fn host_load(r: &Results) -> String {
    match (
        r.value("host.rounds.steal_pct"),
        r.value("host.rounds.iowait_pct"),
    ) {
        (Some(steal), Some(iowait)) => format!(
            " (during the rounds the host stole {}% of this VM's CPU time, and {}% was I/O wait)",
            fmt(Some(steal)),
            fmt(Some(iowait))
        ),
        _ => String::new(),
    }
}

/// The report section (markers included); `images` is the path of the
/// plots relative to the Markdown file.
pub fn section(r: &Results, images: &str) -> String {
    let v = |k: &str| r.value(k);
    let m = &r.machine;
    let c = &r.config;
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}");
    let _ = writeln!(
        s,
        "## Node mode vs sidecar mode vs plaintext, {}\n\n\
         Generated by `cargo xtask bench{}` (benches/src/bin/mesh-bench/) at commit `{}`: \
         {}, {} cores, kernel {}; the machine is shared, so compare within one run{}. \
         Raw figures: [bench/results.json]({images}/results.json).\n",
        m.date.get(..10).unwrap_or(&m.date),
        if c.quick { " --quick" } else { "" },
        m.git_commit,
        m.cpu_model,
        m.cores,
        m.kernel,
        host_load(r),
    );
    let _ = writeln!(
        s,
        "Modes: {}. Two nodes, a client pod on node 0 and a server pod on node 1 per mode, one \
         CA and one node agent per node for the whole run. The server is mesh-bench's own \
         HTTP/1.1 server (tokio, keep-alive); every request is a POST of 1 KiB answered with \
         1 KiB. Latency comes from an open-loop generator in the client pod timing each request \
         from its scheduled start (coordinated-omission corrected), {} s per rate; the modes \
         are interleaved round by round and each figure is the median of {} round(s).\n",
        r.modes.join(", "),
        c.latency_seconds,
        c.rounds
    );
    let _ = writeln!(s, "### Headline\n\n| | |\n|---|---|");
    for (what, value) in headlines(r) {
        let _ = writeln!(s, "| {what} | {value} |");
    }
    let _ = writeln!(
        s,
        "\n### Latency under constant-rate load (µs)\n\n\
         | rate | mode | p50 | p90 | p99 | p99.9 | achieved req/s | data-plane cores |\n\
         |---|---|---|---|---|---|---|---|"
    );
    for (label, name) in [
        ("100rps", "100/s".to_string()),
        ("1000rps", "1,000/s".to_string()),
        ("high", format!("{}/s", count(v("latency.high.rate")))),
    ] {
        for mode in &r.modes {
            let k = format!("latency.{label}.{mode}");
            let _ = writeln!(
                s,
                "| {name} | {mode} | {} | {} | {} | {} | {} | {} |",
                fmt(v(&format!("{k}.p50"))),
                fmt(v(&format!("{k}.p90"))),
                fmt(v(&format!("{k}.p99"))),
                fmt(v(&format!("{k}.p999"))),
                fmt(v(&format!("{k}.achieved_rps"))),
                fmt(v(&format!("cpu.{label}.{mode}.cores"))),
            );
        }
    }
    let _ = writeln!(
        s,
        "\n### Throughput and new connections\n\n\
         | mode | iperf3 1 stream (Gbit/s) | 4 streams | connections/s ({} clients) | new connection + request p50 / p99 (µs) | data-plane CPU per new connection (µs) |\n\
         |---|---|---|---|---|---|",
        c.conn_rate_clients
    );
    for mode in &r.modes {
        let _ = writeln!(
            s,
            "| {mode} | {} | {} | {} | {} / {} | {} |",
            fmt(v(&format!("iperf.1.{mode}.gbps"))),
            fmt(v(&format!("iperf.4.{mode}.gbps"))),
            count(v(&format!("conn_rate.{mode}.per_s"))),
            fmt(v(&format!("conn_cost.{mode}.p50"))),
            fmt(v(&format!("conn_cost.{mode}.p99"))),
            fmt(v(&format!("conn_rate.{mode}.cpu_us_per_conn"))),
        );
    }
    let _ = writeln!(
        s,
        "\n### Scale\n\nServer pods added to both nodes; {} requests spread round-robin over \
         all of them from the mode's client pod at each step (data-plane CPU read around it); \
         one pod per step timed from its creation to the first request it served (in node mode, the first its node agent let in through the tunnel, by the audit record's time).\n\n\
         | pods per node | mode | data-plane memory (MiB) | processes | CPU s per 1,000 requests | pod start → first served (ms) |\n\
         |---|---|---|---|---|---|",
        c.scale_requests
    );
    for step in &c.scale_steps {
        for mode in r.modes.iter().filter(|m| *m != "plaintext") {
            let k = format!("scale.{step}.{mode}");
            let _ = writeln!(
                s,
                "| {step} | {mode} | {} | {} | {} | {} |",
                fmt(v(&format!("{k}.memory_mib"))),
                count(v(&format!("{k}.processes"))),
                fmt(v(&format!("{k}.cpu_s_per_1k"))),
                fmt(v(&format!("{k}.first_served_ms"))),
            );
        }
    }
    let _ = writeln!(
        s,
        "\nNode mode's two agents grow by {} KiB per added pod (least squares over the steps).\n",
        fmt(v("scale.node.slope_kib_per_pod"))
    );
    let _ = writeln!(
        s,
        "### Churn\n\n{} cycles (a node-mode pod on node 1 enrolled and another removed every \
         150 ms) while the node-mode client opened and closed {} connections ({} failed); node \
         1's agent:\n\n| | baseline | peak | end |\n|---|---|---|---|\n\
         | RSS (MiB) | {} | {} | {} |\n| open fds | {} | {} | {} |\n",
        count(v("churn.cycles")),
        count(v("churn.conns.requests")),
        count(v("churn.conns.errors")),
        fmt(v("churn.rss_mib.baseline")),
        fmt(v("churn.rss_mib.peak")),
        fmt(v("churn.rss_mib.end")),
        count(v("churn.fds.baseline")),
        count(v("churn.fds.peak")),
        count(v("churn.fds.end")),
    );
    let _ = writeln!(
        s,
        "### Issue 11 figures (node mode against plaintext, this run)\n\n\
         | figure | value |\n|---|---|\n\
         | CPU of both agents per new connection | {} µs |\n\
         | CPU of both agents per 1,000 req/s (1 KiB each way) | {} cores |\n\
         | context switches of both agents per new connection / per request at 1,000 req/s | {} / {} |\n\
         | added new-connection cost p50 / p99 | {} / {} µs |\n\
         | connection rate / plaintext | {}x |\n\
         | iperf3 1 stream / 4 streams, / plaintext | {}x / {}x |\n\
         | added p50 / p99 at 1,000 req/s | {} / {} µs |\n\
         | RSS per agent with {} idle captured connections (client / server side) | {} / {} MiB ({} / {} KiB per connection) |\n",
        fmt(v("conn_rate.node.cpu_us_per_conn")),
        fmt(v("cpu.1000rps.node.cores_per_1k_rps")),
        fmt(v("conn_rate.node.switches_per_conn")),
        fmt(v("cpu.1000rps.node.switches_per_req")),
        signed(diff(v("conn_cost.node.p50"), v("conn_cost.plaintext.p50"))),
        signed(diff(v("conn_cost.node.p99"), v("conn_cost.plaintext.p99"))),
        fmt(ratio(
            v("conn_rate.node.per_s"),
            v("conn_rate.plaintext.per_s")
        )),
        fmt(ratio(v("iperf.1.node.gbps"), v("iperf.1.plaintext.gbps"))),
        fmt(ratio(v("iperf.4.node.gbps"), v("iperf.4.plaintext.gbps"))),
        signed(diff(
            v("latency.1000rps.node.p50"),
            v("latency.1000rps.plaintext.p50")
        )),
        signed(diff(
            v("latency.1000rps.node.p99"),
            v("latency.1000rps.plaintext.p99")
        )),
        count(v("idle.node.requests")),
        fmt(v("idle.node.client_agent.rss_mib")),
        fmt(v("idle.node.server_agent.rss_mib")),
        fmt(v("idle.node.client_agent.kib_per_conn")),
        fmt(v("idle.node.server_agent.kib_per_conn")),
    );
    let _ = writeln!(
        s,
        "### Plots\n\n![latency percentiles per mode and rate]({images}/latency.svg)\n\n\
         ![data-plane memory and CPU against pods per node]({images}/scale.svg)\n\n\
         ![agent RSS and descriptors under churn]({images}/churn.svg)\n\n{END}"
    );
    s
}

/// The README's section: the headline figures and the scale plot.
pub fn readme_section(r: &Results) -> String {
    let mut s = format!(
        "{README_BEGIN}\n## Node mode vs sidecar mode\n\n\
         The same proxy deployed both ways, measured side by side with plaintext in one run of \
         `cargo xtask bench` ({}, {} cores, kernel {}, commit `{}`; details and every figure in \
         [docs/benchmarks.md](docs/benchmarks.md)):\n\n| | |\n|---|---|\n",
        r.machine.date.get(..10).unwrap_or(&r.machine.date),
        r.machine.cores,
        r.machine.kernel,
        r.machine.git_commit
    );
    for (what, value) in headlines(r) {
        let _ = writeln!(s, "| {what} | {value} |");
    }
    let _ = write!(
        s,
        "\n![data-plane memory and CPU against pods per node](docs/bench/scale.svg)\n{README_END}"
    );
    s
}

/// Replaces the section between `begin` and `end` in `path` (appending it
/// when the file has neither), keeping the rest of the file.
pub fn splice(path: &Path, begin: &str, end: &str, section: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let updated = match (text.find(begin), text.find(end)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{}{}",
            &text[..b],
            section.trim_end(),
            &text[e + end.len()..]
        ),
        (None, None) => format!("{}\n\n{}\n", text.trim_end(), section.trim_end()),
        _ => bail!("{} has a broken {begin} / {end} pair", path.display()),
    };
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}
