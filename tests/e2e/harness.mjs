// Shared pieces of the browser end-to-end tests and the benchmark: the real `hearth`
// server binary on a loopback port, Debian's Chromium driven by playwright-core, and a
// bare test page that loads nothing but the drop-in script.

import { spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync } from "node:fs";
import http from "node:http";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

export const repoRoot = path.resolve(import.meta.dirname, "../..");
export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
// Without the background-networking flags Chromium keeps dialing out into a network that
// is closed here; the others make a container without a GPU or a big /dev/shm work.
export const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-dev-shm-usage",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];
export const STEP_TIMEOUT_MS = 30_000;

// The page every test tab loads: nothing but the drop-in script, as an app would have it.
// It is served by playwright's router under the server's origin, so the SharedWorker and
// the WebSocket are same-origin with it, exactly as for a real app page.
export const TEST_PAGE_PATH = "/__hearth_e2e.html";
const TEST_PAGE = `<!doctype html><meta charset="utf-8"><title>hearth e2e</title>
<script src="/hearth.js"></script>`;

export function hearthBinary() {
  if (process.env.HEARTH_BIN) return process.env.HEARTH_BIN;
  const targetDir = process.env.CARGO_TARGET_DIR || path.join(repoRoot, "target");
  for (const profile of ["release", "debug"]) {
    const bin = path.join(targetDir, profile, "hearth");
    if (existsSync(bin)) return bin;
  }
  throw new Error("no hearth binary: run `cargo build --release` first");
}

