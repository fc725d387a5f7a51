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
        out
    }
}
