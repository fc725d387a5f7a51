//! Server counters, rendered in Prometheus text format.
//!
//! Labels are bounded: tables come from the schema, refusal codes are
//! Hearth's and the app validators' (at most [`REFUSAL_CODES_MAX`] kept
//! apart), and connections are summarised (the largest backlog, a count per
//! backlog bucket), never labelled one by one.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Distinct refusal codes counted apart; later new codes count as `OTHER`.
pub const REFUSAL_CODES_MAX: usize = 256;

/// Upper bounds (seconds) of the store commit histogram's buckets.
pub const COMMIT_BUCKETS_S: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds (log entries) of the connections-by-backlog buckets.
pub const BACKLOG_BUCKETS: [u64; 6] = [0, 10, 100, 1_000, 10_000, 100_000];

/// A Prometheus histogram of durations with the [`COMMIT_BUCKETS_S`] bounds.
#[derive(Default, Debug)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is above every bound.
    buckets: [AtomicU64; COMMIT_BUCKETS_S.len() + 1],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let i = COMMIT_BUCKETS_S
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(COMMIT_BUCKETS_S.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in COMMIT_BUCKETS_S.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[COMMIT_BUCKETS_S.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", self.count.load(Ordering::Relaxed));
    }
}

/// What the metrics read of one live sync connection.
pub trait ConnectionGauge: Send + Sync {
    /// The last log position the connection passed to its device (sent,
    /// or skipped as not concerning it).
    fn cursor(&self) -> u64;
    /// Bytes queued for its socket.
    fn send_queue_bytes(&self) -> usize;
}

/// A connection counted in the backlog metrics until dropped.
pub struct Tracked {
    metrics: Arc<Metrics>,
    id: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.metrics
            .connections
            .lock()
            .expect("connections lock")
            .remove(&self.id);
    }
}

#[derive(Default)]
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
    /// TCP connections closed at once because `connections_max` (or the
    /// WebSocket cap) was reached.
    pub connections_refused: AtomicU64,
    /// Store batches or write probes that failed.
    pub store_errors: AtomicU64,
    /// The largest WebSocket frame the server built, in bytes.
    pub frame_bytes_largest: AtomicU64,
    /// Room frames (relayed broadcasts, presence diffs) not queued for a
    /// connection whose room queue was full; a missed diff is made good
    /// with the whole list.
    pub room_frames_dropped: AtomicU64,
    /// Log entries removed by compaction since start.
    pub log_compacted: AtomicU64,
    /// The log position compaction has removed entries up to.
    pub log_floor: AtomicU64,
    /// Closed sync connections, by reason (indexed by [`CloseReason`]).
    pub closed: [AtomicU64; CloseReason::ALL.len()],
    /// Mutations applied, per table they wrote (the schema's tables, sorted).
    tables: Vec<(String, AtomicU64)>,
    /// Mutations refused, per code.
    refusals: Mutex<BTreeMap<String, u64>>,
    /// Time to apply and commit one batch (one store transaction).
    pub store_commit_seconds: Histogram,
    /// Live sync connections, for the backlog metrics.
    connections: Mutex<HashMap<u64, Arc<dyn ConnectionGauge>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

/// Why a sync connection ended, as the `reason` label of
/// `hearth_connections_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The device sent a close frame.
    ClientClosed,
    /// The peer went away without a close frame (reset, EOF, broken pipe).
    PeerGone,
    /// Nothing arrived, not even a pong, within `peer_timeout_ms`.
    PeerTimeout,
    /// A frame could not be written within `write_timeout_ms`.
    WriteTimeout,
    /// A frame that could not be decoded, too large, of another protocol
    /// version, or with too many mutations.
    BadInput,
    /// No Hello in time, a second Hello, or a reserved client id.
    Handshake,
    /// The device lost the end of its history (`DEVICE_REWOUND`).
    Rewound,
    /// The store failed to apply the device's mutations.
    StoreError,
    /// The server is shutting down.
    Shutdown,
    /// The connection fell behind what compaction left of the log.
    LogCompacted,
    /// The token was refused, or expired while connected.
    Auth,
    /// Past a rate (`RATE_LIMITED`).
    RateLimited,
}