export function withTimeout(promise, what, ms = STEP_TIMEOUT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Starts `hearth serve` on `listen` (default: a free loopback port) with a fresh or given
// data directory. Resolves once its first stdout line names the address.
export async function startServer({ data, schema, app, listen = "127.0.0.1:0" } = {}) {
  const dataDir = data || (await mkdtemp(path.join(os.tmpdir(), "hearth-e2e-data-")));
  const args = ["serve", "--listen", listen, "--data", dataDir];
  if (schema) args.push("--schema", schema);
  if (app) args.push("--app", app);
  const child = spawn(hearthBinary(), args, { stdio: ["ignore", "pipe", "inherit"] });
  const lines = createInterface({ input: child.stdout });
  const first = await withTimeout(
    new Promise((resolve, reject) => {
      lines.once("line", resolve);
      child.once("exit", (code) => reject(new Error(`hearth serve exited with ${code}`)));
    }),
    "hearth serve to start",
  );
  const match = first.match(/^hearth: serving http:\/\/(\S+)/);
  if (!match) throw new Error(`unexpected first line from hearth serve: ${first}`);
  lines.on("line", () => {}); // keep draining stdout
  const addr = match[1];
  return {
    child,
    addr,
    origin: `http://${addr}`,
    data: dataDir,
    schema,
    async stop() {
      if (child.exitCode !== null) return;
      const exited = once(child, "exit");
      child.kill("SIGINT");
      // A graceful stop waits for open connections; past a few seconds, end it hard.
      const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(timer);
    },
    // Starts the server again on the same address and data (the browser's worker keeps
    // its server URL, so the port must not change).
    async restart() {
      await this.stop();
      return startServer({ data: dataDir, schema, app, listen: addr });
    },
    async cleanup() {
      await this.stop();
      if (!data) await rm(dataDir, { recursive: true, force: true });
    },
  };
}

// The files a page needs to run Hearth on a running server: the stable entry points and
// the content-hashed files they name (/pkg/NAME.<hash>.EXT, new with each build).
export async function clientAssets(origin) {
  const entries = ["/hearth.js", "/hearth-worker.js"];
  const hashed = new Set();
  for (const file of entries) {
    const text = await (await fetch(origin + file)).text();
    for (const match of text.matchAll(/pkg\/[\w-]+\.[0-9a-f]{16}\.\w+/g)) hashed.add("/" + match[0]);
  }
  if (hashed.size !== 4) throw new Error(`expected 4 hashed files named by ${entries}, found ${[...hashed]}`);
  return [...entries, ...hashed];
}
export async function snapshotAssets(origin) {
  const assets = new Map();
  for (const file of await clientAssets(origin)) {
    const response = await fetch(origin + file);
    if (!response.ok) throw new Error(`GET ${file}: ${response.status}`);
    assets.set(file, { type: response.headers.get("content-type"), body: Buffer.from(await response.arrayBuffer()) });
  }
  return assets;
}

// A static host on `addr` (host:port) serving `assets` and refusing the sync endpoint:
// "the web server is up, the sync server is down", so that a page can load while its
// device cannot sync.
export async function startStaticStandIn(addr, assets) {
  const [host, port] = [addr.slice(0, addr.lastIndexOf(":")), Number(addr.slice(addr.lastIndexOf(":") + 1))];
  const server = http.createServer((req, res) => {
    const asset = assets.get(new URL(req.url, "http://x").pathname);
    if (!asset) return res.writeHead(503).end("sync server down");
    res.writeHead(200, { "content-type": asset.type, "cache-control": "no-store" }).end(asset.body);
  });
  server.on("upgrade", (_req, socket) => socket.destroy());
  server.listen(port, host);
  await once(server, "listening");
  return {
    async stop() {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

// A plain static web server for `dir` on a free loopback port: an app's own origin, apart
// from the sync server's (as a CDN or a dev server would be).
const STATIC_TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css" };
export async function startStaticDir(dir) {
  const server = http.createServer(async (req, res) => {
    const name = new URL(req.url, "http://x").pathname.replace(/\/$/, "/index.html");
    if (name.split("/").includes("..")) return res.writeHead(400).end();
    try {
      const body = await readFile(path.join(dir, name));
      res.writeHead(200, { "content-type": STATIC_TYPES[path.extname(name)] || "application/octet-stream", "cache-control": "no-cache" }).end(body);
    } catch {
      res.writeHead(404).end("not found");
    }
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  return {
    origin: `http://127.0.0.1:${server.address().port}`,
    async stop() {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

// React from tests/e2e/node_modules (the npm registry's package, production build) as one
// ES module, for an import map: React ships CommonJS only, so its files are wrapped in a
// minimal require() here instead of a bundler. Exports React's API and react-dom/client's.
const REACT_FILES = {
  react: "react/cjs/react.production.js",
  "react-dom": "react-dom/cjs/react-dom.production.js",
  "react-dom/client": "react-dom/cjs/react-dom-client.production.js",
  scheduler: "scheduler/cjs/scheduler.production.js",
};
const REACT_EXPORTS = ["Children", "Component", "Fragment", "StrictMode", "createContext", "createElement", "memo", "useCallback", "useContext", "useEffect", "useLayoutEffect", "useMemo", "useReducer", "useRef", "useState", "useSyncExternalStore"];
export async function reactAsModule() {
  let code = "const defs = {};\n";
  for (const [name, file] of Object.entries(REACT_FILES)) {
    const source = await readFile(path.join(import.meta.dirname, "node_modules", file), "utf8");
    code += `defs[${JSON.stringify(name)}] = function (module, exports, require) {\n${source}\n};\n`;
  }
  code += `const cache = {};
function require(name) {
  if (!(name in cache)) {
    const module = { exports: {} };
    cache[name] = module;
    defs[name](module, module.exports, require);
  }
  return cache[name].exports;
}
const React = require("react");
export default React;
export const { ${REACT_EXPORTS.join(", ")} } = React;
export const { createRoot, hydrateRoot } = require("react-dom/client");
`;
  return code;
}

// With WEB_DIR set (e.g. WEB_DIR=web), pages of `context` get the demo app's own files
// (index.html, app.js, app.css) from that directory instead of the server, so a change
// to the app can be looked at without rebuilding the binary. Call before any page loads.
const DEMO_FILES = { "/": "index.html", "/index.html": "index.html", "/app.js": "app.js", "/app.css": "app.css" };
const DEMO_TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css" };
export async function demoFromWebDir(context) {
  const webDir = process.env.WEB_DIR;
  if (!webDir) return;
  await context.route(
    (url) => url.pathname in DEMO_FILES,
    async (route) => {
      const name = DEMO_FILES[new URL(route.request().url()).pathname];
      const body = await readFile(path.join(webDir, name));
      await route.fulfill({ status: 200, contentType: DEMO_TYPES[path.extname(name)], body, headers: { "cache-control": "no-store" } });
    },
  );
}

// Reads one counter from the server's Prometheus text.
export async function metric(origin, name) {
  const text = await (await fetch(`${origin}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(name + " ") || l.startsWith(name + "{"));
  if (!line) throw new Error(`metric ${name} not found`);
  return Number(line.trim().split(/\s+/).pop());
}

export function launchBrowser() {
  return chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
}

// Serves the bare test page on `origin` for every page of `context`.
export async function routeTestPage(context) {
  await context.route(`**${TEST_PAGE_PATH}`, (route) =>
    route.fulfill({ status: 200, contentType: "text/html; charset=utf-8", body: TEST_PAGE }),
  );
}

// Opens a tab of `context` on the test page and `Hearth.open`s `name` in it as `window.db`.
export async function openTab(context, origin, name = "e2e") {
  const page = await context.newPage();
  page.on("pageerror", (error) => console.error(`  [page error] ${error.message}`));
  await withTimeout(page.goto(`${origin}${TEST_PAGE_PATH}`), "page load");
  await withTimeout(
    page.evaluate(async (name) => {
      window.db = await Hearth.open({ name });
      window.events = { status: [], change: [], rejected: [] };
      for (const kind of Object.keys(window.events)) {
        db.on(kind, (value) =>
          window.events[kind].push(
            kind === "rejected"
              ? { code: value.code, message: value.message, reason: value.reason, mutation: value.mutation, serverCode: value.serverCode, undone: value.undone }
              : value,
          ),
        );
      }
    }, name),
    "Hearth.open",
  );
  return page;
}

// Runs `db.<method>(sql, params)` in the tab; returns {ok, value} or {ok: false, code, message}.
export function call(page, method, sql, params = []) {
  return withTimeout(
    page.evaluate(
      async ([method, sql, params]) => {
        try {
          let value = await window.db[method](sql, params);
          // A write's `settled` promise stays in the page (by mutation number): a promise
          // does not cross to the test.
          if (value && value.settled instanceof Promise) {
            window.settled = window.settled || {};
            window.settled[value.mutation] = value.settled;
            value = { ...value, settled: "in window.settled" };
          }
          return { ok: true, value };
        } catch (error) {
          return { ok: false, code: error.code, message: error.message, isError: error instanceof Error };
        }
      },
      [method, sql, params],
    ),
    `${method}(${sql})`,
  );
}

// Starts a live query in the tab; its results collect in `window.live[key]`.
export function startLive(page, key, sql, params = []) {
  return page.evaluate(
    ([key, sql, params]) => {
      window.live = window.live || {};
      window.stops = window.stops || {};
      window.live[key] = [];
      window.stops[key] = db.live(sql, params, (rows) => window.live[key].push(rows));
    },
    [key, sql, params],
  );
}

// Waits until `predicate(latestRows)` holds for live query `key` in the tab.
export function waitLive(page, key, predicate, what, ms = STEP_TIMEOUT_MS) {
  return withTimeout(
    page.waitForFunction(
      ([key, source]) => {
        const results = (window.live || {})[key] || [];
        return results.length > 0 && new Function("rows", `return (${source})(rows)`)(results[results.length - 1]);
      },
      [key, predicate.toString()],
      { timeout: ms, polling: 20 },
    ),
    what,
    ms + 1000,
  );
}

export function waitFor(page, fn, arg, what, ms = STEP_TIMEOUT_MS) {
  return withTimeout(page.waitForFunction(fn, arg, { timeout: ms, polling: 20 }), what, ms + 1000);
}

export function check(condition, message) {
  if (!condition) throw new Error(message);
}

export function percentile(sorted, p) {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}
