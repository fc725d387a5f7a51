//! Builds the browser half of Hearth and hands it to the `hearth` binary to embed.
//!
//! 1. Compiles `worker/` (hearth-worker) and `page-bindings/` (hearth-page) to
//!    wasm32-unknown-unknown in release, with a nested `cargo build`. The nested build
//!    uses its own target directory: sharing the outer one would wait forever on the
//!    lock that the outer cargo holds while it runs this script.
//! 2. Runs wasm-bindgen (the `wasm-bindgen-cli-support` library, same version as the
//!    `wasm-bindgen` crate, so no CLI install is needed) with the `web` target.
//! 3. Renames each generated file to carry a hash of its contents
//!    (`pkg/hearth_page.<16 hex digits>.js`), so that the server can let browsers cache
//!    it for good: a new build is a new URL.
//! 4. Copies `web/` beside the generated files into `$OUT_DIR/web/`, replacing in its
//!    scripts each `pkg/NAME` of a generated file with its hashed name (so the stable
//!    entry points, `hearth.js`, `hearth-worker.js`, `hearth-sw.js`, name the files of
//!    this build), and writes
//!    `$OUT_DIR/assets.rs`, which the binary `include!`s:
//!    `pub static ASSETS: &[(&str, &[u8], &str)]` = (URL path, bytes, MIME type).
//!
//! Set `HEARTH_SKIP_WASM=1` to skip steps 1-3 during native-only work (`cargo check` and
//! clippy loops): `ASSETS` then holds only `web/`, and a warning says so.

use std::env;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

const WASM_TARGET: &str = "wasm32-unknown-unknown";
/// The C compiler for SQLite's wasm build: Debian's default clang 14 cannot compile
/// sqlite-wasm-rs 0.5's `wasm-shim.h`; clang 19 can.
const DEFAULT_WASM_CC: &str = "clang-19";
/// (package, library file stem) of each crate that becomes a .wasm.
const WASM_CRATES: [(&str, &str); 2] = [
    ("hearth-worker", "hearth_worker"),
    ("hearth-page", "hearth_page"),
];

fn main() -> ExitCode {
    match build() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("\nerror: hearth build.rs: {message}\n");
            ExitCode::FAILURE
        }
    }
}

fn build() -> Result<(), String> {
    let root = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let web_out = out_dir.join("web");

    for input in [
        "build.rs",
        "Cargo.lock",
        "web",
        "worker",
        "page-bindings",
        "bridge",
        "engine/src",
        "engine/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(input).display());
    }
    println!("cargo:rerun-if-env-changed=HEARTH_SKIP_WASM");
    println!("cargo:rerun-if-env-changed=CC_wasm32_unknown_unknown");

    // Start from an empty directory so a file removed from web/ is not served stale.
    if web_out.exists() {
        fs::remove_dir_all(&web_out).map_err(|e| format!("cannot clear {web_out:?}: {e}"))?;
    }
    fs::create_dir_all(web_out.join("pkg"))
        .map_err(|e| format!("cannot create {web_out:?}: {e}"))?;

    let mut hashed = Vec::new();
    if env::var_os("HEARTH_SKIP_WASM").is_some_and(|v| !v.is_empty() && v != "0") {
        println!(
            "cargo:warning=HEARTH_SKIP_WASM is set: the binary embeds web/ without the wasm, \
             so the browser client will not load"
        );
    } else {
        let started = Instant::now();
        let wasm_dir = build_wasm(&root)?;
        for (_, stem) in WASM_CRATES {
            bindgen(&wasm_dir.join(format!("{stem}.wasm")), &web_out.join("pkg"))?;
        }
        hashed = hash_names(&web_out.join("pkg"))?;
        // Shown by `cargo build -vv`; the build time matters to everyone who runs it.
        eprintln!("hearth build.rs: wasm built in {:.1?}", started.elapsed());
    }

    copy_dir(&root.join("web"), &web_out, &hashed)?;
    write_assets(&web_out, &out_dir.join("assets.rs"))
}