impl CloseReason {
    pub const ALL: [CloseReason; 12] = [
        CloseReason::ClientClosed,
        CloseReason::PeerGone,
        CloseReason::PeerTimeout,
        CloseReason::WriteTimeout,
        CloseReason::BadInput,
        CloseReason::Handshake,
        CloseReason::Rewound,
        CloseReason::StoreError,
        CloseReason::Shutdown,
        CloseReason::LogCompacted,
        CloseReason::Auth,
        CloseReason::RateLimited,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::PeerGone => "peer_gone",
            CloseReason::PeerTimeout => "peer_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::BadInput => "bad_input",
            CloseReason::Handshake => "handshake",
            CloseReason::Rewound => "rewound",
            CloseReason::StoreError => "store_error",
            CloseReason::Shutdown => "shutdown",
            CloseReason::LogCompacted => "log_compacted",
            CloseReason::Auth => "auth",
            CloseReason::RateLimited => "rate_limited",
        }
    }

    fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|r| *r == self)
            .expect("every reason is listed")
    }
}

impl Metrics {
    /// Metrics for a server of `schema` (its tables label the per-table counts).
    pub fn new(schema: &hearth_engine::Schema) -> Metrics {
        let mut tables: Vec<String> = schema.tables.keys().cloned().collect();
        tables.sort();
        Metrics {
            tables: tables.into_iter().map(|t| (t, AtomicU64::new(0))).collect(),
            ..Metrics::default()
        }
    }

