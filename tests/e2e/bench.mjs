// Browser benchmark (a program, not a test): headless Chromium against the real server
// on loopback. Prints each figure beside its target and writes target/bench/browser.json.
//
//   cargo build --release && node tests/e2e/bench.mjs
//
// Times across tabs use `performance.timeOrigin + performance.now()`, one clock for every
// page of the browser, so a write in one tab and a callback in another compare directly.

import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { gzipSync } from "node:zlib";
import { chromium } from "playwright-core";
import {
  CHROMIUM,
  CHROMIUM_ARGS,
  CLIENT_ASSETS,
  launchBrowser,
  openTab,
  percentile,
  repoRoot,
  routeTestPage,
  startServer,
  withTimeout,
} from "./harness.mjs";

const ROUNDS = Number(process.env.BENCH_ROUNDS || 200);
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

async function main() {
  const server = await startServer();
  const browser = await launchBrowser();
  try {
    // --- local exec latency ---
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

    // --- download size ---
    let raw = 0;
    let gzip = 0;
    const files = {};
    for (const file of CLIENT_ASSETS) {
      const body = Buffer.from(await (await fetch(server.origin + file)).arrayBuffer());
      const zipped = gzipSync(body, { level: 9 }).length;
      files[file] = { bytes: body.length, gzip_bytes: zipped };
      raw += body.length;
      gzip += zipped;
    }
    report("page download (script+worker+wasm)", { gzip_kb: +(gzip / 1024).toFixed(1), raw_kb: +(raw / 1024).toFixed(1) }, "gzip <= 800 KB");
    figures["page download (script+worker+wasm)"].files = files;

    // --- cold open on a 10k-row database ---
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
  } finally {
    await browser.close();
    await server.cleanup();
  }
  const out = path.join(repoRoot, "target/bench");
  await mkdir(out, { recursive: true });
  const file = path.join(out, "browser.json");
  await writeFile(file, JSON.stringify({ when: new Date().toISOString(), rounds: ROUNDS, figures }, null, 2));
  console.log(`wrote ${file}`);
}

main().catch((error) => {
  console.error(error);
  process.exitCode = 1;
});
