// Browser benchmark (a program, not a test): headless Chromium against the real server
// on loopback. Prints each figure beside its target and writes target/bench/browser.json.
//
//   cargo build --release && node tests/e2e/bench.mjs
//   node tests/e2e/bench.mjs subscribe     # only the sections whose name contains the argument
//
// Sections: `latency` (local exec, cross-tab, device to device), `download`, `cold open`,
// `subscribe` (a fresh device's `await db.subscribe(...)` of a 100,000-row stream, seeded
// on the server by `hearth client exec` in 20 transactions of 5,000 rows; about 10 s).
// With an argument, browser.json holds only the figures of the sections run.
// BENCH_ROUNDS (200) sets the latency rounds, BENCH_SUB_RUNS (3) the fresh devices that
// subscribe; HEARTH_BIN picks another `hearth` binary (it must embed the wasm client).
//
// Times across tabs use `performance.timeOrigin + performance.now()`, one clock for every
// page of the browser, so a write in one tab and a callback in another compare directly.

import { execFile } from "node:child_process";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { gzipSync } from "node:zlib";
import { chromium } from "playwright-core";
import {
  CHROMIUM,
  CHROMIUM_ARGS,
  clientAssets,
  hearthBinary,
  launchBrowser,
  metric,
  openTab,
  percentile,
  repoRoot,
  routeTestPage,
  startServer,
  withTimeout,
} from "./harness.mjs";

const ROUNDS = Number(process.env.BENCH_ROUNDS || 200);
// An argument runs only the sections whose name contains it.
const ONLY = process.argv[2];
const wanted = (section) => !ONLY || section.includes(ONLY);
const figures = {};
const summary = (times) => {
  const sorted = [...times].sort((a, b) => a - b);
  return { p50_ms: +percentile(sorted, 50).toFixed(2), p99_ms: +percentile(sorted, 99).toFixed(2), n: sorted.length };
};
function report(name, value, target) {
  figures[name] = { ...value, target };
  const shown = Object.entries(value)
    .filter(([k]) => k !== "n")
    .map(([k, v]) => `${k} ${v}`)
    .join(", ");
  console.log(`${name.padEnd(34)} ${shown.padEnd(36)} target: ${target}`);
}

// Installs in `page` a live query that records, for each marker row it sees, when.
async function watchMarkers(page) {
  await page.evaluate(() => {
    window.seen = new Map();
    db.live("SELECT id FROM lists WHERE name = 'bench-marker'", [], (rows) => {
      const now = performance.timeOrigin + performance.now();
      for (const { id } of rows) if (!seen.has(id)) seen.set(id, now);
    });
  });
}

// Writes ROUNDS marker rows from `writer`, one at a time, each once `reader` saw the last;
// returns the write-to-callback delays.
async function propagation(writer, reader, prefix, rounds) {
  const delays = [];
  for (let i = 0; i < rounds; i++) {
    const id = `${prefix}-${i}`;
    const started = await writer.evaluate(async (id) => {
      const t0 = performance.timeOrigin + performance.now();
      await db.exec("INSERT INTO lists (id, name) VALUES (?, 'bench-marker')", [id]);
      return t0;
    }, id);
    const seenAt = await reader.waitForFunction((id) => window.seen.get(id), id, { polling: "raf", timeout: 10_000 });
    delays.push((await seenAt.jsonValue()) - started);
  }
  return delays;
}

// --- a subscription's initial load ---
// One streamed table (bench_streams' `items`), 100,000 rows in the stream `room`, seeded by
// a native device (`hearth client exec`, 20 transactions of 5,000 rows: one mutation each).
const SUB_ROWS = 100_000;
// Small transactions: the server's cost per row of one mutation grows with its size
// (20 x 5,000 rows seed in about 3.5 s; 4 x 25,000 took 13 s).
const SUB_SEED_TX = 20;
const SUB_RUNS = Number(process.env.BENCH_SUB_RUNS || 3);
const SUB_SCHEMA = `version = 1
[tables.items]
create = """
CREATE TABLE items (
  id    TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  room  TEXT NOT NULL,
  title TEXT NOT NULL,
  done  INTEGER NOT NULL DEFAULT 0,
  note  TEXT
)"""
merge = "lww"

[streams.room]
table = "items"
where = "room = :r"
`;

