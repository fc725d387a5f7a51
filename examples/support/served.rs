//! A `hearth serve` child process for the benchmark programs, on
//! 127.0.0.1 with a fresh data directory, killed when dropped. Its pid is
//! the benchmark's handle on its resources (`/proc/PID/...`).

use std::process::{Child, Command, Stdio};

pub struct Served {
    pub child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Served {
    /// Serves `schema` with `target/release/hearth` (beside this program's
    /// binary), or the build `HEARTH_BIN` names (say, an older commit's).
    pub fn start_with(schema: &str) -> Served {
        Served::start_env(schema, &[])
    }

    /// [`Served::start_with`] with environment variables for the server.
    pub fn start_env(schema: &str, envs: &[(&str, &str)]) -> Served {
        let exe = std::env::current_exe().unwrap();
        let bin = std::env::var_os("HEARTH_BIN")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                exe.parent()
                    .and_then(|p| p.parent())
                    .map(|p| p.join("hearth"))
            })
            .filter(|p| p.exists())
            .expect("target/release/hearth is missing: run `cargo build --release --bin hearth`");
        let dir = tempfile::tempdir().unwrap();
        let schema_file = dir.path().join("schema.toml");
        std::fs::write(&schema_file, schema).unwrap();
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--schema"])
            .arg(&schema_file)
            .arg("--data")
            .arg(dir.path().join("data"))
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        // "hearth: serving http://ADDR (sync at ws://ADDR/sync)"
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .to_string();
        Served {
            child,
            addr,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/sync", self.addr)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
