//! Shared set-up for the integration tests: a real server on a loopback
//! port, real device databases in a temp dir, real WebSockets.

#![allow(dead_code)]

pub mod cli;

use std::path::Path;
use std::time::Duration;

use hearth::native_client::{self, Goal};
use hearth_engine::{Client, ClientConfig, Event, Schema, Value};

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A schema with a UNIQUE column, so two devices can make writes that each
/// pass locally but cannot both be stored: the server must refuse one.
pub const ACCOUNTS_SCHEMA: &str = r#"
version = 1
[tables.accounts]
create = """
CREATE TABLE accounts (
  id    TEXT PRIMARY KEY,
  email TEXT NOT NULL UNIQUE,
  name  TEXT NOT NULL DEFAULT '',
  score INTEGER NOT NULL DEFAULT 0
)"""
merge = "lww"
"#;

/// One table of blobs, for tests that move many megabytes.
pub const FILES_SCHEMA: &str = r#"
version = 1
[tables.files]
create = "CREATE TABLE files (id TEXT PRIMARY KEY, data BLOB NOT NULL)"
merge = "lww"
"#;

pub const MIB: usize = 1024 * 1024;

pub async fn start_server(dir: &Path, schema: &str) -> hearth_server::Running {
    start_server_with(dir, schema, |_| {}).await
}

pub async fn start_server_with(
    dir: &Path,
    schema: &str,
    tweak: impl FnOnce(&mut hearth_server::ServerConfig),
) -> hearth_server::Running {
    let mut config = hearth_server::ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.join("server"),
        Schema::parse(schema).unwrap(),
    );
    tweak(&mut config);
    hearth_server::start(config, &[])
        .await
        .expect("server starts")
}

pub fn url(server: &hearth_server::Running) -> String {
    format!("ws://{}/sync", server.addr)
}

pub fn device(dir: &Path, name: &str) -> Client {
    native_client::open_device(&dir.join(format!("{name}.db")), ClientConfig::default()).unwrap()
}

pub async fn sync(client: &mut Client, url: &str) -> Vec<Event> {
    native_client::sync_once(client, url, Goal::Synced, TIMEOUT)
        .await
        .expect("sync")
}

pub fn exec(client: &mut Client, sql: &str, params: &[Value]) -> Option<u64> {
    client
        .exec(sql, params, native_client::now_ms())
        .expect("exec")
        .0
        .mutation
}

pub fn rows(client: &mut Client, sql: &str) -> Vec<serde_json::Value> {
    client.query(sql, &[]).unwrap().to_json_objects()
}

pub fn text(s: &str) -> Value {
    Value::Text(s.to_string())
}

/// GET over plain HTTP/1.0: the status code and the body.
pub async fn http(server: &hearth_server::Running, path: &str) -> (u16, String) {
    let (status, _, body) = http_request(server, "GET", path, &[]).await;
    (status, body)
}

/// A request over plain HTTP/1.0 with `method`, `path` and extra `headers`
/// (name, value): the status code, the response's headers (lowercased
/// names) and the body.
pub async fn http_request(
    server: &hearth_server::Running,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// GET a path from the server; returns the body.
pub async fn http_get(server: &hearth_server::Running, path: &str) -> String {
    http(server, path).await.1
}

/// Reads one counter from `/metrics`.
pub async fn metric(server: &hearth_server::Running, name: &str) -> u64 {
    let body = http_get(server, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no metric {name} in {body}"))
        .trim()
        .parse()
        .unwrap()
}