function hearthClient(args, timeoutMs) {
  return new Promise((resolve, reject) => {
    execFile(hearthBinary(), ["client", ...args], { timeout: timeoutMs, maxBuffer: 1 << 20 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`hearth client ${args[args.length - 2] ?? ""}: ${error.message}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

async function subscribeLoad(browser) {
  const dir = await mkdtemp(path.join(os.tmpdir(), "hearth-bench-sub-"));
  let server;
  try {
    const schema = path.join(dir, "items.toml");
    await writeFile(schema, SUB_SCHEMA);
    server = await startServer({ schema });
    const url = `ws://${server.addr}/sync`;
    const per = SUB_ROWS / SUB_SEED_TX;
    const seedStart = performance.now();
    for (let k = 0; k < SUB_SEED_TX; k++) {
      const sql = `INSERT INTO items (id, owner, room, title, done, note)
        WITH RECURSIVE c(n) AS (SELECT ${k * per + 1} UNION ALL SELECT n + 1 FROM c WHERE n < ${(k + 1) * per})
        SELECT printf('item-%06d', n), 'u' || (n % 1000), 'big', 'title of item ' || n, n % 2,
               'note for item-' || n || ': remember to check the details' FROM c`;
      const out = JSON.parse(await hearthClient(["--db", path.join(dir, "seed.db"), "--server", url, "--timeout-s", "60", "exec", sql], 70_000));
      if (out.status !== "applied" || out.rowsAffected !== per) throw new Error(`seeding: ${JSON.stringify(out)}`);
    }
    const seedMs = performance.now() - seedStart;

    const runs = [];
    for (let i = 0; i < SUB_RUNS; i++) {
      const context = await browser.newContext(); // a fresh device: empty IndexedDB
      try {
        await routeTestPage(context);
        const tab = await openTab(context, server.origin, "subscribe");
        await withTimeout(tab.evaluate(() => db.sync()), "fresh device caught up");
        const bytesBefore = await metric(server.origin, "hearth_bytes_out_total");
        const run = await withTimeout(
          tab.evaluate(async () => {
            const now = () => performance.now();
            const progress = [];
            const t0 = now();
            const sub = await db.subscribe("room", { r: "big" }, { onProgress: (p) => progress.push({ at: now() - t0, rows: p.rows, done: p.done }) });
            const subscribe_ms = now() - t0;
            const t1 = now();
            const [{ n }] = await db.query("SELECT count(*) AS n FROM items WHERE room = 'big'");
            const count_ms = now() - t1;
            const [info] = (await db.subscriptions()).filter((s) => s.id === sub.id);
            return { subscribe_ms, count_ms, rows: n, reported_rows: info?.rows, loaded: info?.loaded, progress };
          }),
          "subscribe to 100k rows",
          120_000,
        );
        run.bytes_out = (await metric(server.origin, "hearth_bytes_out_total")) - bytesBefore;
        if (run.rows !== SUB_ROWS) throw new Error(`subscribe loaded ${run.rows} rows, not ${SUB_ROWS}`);
        runs.push(run);
      } finally {
        await context.close();
      }
    }

    const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    const rate = (ms) => Math.round(SUB_ROWS / (ms / 1000));
    const times = runs.map((r) => r.subscribe_ms);
    report(
      "subscribe initial load (100k rows)",
      {
        median_rows_per_s: rate(median(times)),
        best_rows_per_s: rate(Math.min(...times)),
        median_ms: +median(times).toFixed(0),
        rows_counted: runs[0].rows,
        n: runs.length,
      },
      ">= 50,000 rows/s",
    );
    // Where the time goes, per run: from subscribe() to the first chunk landing, the time
    // between chunks (onProgress calls, in the page), and from the last chunk to resolving.
    const breakdown = runs.map((r) => {
      const at = r.progress.map((p) => p.at);
      const gaps = at.slice(1).map((t, j) => t - at[j]);
      return {
        first_chunk_ms: at.length ? +at[0].toFixed(1) : null,
        chunks: at.length,
        chunk_gap_p50_ms: gaps.length ? +median(gaps).toFixed(2) : null,
        chunk_gap_max_ms: gaps.length ? +Math.max(...gaps).toFixed(2) : null,
        last_chunk_to_resolved_ms: at.length ? +(r.subscribe_ms - at[at.length - 1]).toFixed(1) : null,
        wire_mb: +(r.bytes_out / 1e6).toFixed(2),
      };
    });
    const mid = breakdown[times.indexOf(median(times))];
    report(
      "subscribe load: where time goes",
      {
        first_chunk_ms: mid.first_chunk_ms,
        chunk_p50_ms: mid.chunk_gap_p50_ms,
        chunks: mid.chunks,
        last_chunk_to_resolved_ms: mid.last_chunk_to_resolved_ms,
        wire_mb: mid.wire_mb,
      },
      "(no target)",
    );
    Object.assign(figures["subscribe initial load (100k rows)"], {
      seed_ms: +seedMs.toFixed(0),
      count_query_ms: runs.map((r) => +r.count_ms.toFixed(1)),
      runs: runs.map((r, j) => ({ subscribe_ms: +r.subscribe_ms.toFixed(1), rows: r.rows, reported_rows: r.reported_rows, loaded: r.loaded, ...breakdown[j] })),
    });
  } finally {
    if (server) await server.cleanup();
    await rm(dir, { recursive: true, force: true });
  }
}

async function main() {
  const needsDemo = ["latency", "download", "cold open"].some(wanted);
  const server = needsDemo ? await startServer() : null;
  const browser = await launchBrowser();
  try {
    // --- local exec latency ---
    if (wanted("latency")) {
      const device = await browser.newContext();
      await routeTestPage(device);
      const tab1 = await openTab(device, server.origin, "bench");
      const tab2 = await openTab(device, server.origin, "bench");
      await tab1.evaluate(() => db.sync());
      const local = await tab1.evaluate(async (rounds) => {
        const times = [];
        for (let i = 0; i < rounds; i++) {
          const t0 = performance.now();
          await db.exec("INSERT INTO todos (id, list_id, title) VALUES (?, 'bench', ?)", [`local-${i}-${Math.random()}`, `todo ${i}`]);
          times.push(performance.now() - t0);
        }
        return times;
      }, ROUNDS);
      report("local exec (durable)", summary(local), "p50 <= 3 ms");

      // --- cross-tab ---
      await watchMarkers(tab2);
      const crossTab = await propagation(tab1, tab2, "tab", ROUNDS);
      report("cross-tab exec -> live callback", summary(crossTab), "p50 <= 5 ms");

      // --- device to device through the server ---
      const deviceB = await browser.newContext();
      await routeTestPage(deviceB);
      const tabB = await openTab(deviceB, server.origin, "bench");
      await tabB.evaluate(() => db.sync());
      await watchMarkers(tabB);
      const crossDevice = await propagation(tab1, tabB, "device", ROUNDS);
      report("device A exec -> device B live", summary(crossDevice), "p50 <= 20 ms");
      await device.close();
      await deviceB.close();
    }

    // --- download size ---
    if (wanted("download")) {
      let raw = 0;
      let gzip = 0;
      const files = {};
      for (const file of await clientAssets(server.origin)) {
        const body = Buffer.from(await (await fetch(server.origin + file)).arrayBuffer());
        const zipped = gzipSync(body, { level: 9 }).length;
        files[file] = { bytes: body.length, gzip_bytes: zipped };
        raw += body.length;
        gzip += zipped;
      }
      report("page download (script+worker+wasm)", { gzip_kb: +(gzip / 1024).toFixed(1), raw_kb: +(raw / 1024).toFixed(1) }, "gzip <= 800 KB");
      figures["page download (script+worker+wasm)"].files = files;
    }

    // --- cold open on a 10k-row database ---
    if (wanted("cold open")) {
      const profile = await mkdtemp(path.join(os.tmpdir(), "hearth-bench-profile-"));
      try {
        const launch = async () => {
          const context = await chromium.launchPersistentContext(profile, { executablePath: CHROMIUM, args: CHROMIUM_ARGS, headless: true });
          await routeTestPage(context);
          return context;
        };
        let context = await launch();
        const seed = await openTab(context, server.origin, "cold");
        await withTimeout(
          seed.evaluate(async () => {
            await db.exec("INSERT INTO lists (id, name) VALUES ('cold', 'cold open')");
            await db.exec(`INSERT INTO todos (id, list_id, title, position)
              WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 10000)
              SELECT 'cold-' || n, 'cold', 'todo number ' || n, n FROM c`);
            await db.sync({ timeoutMs: 60000 });
          }),
          "seed 10k rows",
          90_000,
        );
        await context.close();
        const runs = [];
        for (let i = 0; i < 3; i++) {
          context = await launch();
          const page = await context.newPage();
          await page.goto(`${server.origin}/__hearth_e2e.html`);
          const timing = await page.evaluate(async () => {
            const t0 = performance.now();
            const db = await Hearth.open({ name: "cold" });
            const rows = await db.query("SELECT count(*) AS n FROM todos WHERE list_id = 'cold'");
            const t1 = performance.now();
            const first = await db.query("SELECT id, title, done FROM todos WHERE list_id = 'cold' ORDER BY position LIMIT 50");
            return { open_to_first_result_ms: t1 - t0, since_navigation_ms: t1, n: rows[0].n, page: first.length };
          });
          if (timing.n !== 10000) throw new Error(`cold open found ${timing.n} rows`);
          runs.push(timing);
          await context.close();
        }
        const best = (key) => +Math.min(...runs.map((r) => r[key])).toFixed(1);
        const median = (key) => +[...runs.map((r) => r[key])].sort((a, b) => a - b)[1].toFixed(1);
        report(
          "cold open -> first query (10k rows)",
          { median_ms: median("open_to_first_result_ms"), best_ms: best("open_to_first_result_ms"), since_navigation_ms: median("since_navigation_ms") },
          "(no target; browser restarted each run)",
        );
      } finally {
        await rm(profile, { recursive: true, force: true });
      }
    }

    // --- a subscription's initial load: 100,000 rows ---
    if (wanted("subscribe")) await subscribeLoad(browser);
  } finally {
    await browser.close();
    if (server) await server.cleanup();
  }
  const out = path.join(repoRoot, "target/bench");
  await mkdir(out, { recursive: true });
  const file = path.join(out, "browser.json");
  await writeFile(file, JSON.stringify({ when: new Date().toISOString(), rounds: ROUNDS, only: ONLY ?? null, figures }, null, 2));
  console.log(`wrote ${file}`);
}

main().catch((error) => {
  console.error(error);
  process.exitCode = 1;
});