/// Runs the nested cargo build; returns the directory holding the two .wasm files.
fn build_wasm(root: &Path) -> Result<PathBuf, String> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    check_wasm_target(&rustc)?;
    let cc = env::var_os("CC_wasm32_unknown_unknown").unwrap_or_else(|| DEFAULT_WASM_CC.into());
    check_cc(&cc)?;

    // Honour a target dir chosen by the user; otherwise the project's own target/.
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("wasm-build");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(root)
        .arg("build")
        .arg("--release")
        .arg("--locked")
        .args(["--target", WASM_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"));
    // Size is what a page pays on every cold load: whole-program LTO and opt-level "s"
    // take the worker from ~1.75 MB to ~1.1 MB (~500 KB gzip). Passed here rather than as
    // a Cargo profile so that they apply to the wasm build only, not to the server.
    for setting in [
        "profile.release.lto=true",
        "profile.release.codegen-units=1",
        "profile.release.opt-level=\"s\"",
    ] {
        command.args(["--config", setting]);
    }
    for (package, _) in WASM_CRATES {
        command.args(["-p", package]);
    }
    command.env("CC_wasm32_unknown_unknown", &cc);
    // Flags meant for the host build (for example `-C target-cpu=native`) must not reach
    // the wasm build, and the outer build's target settings are not ours.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        command.env_remove(var);
    }
    // CARGO_MAKEFLAGS stays: through it the nested cargo shares the outer one's jobserver,
    // so the two together never run more jobs than `-j` allows.
    // Cargo reads a build script's stdout for `cargo:` directives; the nested build's
    // output belongs on stderr with the rest of its log.
    command.stdout(std::io::stderr());
    let status = command
        .status()
        .map_err(|e| format!("cannot run cargo for the wasm build: {e}"))?;
    if !status.success() {
        return Err(format!(
            "the wasm build of hearth-worker and hearth-page failed (see the errors above).\n  \
             To reproduce it, run from {}:\n  {command:?}",
            root.display()
        ));
    }
    Ok(target_dir.join(WASM_TARGET).join("release"))
}

fn check_wasm_target(rustc: &OsString) -> Result<(), String> {
    let output = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|e| format!("cannot run rustc: {e}"))?;
    let sysroot = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let std_dir = Path::new(&sysroot).join("lib/rustlib").join(WASM_TARGET);
    if !std_dir.is_dir() {
        return Err(format!(
            "the Rust target {WASM_TARGET} is not installed (no {}).\n  \
             Install it with `rustup target add {WASM_TARGET}` (or run scripts/setup.sh).",
            std_dir.display()
        ));
    }
    Ok(())
}

fn check_cc(cc: &OsString) -> Result<(), String> {
    let works = Command::new(cc)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !works {
        return Err(format!(
            "the C compiler `{}` for SQLite's wasm build was not found.\n  \
             Install clang 19 (`apt-get install clang-19`, or run scripts/setup.sh), or point \
             CC_wasm32_unknown_unknown at a clang >= 19.",
            cc.to_string_lossy()
        ));
    }
    Ok(())
}

fn bindgen(wasm: &Path, out: &Path) -> Result<(), String> {
    wasm_bindgen_cli_support::Bindgen::new()
        .input_path(wasm)
        .web(true)
        .map_err(|e| format!("wasm-bindgen: {e:#}"))?
        .typescript(false)
        // Function names only help a debugger; browsers download them for nothing.
        .remove_name_section(true)
        .remove_producers_section(true)
        .generate(out)
        .map_err(|e| format!("wasm-bindgen on {}: {e:#}", wasm.display()))
}

