//! The `hearth` command: `serve` runs the sync server (with the demo app),
//! `client` is a native device on a SQLite file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hearth::native_client::{self, Goal, SyncError};
use hearth_engine::{
    Client, ClientConfig, ClientError, Event, ExecOutcome, Output, Schema, TextEdit, Value,
    DEMO_SCHEMA,
};

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "Hearth: a local-first sync engine for web apps"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sync server (and the demo app). This is the default.
    Serve(ServeArgs),
    /// A native device: a local SQLite database that syncs with a server.
    Client(ClientArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The app's schema (TOML). Default: the built-in demo schema.
    #[arg(long)]
    schema: Option<PathBuf>,
    /// Where the store lives.
    #[arg(long, default_value = "hearth-data")]
    data: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: SocketAddr,
    /// Keep the change log this long (`30d`, `12h`, `90s`): older entries
    /// are removed (their effect stays in the store), and a device whose
    /// cursor is older re-loads its subscriptions. Default: keep it all.
    #[arg(long, value_parser = humantime::parse_duration)]
    log_retention: Option<std::time::Duration>,
    /// How the server's log (on stderr) is written: `text` for people,
    /// `json` for log collectors (one object per line with `timestamp`,
    /// `level`, `target`, `message` and the event's fields).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve the app's static files from DIR at `/`, in place of the demo
    /// app. Hearth's own files (/hearth.js, /hearth-worker.js, /pkg/...)
    /// stay served beside them.
    #[arg(long, value_name = "DIR")]
    app: Option<PathBuf>,
    /// Print what starting would do to the store for this schema (the
    /// schema change's steps, or why it is refused) and exit, changing
    /// nothing: 0 when `serve` would start, 1 when it would refuse.
    #[arg(long)]
    check: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Sends the server's `tracing` events (INFO and above) to stderr.
fn init_logs(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        // Flattened: `message` and the fields sit beside `level` and `target`.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    if let Err(e) = installed {
        eprintln!("hearth: cannot set up logging: {e}");
    }
}

#[derive(clap::Args)]
struct ClientArgs {
    /// The device's database file (created if missing).
    #[arg(long)]
    db: PathBuf,
    /// The server's sync URL, e.g. ws://127.0.0.1:8787/sync
    #[arg(long)]
    server: Option<String>,
    /// How long to wait for the server, in seconds.
    #[arg(long, default_value_t = 10)]
    timeout_s: u64,
    /// The user's token (a JWT) for a server whose schema has [auth]. It
    /// travels in the first frame, never in the URL.
    #[arg(long, env = "HEARTH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    action: ClientAction,
}

#[derive(Subcommand)]
enum ClientAction {
    /// Write locally (one transaction), then sync it. Prints one JSON line.
    /// Exit 0: applied or queued; 3: refused by the server.
    Exec { sql: String, params: Option<String> },
    /// Push pending writes and pull until caught up. Exit 2: server unreachable.
    Sync,
    /// Read the local database. Prints one JSON object per row.
    Query { sql: String, params: Option<String> },
    /// Resolve an open manual-merge conflict (a row of hearth_conflicts) by
    /// writing VALUE_JSON to its cell, then sync it. Prints one JSON line
    /// like exec, with the same exit codes.
    Resolve {
        /// The conflict's id (hearth_conflicts.id).
        id: String,
        /// The value to keep, as JSON: 4.5, "text", null, ...
        value_json: String,
    },
    /// Follow a stream of the schema (`[streams.NAME]`) with PARAMS_JSON
    /// ('{"list":"groceries"}'), then sync until its rows are here. Prints
    /// one JSON line. Later `sync` calls keep the stream's rows current.
    /// Exit 2: server unreachable (the subscription is kept and loads on the
    /// next sync); 3: refused by the server.
    Subscribe {
        stream: String,
        #[arg(default_value = "{}")]
        params_json: String,
    },
    /// Stop following a stream: its rows that no other subscription holds
    /// leave this device (rows with pending writes stay until they settle).
    /// Works offline. Prints one JSON line.
    Unsubscribe {
        stream: String,
        #[arg(default_value = "{}")]
        params_json: String,
    },
    /// List this device's subscriptions, one JSON object per line.
    Subscriptions,
    /// List the outbox, oldest first: one JSON object per pending write
    /// (mutation, tables, rows, madeAt in ms since the epoch, attempts, sent).
    /// Works offline.
    Pending,
    /// Print the verdict on write MUTATION (the "mutation" exec printed), as
    /// this device knows it, without syncing: {"mutation", "status":
    /// "pending" | "applied" | "rejected", ...}. Exit 1 for a write this
    /// device does not know.
    Settled { mutation: u64 },
    /// Drop pending write MUTATION on purpose: undone locally, never sent.
    /// Works offline. Prints {"mutation", "undone"}. Exit 1 (NOT_PENDING,
    /// SENT) when it settled already or went out to the server.
    Discard { mutation: u64 },
    /// Edit a text column by position, then sync it. EDITS_JSON:
    /// '[{"index":0,"delete":0,"insert":"x"}]' (positions in Unicode
    /// characters, each edit on the text the previous one left). Prints one
    /// JSON line like exec, with the same exit codes.
    EditText {
        table: String,
        /// The row's primary key as JSON: '"c1"' or 7.
        key_json: String,
        column: String,
        edits_json: String,
    },
}

