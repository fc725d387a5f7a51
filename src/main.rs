//! The `hearth` command: `serve` runs the sync server (with the demo app),
//! `client` is a native device on a SQLite file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hearth::native_client::{self, Goal, SyncError};
use hearth_engine::{ClientConfig, Event, Schema, Value, DEMO_SCHEMA};

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
}

const EXIT_UNREACHABLE: u8 = 2;
const EXIT_REJECTED: u8 = 3;

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
    let (source, origin) = match &args.schema {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read schema file {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (DEMO_SCHEMA.to_string(), "built-in demo schema".to_string()),
    };
    let schema = Schema::parse(&source).with_context(|| format!("bad schema ({origin})"))?;
    let tables: Vec<&str> = schema.tables.keys().map(String::as_str).collect();
    let config = hearth_server::ServerConfig::new(args.listen, args.data.clone(), schema.clone());
    let running = hearth_server::start(config, hearth::assets::ASSETS).await?;
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
    // Ctrl-C or a service manager's SIGTERM: stop taking connections and let
    // the store finish its batch. (SIGKILL loses nothing acknowledged either.)
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    say("hearth: shutting down".to_string());
    running.shutdown().await;
    Ok(())
}

fn parse_params(params: Option<&str>) -> anyhow::Result<Vec<Value>> {
    let Some(text) = params else {
        return Ok(Vec::new());
    };
    let json: serde_json::Value =
        serde_json::from_str(text).context("PARAMS_JSON is not valid JSON")?;
    match json {
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| Value::from_json(item).with_context(|| format!("parameter {}", i + 1)))
            .collect(),
        _ => anyhow::bail!("PARAMS_JSON must be a JSON array, e.g. '[\"a\", 1]'"),
    }
}

async fn client(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_secs(args.timeout_s);
    let mut device = native_client::open_device(&args.db, ClientConfig::default())
        .with_context(|| format!("cannot open device database {}", args.db.display()))?;
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
            let result = device.query(&sql, &params)?;
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
                            Event::Rejected { seq, code, reason } => {
                                Some(serde_json::json!({"mutation": seq, "code": code, "reason": reason}))
                            }
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
                Err(e) => Err(e.into()),
            }
        }
        ClientAction::Exec { sql, params } => {
            let url = need_server("exec")?;
            let params = parse_params(params.as_deref())?;
            if device.schema().is_none() {
                // A fresh device learns the schema from the server first.
                if let Err(e) =
                    native_client::sync_once(&mut device, &url, Goal::Synced, timeout).await
                {
                    eprintln!(
                        "hearth: this database has no schema yet and the first sync failed: {e}"
                    );
                    return Ok(ExitCode::from(EXIT_UNREACHABLE));
                }
            }
            let (outcome, _) = device
                .exec(&sql, &params, native_client::now_ms())
                .map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
            let Some(seq) = outcome.mutation else {
                println!(
                    "{}",
                    serde_json::json!({"mutation": null, "status": "applied", "rowsAffected": outcome.rows_affected, "reason": null})
                );
                return Ok(ExitCode::SUCCESS);
            };
            let line = |status: &str, reason: Option<String>, code: Option<String>| serde_json::json!({"mutation": seq, "status": status, "rowsAffected": outcome.rows_affected, "reason": reason, "code": code});
            match native_client::sync_once(&mut device, &url, Goal::Resolved(seq), timeout).await {
                Ok(events) => {
                    let seq = native_client::renumbered(seq, &events);
                    let line = |status: &str, reason: Option<String>, code: Option<String>| serde_json::json!({"mutation": seq, "status": status, "rowsAffected": outcome.rows_affected, "reason": reason, "code": code});
                    let rejected = events.iter().find_map(|e| match e {
                        Event::Rejected {
                            seq: s,
                            code,
                            reason,
                        } if *s == seq => Some((code.clone(), reason.clone())),
                        _ => None,
                    });
                    match rejected {
                        Some((code, reason)) => {
                            println!("{}", line("rejected", Some(reason), Some(code)));
                            Ok(ExitCode::from(EXIT_REJECTED))
                        }
                        None => {
                            println!("{}", line("applied", None, None));
                            Ok(ExitCode::SUCCESS)
                        }
                    }
                }
                // Whatever stopped the sync (no server, a timeout, a closed
                // connection, a server that could not store it), the write
                // is committed locally and waits in the outbox.
                Err(e) => {
                    let code = e.server_code().map(str::to_string);
                    println!("{}", line("queued", Some(e.to_string()), code));
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
    }
}