/// Renames every file in `pkg` to `STEM.<hash>.EXT`, the hash being 16 hex digits of
/// FNV-1a over its contents. Returns (`pkg/NAME`, `pkg/HASHED NAME`) pairs.
fn hash_names(pkg: &Path) -> Result<Vec<(String, String)>, String> {
    let mut renamed = Vec::new();
    for entry in fs::read_dir(pkg).map_err(|e| format!("cannot read {pkg:?}: {e}"))? {
        let path = entry
            .map_err(|e| format!("cannot read {pkg:?}: {e}"))?
            .path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("a file name that is not UTF-8 in {pkg:?}"))?
            .to_owned();
        let (stem, extension) = name
            .split_once('.')
            .ok_or_else(|| format!("{name} in {pkg:?} has no extension"))?;
        let bytes = fs::read(&path).map_err(|e| format!("cannot read {path:?}: {e}"))?;
        let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
        let hashed = format!("{stem}.{hash:016x}.{extension}");
        fs::rename(&path, pkg.join(&hashed)).map_err(|e| format!("cannot rename {path:?}: {e}"))?;
        renamed.push((format!("pkg/{name}"), format!("pkg/{hashed}")));
    }
    // Longest first, so that no name is replaced inside a longer one.
    renamed.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    Ok(renamed)
}

fn copy_dir(from: &Path, to: &Path, hashed: &[(String, String)]) -> Result<(), String> {
    for entry in fs::read_dir(from).map_err(|e| format!("cannot read {from:?}: {e}"))? {
        let entry = entry.map_err(|e| format!("cannot read {from:?}: {e}"))?;
        let target = to.join(entry.file_name());
        let path = entry.path();
        if path.is_dir() {
            fs::create_dir_all(&target).map_err(|e| format!("cannot create {target:?}: {e}"))?;
            copy_dir(&path, &target, hashed)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("js" | "mjs")
        ) {
            let mut text =
                fs::read_to_string(&path).map_err(|e| format!("cannot read {path:?}: {e}"))?;
            for (name, hashed_name) in hashed {
                text = text.replace(name.as_str(), hashed_name);
            }
            fs::write(&target, text).map_err(|e| format!("cannot write {target:?}: {e}"))?;
        } else {
            fs::copy(&path, &target).map_err(|e| format!("cannot copy {path:?}: {e}"))?;
        }
    }
    Ok(())
}

fn write_assets(web_out: &Path, assets_rs: &Path) -> Result<(), String> {
    let mut files = Vec::new();
    list_files(web_out, &mut files)?;
    files.sort();
    let mut code = String::from(
        "// Generated by build.rs: the browser client, embedded in the binary.\n\
         /// (URL path, contents, MIME type) of every file the server hands to browsers.\n\
         pub static ASSETS: &[(&str, &[u8], &str)] = &[\n",
    );
    for file in files {
        let relative = file.strip_prefix(web_out).expect("listed under web_out");
        let url = format!("/{}", relative.to_string_lossy().replace('\\', "/"));
        let mime = mime_type(&file)?;
        writeln!(code, "    ({url:?}, include_bytes!({file:?}), {mime:?}),")
            .expect("writing to a String cannot fail");
    }
    code.push_str("];\n");
    fs::write(assets_rs, code).map_err(|e| format!("cannot write {assets_rs:?}: {e}"))
}

fn list_files(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), String> {
    for entry in fs::read_dir(dir).map_err(|e| format!("cannot read {dir:?}: {e}"))? {
        let path = entry
            .map_err(|e| format!("cannot read {dir:?}: {e}"))?
            .path();
        if path.is_dir() {
            list_files(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

/// The MIME type a browser needs: module scripts and `WebAssembly.instantiateStreaming`
/// refuse files served with the wrong one, so an unknown extension is an error here
/// rather than a broken page later.
fn mime_type(file: &Path) -> Result<&'static str, String> {
    let extension = file.extension().and_then(|e| e.to_str()).unwrap_or("");
    Ok(match extension {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "wasm" => "application/wasm",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "webmanifest" => "application/manifest+json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "txt" => "text/plain; charset=utf-8",
        // hearth.d.ts: TypeScript declarations, read by editors and tsc, not run.
        "ts" => "application/typescript; charset=utf-8",
        _ => {
            return Err(format!(
                "no MIME type known for {}: add its extension to mime_type in build.rs",
                file.display()
            ))
        }
    })
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("cargo did not set {name}"))
}