const EXIT_UNREACHABLE: u8 = 2;
const EXIT_REJECTED: u8 = 3;
/// The server refused the token (`AUTH`), or it is another user's device
/// (`AUTH_USER_CHANGED`).
const EXIT_AUTH: u8 = 4;

/// The server's own words for an error it sent, else the error.
fn server_message(e: &SyncError) -> String {
    match e {
        SyncError::Client(hearth_engine::ClientError::Server { message, .. }) => message.clone(),
        other => other.to_string(),
    }
}

/// A refused token or device, said on stderr (`hearth: CODE: reason`).
fn auth_refusal(e: &SyncError) -> Option<ExitCode> {
    match e.server_code() {
        Some(code @ ("AUTH" | "AUTH_USER_CHANGED")) => {
            eprintln!("hearth: {code}: {}", server_message(e));
            Some(ExitCode::from(EXIT_AUTH))
        }
        _ => None,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let command = cli.command.unwrap_or(Command::Serve(ServeArgs {
        schema: None,
        data: PathBuf::from("hearth-data"),
        listen: "127.0.0.1:8787".parse().expect("default address"),
        log_retention: None,
        log_format: LogFormat::Text,
        app: None,
        check: false,
    }));
    let result = match command {
        Command::Serve(args) => runtime.block_on(serve(args)).map(|()| ExitCode::SUCCESS),
        Command::Client(args) => runtime.block_on(client(args)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hearth: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logs(args.log_format);
    let (source, origin) = match &args.schema {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read schema file {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (DEMO_SCHEMA.to_string(), "built-in demo schema".to_string()),
    };
    let schema = Schema::parse(&source).with_context(|| format!("bad schema ({origin})"))?;
    if args.check {
        return check_store(&args, &schema, &origin);
    }
    let tables: Vec<&str> = schema.tables.keys().map(String::as_str).collect();
    let mut server = hearth_server::Server::builder()
        .schema(schema.clone())
        .data_dir(args.data.clone())
        .listen(args.listen)
        .assets(hearth::assets::ASSETS);
    if let Some(retention) = args.log_retention {
        let ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        anyhow::ensure!(ms > 0, "--log-retention must be longer than 0");
        server = server.configure(move |config| {
            config.log_retention_ms = Some(ms);
            // Look for expired entries a few times per retention, at most each minute.
            config.compact_every_ms = (ms / 4).clamp(1, 60_000);
        });
    }
    if let Some(app) = args.app.clone() {
        server = server.app_dir(app);
    }
    let running = server.start().await?;
    // Whoever reads our stdout may go away (a closed pipe); serving matters
    // more than these lines, so write errors are ignored rather than fatal.
    let say = |line: String| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    say(format!(
        "hearth: serving http://{} (sync at ws://{}/sync)",
        running.addr, running.addr
    ));
    say(format!(
        "hearth: schema version {} from {origin}: tables {}; data in {}",
        schema.version,
        tables.join(", "),
        args.data.display()
    ));
    match &args.app {
        Some(dir) => say(format!("hearth: serving the app in {} at /", dir.display())),
        None => say("hearth: serving the demo app at / (--app DIR serves yours)".to_string()),
    }
    tracing::info!(
        addr = %running.addr,
        schema_version = schema.version,
        data = %args.data.display(),
        "serving http://{} with schema version {} from {origin}",
        running.addr,
        schema.version
    );
    // Ctrl-C or a service manager's SIGTERM: stop taking connections and let
    // the store finish its batch. (SIGKILL loses nothing acknowledged either.)
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    say("hearth: shutting down".to_string());
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

/// `serve --check`: what starting would do to the store, on stdout.
fn check_store(args: &ServeArgs, schema: &Schema, origin: &str) -> anyhow::Result<()> {
    let (version, plan) = hearth_server::check(&args.data, schema).with_context(|| {
        format!(
            "serve would refuse schema version {} ({origin})",
            schema.version
        )
    })?;
    let store = match version {
        None => format!("there is no store in {} yet", args.data.display()),
        Some(v) => format!(
            "the store in {} is at schema version {v}",
            args.data.display()
        ),
    };
    println!(
        "hearth: {store}; {origin} is schema version {}",
        schema.version
    );
    if plan.steps.is_empty() {
        println!("hearth: serve would change no table");
    } else {
        println!("hearth: serve would, in one transaction:");
        for step in &plan.steps {
            println!("  {step}");
        }
        if plan.reshapes() && version.is_some() {
            println!(
                "hearth: and compact the change log: devices that had not seen its last entry re-load their rows once"
            );
        }
    }
    println!("hearth: nothing was changed (--check)");
    Ok(())
}

fn parse_params(params: Option<&str>) -> anyhow::Result<Vec<Value>> {
    let Some(text) = params else {
        return Ok(Vec::new());
    };
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| invalid(format!("PARAMS_JSON is not valid JSON ({e})")))?;
    refuse_inexact_integers("PARAMS_JSON", text)?;
    match json {
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                Value::from_json(item).map_err(|e| invalid(format!("parameter {}: {e}", i + 1)))
            })
            .collect(),
        _ => Err(invalid(
            "PARAMS_JSON must be a JSON array, e.g. '[\"a\", 1]'".into(),
        )),
    }
}

/// A stream's parameters from the command line's JSON, checked against the
/// stream's declaration in the device's schema.
fn stream_params(
    device: &Client,
    stream: &str,
    params_json: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, hearth_engine::filter::Param>> {
    let schema = device.schema().context("this database has no schema yet")?;
    let s = schema.streams.get(stream).ok_or_else(|| {
        let names: Vec<&str> = schema.streams.keys().map(String::as_str).collect();
        invalid(format!(
            "the schema has no stream '{stream}' (its streams: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ))
    })?;
    let json: serde_json::Value = serde_json::from_str(params_json).map_err(|e| {
        invalid(format!(
            "PARAMS_JSON is not JSON ({e}): give '{{\"list\":\"groceries\"}}'"
        ))
    })?;
    refuse_inexact_integers("PARAMS_JSON", params_json)?;
    s.filter
        .params_from_json(&json)
        .map_err(|e| invalid(format!("stream '{stream}': {e}")))
}

/// A command's arguments that cannot be used: reported like the engine's
/// own `INVALID_ARGUMENT`, before anything is written.
fn invalid(message: String) -> anyhow::Error {
    anyhow::anyhow!("INVALID_ARGUMENT: {message}")
}

/// One JSON value given on the command line (`what` names the argument).
fn parse_value(what: &str, example: &str, text: &str) -> anyhow::Result<Value> {
    let json: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        invalid(format!(
            "{what} is not valid JSON ({e}); text needs quotes, e.g. {example}"
        ))
    })?;
    refuse_inexact_integers(what, text)?;
    Value::from_json(&json).map_err(|e| invalid(format!("{what}: {e}")))
}

/// Refuses an integer literal (digits, no fraction or exponent) in valid JSON
/// `text` that does not fit SQLite's 64 bits: serde_json reads one beyond
/// 2^64 as an inexact real, which would be stored as another number.
fn refuse_inexact_integers(what: &str, text: &str) -> anyhow::Result<()> {
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        match c {
            // Skip a string, escapes included.
            '"' => {
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '-' | '0'..='9' => {
                let mut end = start + c.len_utf8();
                while let Some(&(i, c)) = chars.peek() {
                    if !(c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')) {
                        break;
                    }
                    end = i + c.len_utf8();
                    chars.next();
                }
                let token = &text[start..end];
                let integer = !token.contains(['.', 'e', 'E']);
                // Within 64 bits unsigned, serde_json reads it exactly and
                // `Value::from_json` refuses what SQLite cannot hold.
                if integer && token.parse::<i64>().is_err() && token.parse::<u64>().is_err() {
                    return Err(invalid(format!(
                        "{what}: integer {token} is outside SQLite's 64-bit range: give it as a string, or as a real (with a fraction or exponent) if an inexact number will do"
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// `[{"index": 0, "delete": 0, "insert": "x"}, ...]`; `delete` defaults to
/// 0 and `insert` to "".
fn parse_edits(text: &str) -> anyhow::Result<Vec<TextEdit>> {
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| invalid(format!("EDITS_JSON is not valid JSON ({e})")))?;
    let serde_json::Value::Array(items) = json else {
        return Err(invalid(
            "EDITS_JSON must be a JSON array, e.g. '[{\"index\":0,\"delete\":0,\"insert\":\"x\"}]'"
                .to_string(),
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let bad = |why: &str| invalid(format!("EDITS_JSON edit {}: {why}", i + 1));
            let serde_json::Value::Object(fields) = item else {
                return Err(bad("must be an object {\"index\", \"delete\", \"insert\"}"));
            };
            if let Some(other) = fields
                .keys()
                .find(|k| !matches!(k.as_str(), "index" | "delete" | "insert"))
            {
                return Err(bad(&format!(
                    "unknown field \"{other}\" (expected index, delete, insert)"
                )));
            }
            let count = |name: &str, default: Option<u64>| match fields.get(name) {
                None => default.ok_or_else(|| bad(&format!("\"{name}\" is missing"))),
                Some(n) => n
                    .as_u64()
                    .ok_or_else(|| bad(&format!("\"{name}\" must be a whole number >= 0"))),
            };
            let insert = match fields.get("insert") {
                None => String::new(),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(_) => return Err(bad("\"insert\" must be a string")),
            };
            Ok(TextEdit {
                index: count("index", None)?,
                delete: count("delete", Some(0))?,
                insert,
            })
        })
        .collect()
}

/// A fresh device learns the schema from the server before its first
/// write. `None`: go on; `Some(code)`: the server could not be reached.
async fn ensure_schema(device: &mut Client, url: &str, timeout: Duration) -> Option<ExitCode> {
    if device.schema().is_some() {
        return None;
    }
    match native_client::sync_once(device, url, Goal::Synced, timeout).await {
        Ok(_) => None,
        Err(e) => auth_refusal(&e).or_else(|| {
            eprintln!("hearth: this database has no schema yet and the first sync failed: {e}");
            Some(ExitCode::from(EXIT_UNREACHABLE))
        }),
    }
}

/// Makes one local write (`exec`, `resolve`, `edit-text`), then syncs it and
/// prints its JSON line. A write that fails on the device is an error
/// (`hearth: CODE: reason`, exit 1): nothing was written.
async fn write_then_sync(
    device: &mut Client,
    url: &str,
    timeout: Duration,
    write: impl FnOnce(&mut Client) -> Result<(ExecOutcome, Output), ClientError>,
) -> anyhow::Result<ExitCode> {
    let (outcome, _) = write(device).map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
    let Some(seq) = outcome.mutation else {
        println!(
            "{}",
            serde_json::json!({"mutation": null, "status": "applied", "rowsAffected": outcome.rows_affected, "reason": null, "code": null})
        );
        return Ok(ExitCode::SUCCESS);
    };
    let line = |seq: u64, status: &str, reason: Option<String>, code: Option<String>| serde_json::json!({"mutation": seq, "status": status, "rowsAffected": outcome.rows_affected, "reason": reason, "code": code});
    match native_client::sync_once(device, url, Goal::Resolved(seq), timeout).await {
        Ok(events) => {
            let seq = native_client::renumbered(seq, &events);
            let rejected = events.iter().find_map(|e| match e {
                Event::Rejected {
                    seq: s,
                    code,
                    reason,
                    undone,
                } if *s == seq => Some((code.clone(), reason.clone(), undone_json(undone))),
                _ => None,
            });
            match rejected {
                Some((code, reason, undone)) => {
                    let mut out = line(seq, "rejected", Some(reason), Some(code));
                    out["undone"] = undone;
                    println!("{out}");
                    Ok(ExitCode::from(EXIT_REJECTED))
                }
                None => {
                    println!("{}", line(seq, "applied", None, None));
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        // Whatever stopped the sync (no server, a timeout, a closed
        // connection, a server that could not store it), the write is
        // committed locally and waits in the outbox.
        Err(e) => {
            let code = e.server_code().map(str::to_string);
            println!("{}", line(seq, "queued", Some(e.to_string()), code));
            // A refused token: the write waits, but the user must act.
            Ok(auth_refusal(&e).unwrap_or(ExitCode::SUCCESS))
        }
    }
}

async fn client(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_secs(args.timeout_s);
    let mut device = native_client::open_device(&args.db, ClientConfig::default())
        .with_context(|| format!("cannot open device database {}", args.db.display()))?;
    if let Err(e) = device.set_token(args.token.clone()) {
        eprintln!("hearth: {}: {e}", e.code());
        return Ok(ExitCode::from(EXIT_AUTH));
    }
    let need_server = |what: &str| {
        args.server
            .clone()
            .with_context(|| format!("{what} needs --server URL (e.g. ws://127.0.0.1:8787/sync)"))
    };
    match args.action {
        ClientAction::Query { sql, params } => {
            let params = parse_params(params.as_deref())?;
            if device.schema().is_none() {
                anyhow::bail!("this database has no schema yet: run `hearth client --db ... --server URL sync` first");
            }
            let result = device
                .query(&sql, &params)
                .map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
            for row in result.to_json_objects() {
                println!("{row}");
            }
            Ok(ExitCode::SUCCESS)
        }
        ClientAction::Sync => {
            let url = need_server("sync")?;
            match native_client::sync_once(&mut device, &url, Goal::Synced, timeout).await {
                Ok(events) => {
                    let status = device.status();
                    let rejected: Vec<serde_json::Value> = events
                        .iter()
                        .filter_map(|e| match e {
                            Event::Rejected {
                                seq,
                                code,
                                reason,
                                undone,
                            } => Some(
                                serde_json::json!({"mutation": seq, "code": code, "reason": reason, "undone": undone_json(undone)}),
                            ),
                            _ => None,
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::json!({"serverSeq": status.server_seq, "pending": status.pending, "rejected": rejected})
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e @ (SyncError::Unreachable { .. } | SyncError::Timeout(_))) => {
                    eprintln!("hearth: {e}");
                    Ok(ExitCode::from(EXIT_UNREACHABLE))
                }
                // An expired token, a server limiting this device's rate, or
                // a server whose schema is older than the device's: like an
                // unreachable server, the device keeps its pending writes
                // and tries again later.
                Err(e)
                    if matches!(
                        e.server_code(),
                        Some("AUTH_EXPIRED" | "RATE_LIMITED" | "SCHEMA_AHEAD")
                    ) =>
                {
                    let code = e.server_code().unwrap_or_default();
                    eprintln!("hearth: {code}: {}", server_message(&e));
                    Ok(ExitCode::from(EXIT_UNREACHABLE))
                }
                Err(e) => match auth_refusal(&e) {
                    Some(code) => Ok(code),
                    None => Err(e.into()),
                },
            }
        }
        ClientAction::Exec { sql, params } => {
            let url = need_server("exec")?;
            let params = parse_params(params.as_deref())?;
            if let Some(code) = ensure_schema(&mut device, &url, timeout).await {
                return Ok(code);
            }
            write_then_sync(&mut device, &url, timeout, |d| {
                d.exec(&sql, &params, native_client::now_ms())
            })
            .await
        }
        ClientAction::Resolve { id, value_json } => {
            let url = need_server("resolve")?;
            let value = parse_value("VALUE_JSON", r#"'"red"' or 4.5"#, &value_json)?;
            if let Some(code) = ensure_schema(&mut device, &url, timeout).await {
                return Ok(code);
            }
            write_then_sync(&mut device, &url, timeout, |d| {
                d.resolve(&id, &value, native_client::now_ms())
            })
            .await
        }
        ClientAction::Subscribe {
            stream,
            params_json,
        } => {
            let url = need_server("subscribe")?;
            if let Some(code) = ensure_schema(&mut device, &url, timeout).await {
                return Ok(code);
            }
            let params = stream_params(&device, &stream, &params_json)?;
            let (id, _) = match device.subscribe(&stream, params) {
                Ok(taken) => taken,
                // Past the bound: refused as the server would refuse it,
                // and nothing already held changes.
                Err(e @ hearth_engine::ClientError::TooManySubscriptions { .. }) => {
                    eprintln!("hearth: {}: {e}", e.code());
                    println!(
                        "{}",
                        serde_json::json!({"subscription": null, "stream": stream, "status": "refused", "code": e.code(), "reason": e.to_string()})
                    );
                    return Ok(ExitCode::from(EXIT_REJECTED));
                }
                Err(e) => return Err(anyhow::anyhow!("{}: {e}", e.code())),
            };
            let result = native_client::sync_once(&mut device, &url, Goal::Synced, timeout).await;
            let info = device.subscriptions()?.into_iter().find(|s| s.id == id);
            let refused = result.as_ref().ok().and_then(|events| {
                events.iter().find_map(|e| match e {
                    Event::SubscriptionRefused {
                        id: r,
                        code,
                        reason,
                    } if *r == id => Some((code.clone(), reason.clone())),
                    _ => None,
                })
            });
            if let Some((code, reason)) = refused {
                eprintln!("hearth: {code}: {reason}");
                println!(
                    "{}",
                    serde_json::json!({"subscription": id, "stream": stream, "status": "refused", "code": code, "reason": reason})
                );
                return Ok(ExitCode::from(EXIT_REJECTED));
            }
            let (rows, loaded) = info.map_or((0, false), |s| (s.rows, s.loaded));
            match result {
                Ok(_) => {
                    println!(
                        "{}",
                        serde_json::json!({"subscription": id, "stream": stream, "status": "loaded", "rows": rows, "loaded": loaded})
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e @ (SyncError::Unreachable { .. } | SyncError::Timeout(_))) => {
                    eprintln!("hearth: {e}; the subscription is kept and loads on the next sync");
                    println!(
                        "{}",
                        serde_json::json!({"subscription": id, "stream": stream, "status": "pending", "rows": rows, "loaded": loaded})
                    );
                    Ok(ExitCode::from(EXIT_UNREACHABLE))
                }
                Err(e) => Err(e.into()),
            }
        }
        ClientAction::Unsubscribe {
            stream,
            params_json,
        } => {
            if device.schema().is_none() {
                anyhow::bail!("this database has no schema yet: it has no subscriptions");
            }
            let params = stream_params(&device, &stream, &params_json)?;
            let id = hearth_engine::client::subscription_id(&stream, &params);
            let found = device.subscriptions()?.iter().any(|s| s.id == id);
            device.unsubscribe(id)?;
            println!(
                "{}",
                serde_json::json!({"subscription": id, "stream": stream, "unsubscribed": found})
            );
            Ok(ExitCode::SUCCESS)
        }
        ClientAction::Subscriptions => {
            for s in device.subscriptions()? {
                println!("{}", serde_json::to_string(&s)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        ClientAction::Pending => {
            for w in device.pending_writes()? {
                println!(
                    "{}",
                    serde_json::json!({"mutation": w.seq, "tables": w.tables, "rows": undone_json(&w.rows), "madeAt": w.made_at_ms, "attempts": w.attempts, "sent": w.sent})
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ClientAction::Settled { mutation } => {
            use hearth_engine::{Settlement, Verdict};
            let line = match device.settlement(mutation)? {
                Settlement::Pending => serde_json::json!({"mutation": mutation, "status": "pending"}),
                Settlement::Settled(Verdict::Applied { server_seq }) => {
                    serde_json::json!({"mutation": mutation, "status": "applied", "serverSeq": server_seq})
                }
                Settlement::Settled(Verdict::Rejected {
                    code,
                    reason,
                    undone,
                }) => serde_json::json!({"mutation": mutation, "status": "rejected", "code": code, "reason": reason, "undone": undone_json(&undone)}),
                Settlement::Unknown => anyhow::bail!(
                    "UNKNOWN_MUTATION: this device knows no write {mutation}: never made here, or settled more than {} writes ago",
                    hearth_engine::client::RECEIPTS_KEPT
                ),
            };
            println!("{line}");
            Ok(ExitCode::SUCCESS)
        }
        ClientAction::Discard { mutation } => match device.discard(mutation) {
            Ok((undone, _)) => {
                println!(
                    "{}",
                    serde_json::json!({"mutation": mutation, "undone": undone_json(&undone)})
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => anyhow::bail!("{}: {e}", e.code()),
        },
        ClientAction::EditText {
            table,
            key_json,
            column,
            edits_json,
        } => {
            let url = need_server("edit-text")?;
            let key = parse_value("KEY_JSON", r#"'"c1"'"#, &key_json)?;
            let edits = parse_edits(&edits_json)?;
            if let Some(code) = ensure_schema(&mut device, &url, timeout).await {
                return Ok(code);
            }
            write_then_sync(&mut device, &url, timeout, |d| {
                d.edit_text(&table, &key, &column, &edits, native_client::now_ms())
            })
            .await
        }
    }
}

/// The rows a refused write had written, as the CLI prints them:
/// `[{"table": "todos", "key": "t1"}, ...]`.
fn undone_json(undone: &[(String, hearth_engine::Value)]) -> serde_json::Value {
    undone
        .iter()
        .map(|(table, key)| serde_json::json!({"table": table, "key": key.to_json()}))
        .collect()
}
