//! The real `hearth` binary as a user runs it: `hearth serve` as a child
//! process with a schema file, devices as `hearth client` commands on SQLite
//! files, over real loopback sockets.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value as Json;

/// A sync URL nothing listens on (the discard port): a device pointed at it
/// is offline, so its writes queue.
pub const OFFLINE: &str = "ws://127.0.0.1:9/sync";

pub fn hearth(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(args)
        .output()
        .expect("run hearth")
}

/// stdout as one JSON value per line.
pub fn json_lines(out: &Output) -> Vec<Json> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// The one JSON line a write command (`exec`, `sync`, `resolve`,
/// `edit-text`) prints.
pub fn json_line(out: &Output) -> Json {
    let mut lines = json_lines(out);
    assert_eq!(lines.len(), 1, "one JSON line expected: {out:?}");
    lines.remove(0)
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `hearth serve --schema FILE --data DIR --listen 127.0.0.1:0`, stopped
/// (SIGTERM) when dropped.
pub struct Served {
    child: Child,
    pub url: String,
    pub data: PathBuf,
}

impl Served {
    /// Writes `schema` to `dir/schema.toml` and serves it from `dir/data`.
    pub fn start(dir: &Path, schema: &str) -> Served {
        Served::start_with(dir, schema, &[])
    }

    /// [`Served::start`] with more `hearth serve` arguments.
    pub fn start_with(dir: &Path, schema: &str, args: &[&str]) -> Served {
        Served::start_env(dir, schema, args, &[])
    }

    /// [`Served::start_with`] with environment variables for the server.
    pub fn start_env(dir: &Path, schema: &str, args: &[&str], envs: &[(&str, &str)]) -> Served {
        let schema_file = dir.join("schema.toml");
        std::fs::write(&schema_file, schema).unwrap();
        let data = dir.join("data");
        let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .arg("serve")
            .arg("--schema")
            .arg(&schema_file)
            .arg("--data")
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn hearth serve");
        // "hearth: serving http://ADDR (sync at ws://ADDR/sync)"
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .split("(sync at ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .unwrap_or_else(|| panic!("hearth serve did not start: {line:?}"))
            .to_string();
        Served { child, url, data }
    }

    /// The server's store file (`DATA/hearth.db`).
    pub fn store(&self) -> PathBuf {
        self.data.join("hearth.db")
    }

    /// Runs `sql` on the server's store, opened read-only beside the
    /// running server; one JSON object per row, like `hearth client query`.
    pub fn query(&self, sql: &str) -> Vec<Json> {
        use rusqlite::types::ValueRef;
        let conn = rusqlite::Connection::open_with_flags(
            self.store(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let mut stmt = conn.prepare(sql).unwrap();
        let names: Vec<String> = stmt.column_names().map(str::to_string).collect();
        stmt.query_map([], |row| {
            let mut object = serde_json::Map::new();
            for (i, name) in names.iter().enumerate() {
                let value = match row.get_ref(i)? {
                    ValueRef::Null => Json::Null,
                    ValueRef::Integer(n) => n.into(),
                    ValueRef::Real(r) => r.into(),
                    ValueRef::Text(t) => String::from_utf8_lossy(t).into(),
                    ValueRef::Blob(b) => b.iter().map(|x| Json::from(*x)).collect(),
                };
                object.insert(name.clone(), value);
            }
            Ok(Json::Object(object))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // SIGTERM (a clean shutdown), by this child's own pid.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// One device: a database file and the server it syncs with.
pub struct Device {
    pub db: String,
    pub url: String,
}

impl Device {
    pub fn new(dir: &Path, name: &str, url: &str) -> Device {
        Device {
            db: dir.join(format!("{name}.db")).to_str().unwrap().to_string(),
            url: url.to_string(),
        }
    }

    /// `hearth client --db DB --server URL ARGS...`, against `url`.
    pub fn run_at(&self, url: &str, args: &[&str]) -> Output {
        self.run_within(url, 10, args)
    }

    /// [`Device::run_at`] with the client's session bounded by `timeout_s`
    /// instead of 10 s (for setup work that is large on purpose).
    pub fn run_within(&self, url: &str, timeout_s: u64, args: &[&str]) -> Output {
        let timeout = timeout_s.to_string();
        let mut all = vec![
            "client",
            "--db",
            &self.db,
            "--server",
            url,
            "--timeout-s",
            &timeout,
        ];
        all.extend_from_slice(args);
        hearth(&all)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_at(&self.url, args)
    }

    pub fn exec(&self, sql: &str) -> Output {
        self.run(&["exec", sql])
    }

    /// A write made offline: committed locally and queued.
    pub fn exec_offline(&self, sql: &str) -> Output {
        let out = self.run_at(OFFLINE, &["exec", sql]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(json_line(&out)["status"], "queued", "{out:?}");
        out
    }

    /// `sync`; exits 0, prints `{"serverSeq", "pending", "rejected"}`.
    pub fn sync(&self) -> Json {
        let out = self.run(&["sync"]);
        assert!(out.status.success(), "{} sync: {out:?}", self.db);
        json_line(&out)
    }

    pub fn query(&self, sql: &str) -> Vec<Json> {
        let out = hearth(&["client", "--db", &self.db, "query", sql]);
        assert!(out.status.success(), "{out:?}");
        json_lines(&out)
    }
}

impl Device {
    /// `subscribe STREAM PARAMS_JSON`: the raw output (exit code, JSON line).
    pub fn subscribe(&self, stream: &str, params_json: &str) -> Output {
        self.run(&["subscribe", stream, params_json])
    }

    /// `unsubscribe STREAM PARAMS_JSON`; needs no server.
    pub fn unsubscribe(&self, stream: &str, params_json: &str) -> Output {
        self.run_at(OFFLINE, &["unsubscribe", stream, params_json])
    }

    /// `subscriptions`: one JSON object per subscription.
    pub fn subscriptions(&self) -> Vec<Json> {
        let out = hearth(&["client", "--db", &self.db, "subscriptions"]);
        assert!(out.status.success(), "{out:?}");
        json_lines(&out)
    }
}
