//! Deterministic simulation of many devices, the server's logic and a hostile
//! network, all driven by one seed (see `tests/sim/mod.rs` and the
//! "Simulation" section of ARCHITECTURE.md).
//!
//! - `cargo test --release --test simulation` runs a bounded set of seeds.
//! - `SIM_SEEDS=N` runs N seeds (from `SIM_FIRST_SEED`, default 1).
//! - `SIM_SEED=S` replays seed S with a readable trace; `SIM_STEPS=K` sets
//!   the step count (for replaying a shrunk failure).
//!
//! A failing seed is shrunk to the smallest step count that still fails, and
//! both are printed. Every bug the simulator found stays below as a named
//! regression case.

mod sim;

use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use sim::{Options, World};

/// Steps per seed in the default run.
const STEPS_DEFAULT: u64 = 500;
/// Seeds in the default run, and the wall-clock budget that stops it early
/// on a slow or busy machine (it still reports how many ran).
const SEEDS_DEFAULT: u64 = 200;
const BUDGET_DEFAULT: Duration = Duration::from_secs(110);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}"))
    })
}

/// Runs one seed; a panic inside the engine counts as a failure too.
fn run_once(opts: &Options) -> Result<String, String> {
    let result = panic::catch_unwind(AssertUnwindSafe(|| -> Result<String, String> {
        let mut world = World::new(opts.seed, opts.verbose)?;
        world.run(opts.steps)?;
        Ok(world.summary())
    }));
    let (step, tail) = sim::last_trace();
    let failure = match result {
        Ok(Ok(summary)) => return Ok(summary),
        Ok(Err(message)) => message,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("panic: {what}")
        }
    };
    Err(format!(
        "at step {step}: {failure}\nlast trace lines:\n  {}",
        tail.join("\n  ")
    ))
}

/// The smallest step count (by bisection) at which `seed` still fails.
fn shrink(seed: u64, failing_steps: u64) -> (u64, String) {
    let quiet = panic::take_hook();
    panic::set_hook(Box::new(|_| {}));
    let (mut lo, mut hi) = (0, failing_steps);
    let mut message = String::new();
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        match run_once(&Options {
            seed,
            steps: mid,
            verbose: false,
        }) {
            Err(m) => {
                hi = mid;
                message = m;
            }
            Ok(_) => lo = mid,
        }
    }
    panic::set_hook(quiet);
    (hi, message)
}

fn check_seed(seed: u64, steps: u64) {
    if let Err(message) = run_once(&Options {
        seed,
        steps,
        verbose: false,
    }) {
        let (smallest, shrunk) = shrink(seed, steps);
        let detail = if shrunk.is_empty() { message } else { shrunk };
        panic!(
            "simulation failed: seed {seed} with {steps} steps (smallest failing step count: {smallest})\n\
             replay: SIM_SEED={seed} SIM_STEPS={smallest} cargo test --release --test simulation -- --nocapture\n{detail}"
        );
    }
}

#[test]
fn simulation_seeds() {
    let steps = env_u64("SIM_STEPS").unwrap_or(STEPS_DEFAULT);
    if let Some(seed) = env_u64("SIM_SEED") {
        match run_once(&Options {
            seed,
            steps,
            verbose: true,
        }) {
            Ok(summary) => println!("seed {seed}: ok after {steps} steps: {summary}"),
            Err(message) => panic!("seed {seed} failed with {steps} steps: {message}"),
        }
        return;
    }
    let explicit = env_u64("SIM_SEEDS");
    let seeds = explicit.unwrap_or(SEEDS_DEFAULT);
    let first = env_u64("SIM_FIRST_SEED").unwrap_or(1);
    let started = Instant::now();
    let mut ran = 0;
    for seed in first..first + seeds {
        if explicit.is_none() && started.elapsed() > BUDGET_DEFAULT {
            break;
        }
        check_seed(seed, steps);
        ran += 1;
    }
    println!(
        "simulation: {ran} seeds x {steps} steps passed in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(ran > 0, "no seed ran");
}

// ---- regression cases: each is a seed and step count that once failed ----

/// A hostile device's mutation wrote one row twice and was applied in part
/// (the server now refuses such a mutation whole).
#[test]
fn regression_row_written_twice_in_one_mutation() {
    check_seed(1, 72);
}

/// An upsert after an update of the same row in one transaction failed in
/// the capture trigger (SQLite applied the outer conflict policy to the
/// trigger's `INSERT OR IGNORE`), and under `INSERT OR REPLACE` it kept the
/// wrong pre-image.
#[test]
fn regression_capture_preimage_under_upsert() {
    check_seed(1, 179);
}

/// Undoing an `INSERT OR REPLACE` that displaced a row with the same UNIQUE
/// value failed, and the device could apply no server message afterwards.
#[test]
fn regression_undo_of_displacing_replace() {
    check_seed(3, 392);
}

/// Open bug, found after `Client::settle` gained its fast path (settling acks
/// without a full rebase): a pending mutation's stored pre-image goes stale,
/// its undo then clashes on `users.email` and the device can apply no server
/// message afterwards. Passes with the fast path disabled.
#[test]
fn regression_settle_fast_path_stale_preimage() {
    check_seed(52, 498);
}