    /// Counts an applied mutation once for each table it wrote.
    pub fn applied_to(&self, mutation: &hearth_engine::Mutation) {
        let mut seen: Vec<&str> = Vec::new();
        for change in &mutation.changes {
            if seen.contains(&change.table.as_str()) {
                continue;
            }
            seen.push(&change.table);
            if let Ok(i) = self
                .tables
                .binary_search_by(|(t, _)| t.as_str().cmp(&change.table))
            {
                self.tables[i].1.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts a refusal under its code.
    pub fn refused(&self, code: &str) {
        let mut refusals = self.refusals.lock().expect("refusals lock");
        let key = if refusals.contains_key(code) || refusals.len() < REFUSAL_CODES_MAX {
            code
        } else {
            "OTHER"
        };
        *refusals.entry(key.to_string()).or_default() += 1;
    }

    /// Counts a sync connection in the backlog metrics while the returned
    /// guard lives.
    pub fn track(self: &Arc<Self>, id: u64, gauge: Arc<dyn ConnectionGauge>) -> Tracked {
        self.connections
            .lock()
            .expect("connections lock")
            .insert(id, gauge);
        Tracked {
            metrics: self.clone(),
            id,
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn closed(&self, reason: CloseReason) -> &AtomicU64 {
        &self.closed[reason.index()]
    }

    /// Notes a frame of `bytes` built to be sent.
    pub fn frame_built(&self, bytes: usize) {
        self.frame_bytes_largest
            .fetch_max(bytes as u64, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let rows: [(&str, &str, &str, &AtomicU64); 15] = [
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
                "Frames that could not be decoded (malformed, too large, another protocol version, too many mutations).",
                &self.frames_malformed,
            ),
            (
                "hearth_connections_refused_total",
                "counter",
                "Connections closed at once because a connection cap was reached.",
                &self.connections_refused,
            ),
            (
                "hearth_store_errors_total",
                "counter",
                "Store batches and write probes that failed.",
                &self.store_errors,
            ),
            (
                "hearth_frame_bytes_largest",
                "gauge",
                "The largest WebSocket frame the server built, in bytes.",
                &self.frame_bytes_largest,
            ),
            (
                "hearth_room_frames_dropped_total",
                "counter",
                "Room frames dropped for a connection whose room queue was full (a missed presence diff is resent as the whole list).",
                &self.room_frames_dropped,
            ),
            (
                "hearth_log_compacted_total",
                "counter",
                "Log entries removed by compaction (--log-retention).",
                &self.log_compacted,
            ),
            (
                "hearth_log_floor",
                "gauge",
                "The log position up to which compaction removed entries; a device with an older cursor re-loads.",
                &self.log_floor,
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
        let name = "hearth_connections_closed_total";
        let _ = writeln!(
            out,
            "# HELP {name} Sync connections closed, by reason.\n# TYPE {name} counter"
        );
        for reason in CloseReason::ALL {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{}\"}} {}",
                reason.label(),
                Self::get(self.closed(reason))
            );
        }
        let name = "hearth_table_mutations_applied_total";
        let _ = writeln!(
            out,
            "# HELP {name} Mutations applied, by table written (a mutation writing two tables counts in each).\n# TYPE {name} counter"
        );
        for (table, count) in &self.tables {
            let _ = writeln!(
                out,
                "{name}{{table=\"{}\"}} {}",
                escape(table),
                Self::get(count)
            );
        }
        let name = "hearth_mutations_refused_total";
        let _ = writeln!(
            out,
            "# HELP {name} Mutations refused, by code (Hearth's codes and the app validators').\n# TYPE {name} counter"
        );
        for (code, count) in self.refusals.lock().expect("refusals lock").iter() {
            let _ = writeln!(out, "{name}{{code=\"{}\"}} {count}", escape(code));
        }
        self.store_commit_seconds.render(
            &mut out,
            "hearth_store_commit_seconds",
            "Time to apply and commit one batch of mutations (one store transaction), in seconds.",
        );
        self.render_backlogs(&mut out);
        out
    }
}

impl Metrics {
    /// The connections' backlog: how many log entries each is behind the
    /// head, as the largest and as a count per bucket, and the largest send
    /// queue.
    fn render_backlogs(&self, out: &mut String) {
        let head = Self::get(&self.server_seq);
        let (mut entries_max, mut queue_max) = (0u64, 0usize);
        let mut buckets = [0u64; BACKLOG_BUCKETS.len() + 1];
        for gauge in self.connections.lock().expect("connections lock").values() {
            let behind = head.saturating_sub(gauge.cursor());
            entries_max = entries_max.max(behind);
            queue_max = queue_max.max(gauge.send_queue_bytes());
            let i = BACKLOG_BUCKETS
                .iter()
                .position(|bound| behind <= *bound)
                .unwrap_or(BACKLOG_BUCKETS.len());
            buckets[i] += 1;
        }
        let name = "hearth_connection_backlog_entries_max";
        let _ = writeln!(
            out,
            "# HELP {name} The most log entries any sync connection is behind the head (a device that gets nothing of recent entries may show up to 1000 it will skip).\n# TYPE {name} gauge\n{name} {entries_max}"
        );
        let name = "hearth_connections_by_backlog_entries";
        let _ = writeln!(
            out,
            "# HELP {name} Sync connections at most `le` log entries behind the head (cumulative).\n# TYPE {name} gauge"
        );
        let mut cumulative = 0;
        for (i, bound) in BACKLOG_BUCKETS.iter().enumerate() {
            cumulative += buckets[i];
            let _ = writeln!(out, "{name}{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += buckets[BACKLOG_BUCKETS.len()];
        let _ = writeln!(out, "{name}{{le=\"+Inf\"}} {cumulative}");
        let name = "hearth_connection_send_queue_bytes_max";
        let _ = writeln!(
            out,
            "# HELP {name} The most bytes queued for any one sync connection's socket.\n# TYPE {name} gauge\n{name} {queue_max}"
        );
    }
}

/// A label value as Prometheus text format writes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
