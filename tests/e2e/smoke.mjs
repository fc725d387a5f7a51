// Smoke test of Hearth's browser plumbing: hearth.js -> page wasm -> MessagePort ->
// SharedWorker -> SQLite on IndexedDB, in Debian's Chromium driven by playwright-core.
//
//   node tests/e2e/smoke.mjs [WEB_DIR]
//
// WEB_DIR (or $HEARTH_WEB_DIR) is the bundle build.rs writes to $OUT_DIR/web; by default
// the newest one under target/ is used. Until the hearth server serves the bundle, this
// script serves it itself with a small static file server on a loopback port.
//
// Chromium is started by hand (not by playwright's launch) and attached over CDP, so the
// persistence check can SIGKILL the whole browser, like a crash, and start it again on
// the same profile.

import { spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync, statSync } from "node:fs";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
// Without the background-networking flags Chromium keeps dialing out into a network that
// is closed here; the others make a container without a GPU or a big /dev/shm work.
const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-dev-shm-usage",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--remote-debugging-port=0",
];
const STEP_TIMEOUT_MS = 30_000;
const MIME = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".wasm": "application/wasm",
  ".css": "text/css; charset=utf-8",
};
// The page every tab loads: nothing but the drop-in script, as an app would have it.
const SMOKE_PAGE = `<!doctype html><meta charset="utf-8"><title>smoke</title>
<script src="/hearth.js"></script>`;

const repoRoot = path.resolve(import.meta.dirname, "../..");

