//! Server counters, rendered in Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default, Debug)]
pub struct Metrics {
    pub connections_open: AtomicU64,
    pub connections_total: AtomicU64,
    pub mutations_applied: AtomicU64,
    pub mutations_rejected: AtomicU64,
    pub mutations_duplicate: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub frames_malformed: AtomicU64,
    pub server_seq: AtomicU64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn render(&self) -> String {
        let rows: [(&str, &str, &str, &AtomicU64); 9] = [
            (
                "hearth_connections",
                "gauge",
                "Open WebSocket sync connections.",
                &self.connections_open,
            ),
            (
                "hearth_connections_total",
                "counter",
                "WebSocket sync connections accepted.",
                &self.connections_total,
            ),
            (
                "hearth_mutations_applied_total",
                "counter",
                "Mutations applied to the store.",
                &self.mutations_applied,
            ),
            (
                "hearth_mutations_rejected_total",
                "counter",
                "Mutations refused, with a reason sent to the device.",
                &self.mutations_rejected,
            ),
            (
                "hearth_mutations_duplicate_total",
                "counter",
                "Mutations received again and not re-applied.",
                &self.mutations_duplicate,
            ),
            (
                "hearth_bytes_in_total",
                "counter",
                "WebSocket payload bytes received.",
                &self.bytes_in,
            ),
            (
                "hearth_bytes_out_total",
                "counter",
                "WebSocket payload bytes sent.",
                &self.bytes_out,
            ),
            (
                "hearth_frames_malformed_total",
                "counter",
                "Frames that could not be decoded.",
                &self.frames_malformed,
            ),
            (
                "hearth_server_seq",
                "gauge",
                "Global sequence number of the newest change log entry.",
                &self.server_seq,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                Self::get(value)
            );
        }
        out
    }
}