function withTimeout(promise, what, ms = STEP_TIMEOUT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function findWebDir() {
  const given = process.argv[2] || process.env.HEARTH_WEB_DIR;
  if (given) return path.resolve(given);
  const targetDir = process.env.CARGO_TARGET_DIR || path.join(repoRoot, "target");
  const candidates = [];
  for (const profile of ["release", "debug"]) {
    const buildDir = path.join(targetDir, profile, "build");
    if (!existsSync(buildDir)) continue;
    for (const entry of await readdir(buildDir)) {
      const web = path.join(buildDir, entry, "out", "web");
      const wasm = path.join(web, "pkg", "hearth_worker_bg.wasm");
      if (/^hearth-[0-9a-f]+$/.test(entry) && existsSync(wasm)) {
        candidates.push({ web, mtime: statSync(wasm).mtimeMs });
      }
    }
  }
  candidates.sort((a, b) => b.mtime - a.mtime);
  if (!candidates.length) {
    throw new Error(`no built web bundle under ${targetDir}: run \`cargo build --release\` first`);
  }
  return candidates[0].web;
}

async function serveStatic(webDir) {
  const server = http.createServer(async (req, res) => {
    const url = new URL(req.url, "http://localhost");
    if (url.pathname === "/smoke.html") {
      res.writeHead(200, { "content-type": MIME[".html"] }).end(SMOKE_PAGE);
      return;
    }
    const file = path.join(webDir, path.normalize(url.pathname === "/" ? "/index.html" : url.pathname));
    if (!file.startsWith(webDir + path.sep)) {
      res.writeHead(403).end();
      return;
    }
    try {
      const body = await readFile(file);
      const type = MIME[path.extname(file)] || "application/octet-stream";
      res.writeHead(200, { "content-type": type, "cache-control": "no-store" }).end(body);
    } catch {
      res.writeHead(404).end("not found");
    }
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return { server, origin: `http://127.0.0.1:${server.address().port}` };
}

// Starts Chromium on `profileDir` and attaches playwright to it over CDP.
async function startBrowser(profileDir) {
  const child = spawn(CHROMIUM, [...CHROMIUM_FLAGS, `--user-data-dir=${profileDir}`, "about:blank"], {
    detached: true, // its own process group, so a kill takes every Chromium process
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  const endpoint = await withTimeout(
    new Promise((resolve, reject) => {
      child.stderr.on("data", (chunk) => {
        log += chunk;
        const match = log.match(/DevTools listening on (ws:\/\/\S+)/);
        if (match) resolve(match[1]);
      });
      child.on("exit", (code) => reject(new Error(`chromium exited with ${code}:\n${log}`)));
    }),
    "chromium to start",
  );
  child.stderr.resume();
  const browser = await chromium.connectOverCDP(endpoint);
  return { child, browser, context: browser.contexts()[0] };
}

function killBrowser({ child }) {
  process.kill(-child.pid, "SIGKILL");
  return once(child, "exit");
}

async function stopBrowser(running) {
  await running.browser.close().catch(() => {});
  if (running.child.exitCode === null) await killBrowser(running);
}

async function openTab(context, origin, name = "smoke") {
  const page = await context.newPage();
  page.on("pageerror", (error) => console.error(`  [page error] ${error.message}`));
  await withTimeout(page.goto(`${origin}/smoke.html`), "page load");
  await withTimeout(
    page.evaluate(async (name) => {
      window.db = await Hearth.open({ name });
    }, name),
    "Hearth.open",
  );
  return page;
}

// Runs `db.<method>(sql, params)` in the tab; returns {ok, value} or {ok: false, code, message}.
function call(page, method, sql, params = []) {
  return withTimeout(
    page.evaluate(
      async ([method, sql, params]) => {
        try {
          return { ok: true, value: await window.db[method](sql, params) };
        } catch (error) {
          return { ok: false, code: error.code, message: error.message };
        }
      },
      [method, sql, params],
    ),
    `${method}(${sql})`,
  );
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

const results = [];
async function step(name, body) {
  const started = performance.now();
  try {
    await body();
    results.push(true);
    console.log(`ok   ${name} (${Math.round(performance.now() - started)} ms)`);
  } catch (error) {
    results.push(false);
    console.log(`FAIL ${name}\n     ${error.stack || error}`);
  }
}

async function main() {
  const webDir = await findWebDir();
  const { server, origin } = await serveStatic(webDir);
  const profileDir = await mkdtemp(path.join(os.tmpdir(), "hearth-smoke-"));
  console.log(`web bundle: ${webDir}\nserved at:  ${origin}\nprofile:    ${profileDir}`);
  let running = await startBrowser(profileDir);
  try {
    let tab1, tab2;
    await step("tab 1 opens the database and writes", async () => {
      tab1 = await openTab(running.context, origin);
      let r = await call(tab1, "exec", "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, body TEXT)");
      check(r.ok, `create table: ${r.code} ${r.message}`);
      r = await call(tab1, "exec", "INSERT INTO items (body) VALUES (?)", ["from tab 1"]);
      check(r.ok && r.value.rowsAffected === 1, `insert: ${JSON.stringify(r)}`);
    });

    await step("tab 2 of the same device reads it, and tab 1 reads tab 2's write", async () => {
      tab2 = await openTab(running.context, origin);
      let r = await call(tab2, "query", "SELECT body FROM items WHERE body = ?", ["from tab 1"]);
      check(r.ok && r.value.length === 1 && r.value[0].body === "from tab 1", `tab 2 query: ${JSON.stringify(r)}`);
      r = await call(tab2, "exec", "INSERT INTO items (body) VALUES (?)", ["from tab 2"]);
      check(r.ok, `tab 2 insert: ${JSON.stringify(r)}`);
      r = await call(tab1, "query", "SELECT count(*) AS n FROM items WHERE body LIKE 'from tab %'");
      check(r.ok && r.value[0].n === 2, `tab 1 count: ${JSON.stringify(r)}`);
    });

    await step("both tabs share exactly one SharedWorker", async () => {
      const cdp = await running.browser.newBrowserCDPSession();
      const { targetInfos } = await cdp.send("Target.getTargets");
      const workers = targetInfos.filter((t) => t.type === "shared_worker");
      check(workers.length === 1, `expected 1 shared worker, found ${JSON.stringify(workers)}`);
    });

    await step("bad SQL is a clear error with a code, and the worker keeps serving", async () => {
      const bad = [
        ["exec", "INSERT INTO items VALUS (1)", []],
        ["query", "SELECT * FROM no_such_table", []],
        ["exec", "INSERT INTO items (body) VALUES (?)", ["a", "b"]],
      ];
      for (const [method, sql, params] of bad) {
        const r = await call(tab1, method, sql, params);
        check(!r.ok && r.code === "SQL_ERROR" && r.message, `${sql}: ${JSON.stringify(r)}`);
      }
      const r = await call(tab2, "query", "SELECT count(*) AS n FROM items");
      check(r.ok && r.value[0].n === 2, `after errors: ${JSON.stringify(r)}`);
    });

    await step("values round-trip with their types", async () => {
      await call(tab1, "exec", "CREATE TABLE IF NOT EXISTS kinds (i INTEGER, r REAL, t TEXT, b BLOB, n, big INTEGER)");
      const w = await tab1.evaluate(() =>
        db.exec("INSERT INTO kinds VALUES (?, ?, ?, ?, ?, ?)", [42, 1.5, "héllo", new Uint8Array([1, 2, 255]), null, 2n ** 62n]),
      );
      check(w.rowsAffected === 1, "insert kinds");
      const row = await tab2.evaluate(async () => {
        const [row] = await db.query("SELECT * FROM kinds");
        return { ...row, b: Array.from(row.b), bigType: typeof row.big, big: String(row.big) };
      });
      check(row.i === 42 && row.r === 1.5 && row.t === "héllo" && row.n === null, JSON.stringify(row));
      check(row.b.join() === "1,2,255" && row.bigType === "bigint" && row.big === String(2n ** 62n), JSON.stringify(row));
    });

    await step("single-row exec latency, page -> worker -> IndexedDB flush -> page", async () => {
      const times = await withTimeout(
        tab1.evaluate(async () => {
          const times = [];
          for (let i = 0; i < 200; i++) {
            const t0 = performance.now();
            await db.exec("INSERT INTO items (body) VALUES (?)", [`latency ${i}`]);
            times.push(performance.now() - t0);
          }
          return times;
        }),
        "latency loop",
      );
      times.sort((a, b) => a - b);
      console.log(`     exec p50 ${percentile(times, 50).toFixed(2)} ms, p99 ${percentile(times, 99).toFixed(2)} ms (200 sequential)`);
    });

    await step("a write whose exec resolved survives the browser being killed at once", async () => {
      const before = await call(tab1, "query", "SELECT count(*) AS n FROM items");
      // The kill follows the resolution as closely as this process can manage.
      const r = await call(tab1, "exec", "INSERT INTO items (body) VALUES (?)", ["survives the kill"]);
      await killBrowser(running);
      check(r.ok, `exec before the kill: ${JSON.stringify(r)}`);
      running = await startBrowser(profileDir);
      const tab = await openTab(running.context, origin);
      const after = await call(tab, "query", "SELECT count(*) AS n FROM items");
      const row = await call(tab, "query", "SELECT body FROM items WHERE body = ?", ["survives the kill"]);
      check(row.ok && row.value.length === 1, `after restart: ${JSON.stringify(row)}`);
      check(after.value[0].n === before.value[0].n + 1, `row count ${before.value[0].n} -> ${after.value[0].n}`);
    });

    await step("the placeholder index.html opens its database", async () => {
      const page = await running.context.newPage();
      await page.goto(`${origin}/`);
      await withTimeout(
        page.waitForFunction(() => document.getElementById("status").textContent.startsWith("Local database ready")),
        "index.html status",
      );
    });
  } finally {
    await stopBrowser(running);
    server.close();
    await rm(profileDir, { recursive: true, force: true });
  }
  const passed = results.filter(Boolean).length;
  const failed = results.length - passed;
  console.log(`smoke: ${passed} passed, ${failed} failed`);
  process.exitCode = failed ? 1 : 0;
}

main().catch((error) => {
  console.error(error);
  process.exitCode = 1;
});
