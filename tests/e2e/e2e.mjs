// Browser end-to-end tests: playwright-core driving Debian's Chromium against the real
// `hearth` server binary on loopback ports, with the demo schema unless said otherwise.
//
//   node tests/e2e/e2e.mjs            (after `cargo build --release`; see tests/e2e/run.sh)
//
// Each test prints "ok"/"FAIL"; the last line is "N passed, M failed" and the exit code is
// non-zero on any failure. Persistence starts Chromium by hand and attaches over CDP, so
// that it can SIGKILL the whole browser like a crash and start it again on the profile.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { once } from "node:events";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";
import {
  CHROMIUM,
  CHROMIUM_ARGS,
  call,
  clientAssets,
  check,
  demoFromWebDir,
  launchBrowser,
  metric,
  openTab,
  routeTestPage,
  reactAsModule,
  repoRoot,
  snapshotAssets,
  startLive,
  startStaticDir,
  startStaticStandIn,
  startServer,
  TEST_PAGE_PATH,
  waitFor,
  waitLive,
  withTimeout,
} from "./harness.mjs";

const APPLIED = "hearth_mutations_applied_total";
let counter = 0;
const uid = (prefix) => `${prefix}-${process.pid}-${++counter}`;

const results = [];
// E2E_ONLY=text runs only the tests whose name holds that text (some build on the one
// before them), to iterate on one.
async function test(name, body) {
  if (process.env.E2E_ONLY && !name.includes(process.env.E2E_ONLY)) return;
  const started = performance.now();
  try {
    await body();
    results.push(true);
    console.log(`ok   ${name} (${Math.round(performance.now() - started)} ms)`);
  } catch (error) {
    results.push(false);
    console.log(`FAIL ${name}\n     ${(error.stack || String(error)).split("\n").join("\n     ")}`);
  }
}

async function newDevice(browser, origin) {
  const context = await browser.newContext();
  await routeTestPage(context);
  return context;
}

function sharedWorkerCount(browser) {
  return browser
    .newBrowserCDPSession()
    .then((cdp) => cdp.send("Target.getTargets"))
    .then(({ targetInfos }) => targetInfos.filter((t) => t.type === "shared_worker").length);
}

// Starts Chromium on `profileDir` by hand and attaches playwright over CDP.
async function startOwnBrowser(profileDir) {
  const child = spawn(
    CHROMIUM,
    ["--headless", ...CHROMIUM_ARGS, "--remote-debugging-port=0", `--user-data-dir=${profileDir}`, "about:blank"],
    { detached: true, stdio: ["ignore", "ignore", "pipe"] },
  );
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
  const context = browser.contexts()[0];
  await routeTestPage(context);
  return { child, browser, context };
}

async function killOwnBrowser({ child }) {
  if (child.exitCode !== null) return;
  process.kill(-child.pid, "SIGKILL");
  await once(child, "exit");
}

async function main() {
  let server = await startServer();
  const dataDir = server.data;
  const browser = await launchBrowser();
  const cleanups = [];
  console.log(`server: ${server.origin} (data ${server.data})`);
  try {
    // --- 1. Two tabs of one device share one worker, and talk without the server. ---
    await test("two tabs share one worker: tab 1's write reaches tab 2's live query with the server stopped", async () => {
      const device = await newDevice(browser, server.origin);
      cleanups.push(() => device.close());
      const tab1 = await openTab(device, server.origin);
      const tab2 = await openTab(device, server.origin);
      check((await sharedWorkerCount(browser)) === 1, "expected exactly one SharedWorker for two tabs");
      await withTimeout(tab1.evaluate(() => db.sync()), "first sync");
      await server.stop();
      await waitFor(tab2, () => !db.status().online, null, "tab 2 to see the server gone");
      const list = uid("list");
      await startLive(tab2, "lists", "SELECT id, name FROM lists WHERE id = ?", [list]);
      await waitLive(tab2, "lists", (rows) => rows.length === 0, "empty live result");
      const r = await call(tab1, "exec", "INSERT INTO lists (id, name) VALUES (?, ?)", [list, "offline tabs"]);
      check(r.ok && r.value.rowsAffected === 1 && typeof r.value.mutation === "number", `exec: ${JSON.stringify(r)}`);
      await waitLive(tab2, "lists", (rows) => rows.length === 1 && rows[0].name === "offline tabs", "tab 2 live update");
      const status = await tab2.evaluate(() => db.status());
      check(status.pending >= 1 && !status.online, `status with the server down: ${JSON.stringify(status)}`);
      // The server comes back on the same port: the queued write goes out by itself.
      // The worker may reconnect and send before we can read a "before" figure, so count
      // from the restart: a fresh server process starts its counters at zero.
      server = await server.restart();
      await withTimeout(tab1.evaluate(() => db.sync({ timeoutMs: 20000 })), "sync after restart", 25000);
      const applied = await metric(server.origin, APPLIED);
      check(applied === 1, `the queued write was applied exactly once by the restarted server (applied ${applied})`);
      check((await tab2.evaluate(() => db.status())).pending === 0, "nothing pending after sync");
    });

    // --- 2. Two devices. ---
    let deviceA, deviceB, tabA, tabB;
    await test("two devices: a write on A reaches B's live query through the server", async () => {
      deviceA = await newDevice(browser, server.origin);
      deviceB = await newDevice(browser, server.origin);
      cleanups.push(() => deviceA.close(), () => deviceB.close());
      tabA = await openTab(deviceA, server.origin);
      tabB = await openTab(deviceB, server.origin);
      const list = uid("list");
      await startLive(tabB, "todos", "SELECT title, done FROM todos WHERE list_id = ? ORDER BY position", [list]);
      await waitLive(tabB, "todos", (rows) => rows.length === 0, "B's first live result");
      let r = await call(tabA, "exec", "INSERT INTO lists (id, name) VALUES (?, ?)", [list, "groceries"]);
      check(r.ok, JSON.stringify(r));
      r = await call(tabA, "exec", "INSERT INTO todos (id, list_id, title, position) VALUES (?, ?, ?, 1)", [uid("todo"), list, "milk"]);
      check(r.ok, JSON.stringify(r));
      await waitLive(tabB, "todos", (rows) => rows.length === 1 && rows[0].title === "milk", "B's live query");
      const bDb = await tabB.evaluate(() => db.query("SELECT count(*) AS n FROM lists"));
      const aDb = await tabA.evaluate(() => db.query("SELECT count(*) AS n FROM lists"));
      check(aDb[0].n === bDb[0].n, `lists converge: A ${aDb[0].n}, B ${bDb[0].n}`);
      const changes = await tabB.evaluate(() => window.events.change.map((c) => c.tables).flat());
      check(changes.includes("todos"), `B got a change event for todos: ${JSON.stringify(changes)}`);
    });

    // --- 3. Offline device. ---
    await test("A offline: writes queue (pending shown), back online they are delivered once and both converge", async () => {
      check(tabA && tabB, "needs the two devices of the previous test");
      await withTimeout(tabA.evaluate(() => db.sync()), "A synced first");
      const before = await metric(server.origin, APPLIED);
      await deviceA.setOffline(true);
      await waitFor(tabA, () => !db.status().online, null, "A to go offline");
      const list = uid("list");
      await startLive(tabB, "offline", "SELECT name FROM lists WHERE id = ?", [list]);
      await call(tabA, "exec", "INSERT INTO lists (id, name) VALUES (?, ?)", [list, "written offline"]);
      for (const title of ["one", "two"]) {
        const r = await call(tabA, "exec", "INSERT INTO todos (id, list_id, title) VALUES (?, ?, ?)", [uid("todo"), list, title]);
        check(r.ok, JSON.stringify(r));
      }
      const offline = await tabA.evaluate(() => db.status());
      check(offline.pending === 3 && !offline.online, `status while offline: ${JSON.stringify(offline)}`);
      const synced = await tabA.evaluate(() => db.sync({ timeoutMs: 300 }).then(() => "resolved", (e) => e.code));
      check(synced === "OFFLINE", `sync while offline: ${synced}`);
      check((await metric(server.origin, APPLIED)) === before, "nothing reached the server while offline");
      await deviceA.setOffline(false);
      await withTimeout(tabA.evaluate(() => db.sync({ timeoutMs: 20000 })), "A sync after coming back", 25000);
      await waitLive(tabB, "offline", (rows) => rows.length === 1 && rows[0].name === "written offline", "B sees A's offline write");
      check((await metric(server.origin, APPLIED)) === before + 3, "three writes applied exactly once");
      await withTimeout(tabB.evaluate(() => db.sync()), "B synced");
      const q = "SELECT id, list_id, title, done FROM todos ORDER BY id";
      const [a, b] = await Promise.all([call(tabA, "query", q), call(tabB, "query", q)]);
      check(JSON.stringify(a.value) === JSON.stringify(b.value), "A and B hold the same todos");
      const statuses = await tabA.evaluate(() => window.events.status.map((s) => s.pending));
      check(statuses.includes(3), `A's status events showed 3 pending: ${JSON.stringify(statuses)}`);
    });

    // --- 5. Bad input. ---
    await test("bad input from a page is a JS Error with a code; the worker keeps serving every tab", async () => {
      const tab2 = await openTab(deviceA, server.origin);
      const bad = [
        ["exec", "INSERT INTO lists VALUS (1)", [], "SQL_ERROR"],
        ["exec", "INSERT INTO no_such_table (id) VALUES (1)", [], "SQL_ERROR"],
        ["query", "SELECT * FROM no_such_table", [], "SQL_ERROR"],
        ["exec", "INSERT INTO lists (id, name) VALUES (?, ?)", ["only one"], "SQL_ERROR"],
        ["query", "SELECT * FROM lists WHERE id = ?", [], "SQL_ERROR"],
        ["query", "DELETE FROM lists", [], "SQL_ERROR"],
        ["exec", "BEGIN", [], "SQL_ERROR"],
        ["exec", "INSERT INTO lists (id, name) VALUES (?, ?)", [{ an: "object" }, "x"], "INVALID_ARGUMENT"],
      ];
      for (const [method, sql, params, code] of bad) {
        const r = await call(tabA, method, sql, params);
        check(!r.ok && r.isError && r.code === code && r.message, `${method}(${sql}): ${JSON.stringify(r)}`);
      }
      const notArray = await tabA.evaluate(() => db.exec("SELECT 1", "nope").then(() => "ok", (e) => e.code));
      check(notArray === "INVALID_ARGUMENT", `params not an array: ${notArray}`);
      const liveError = await tabA.evaluate(
        () => new Promise((resolve) => db.live("SELECT * FROM nope", [], () => resolve("rows"), (e) => resolve(e.code))),
      );
      check(liveError === "SQL_ERROR", `live on a bad query: ${liveError}`);
      const list = uid("list");
      for (const tab of [tabA, tab2]) {
        const r = await call(tab, "exec", "INSERT INTO lists (id, name) VALUES (?, ?)", [`${list}-${tab === tabA}`, "still fine"]);
        check(r.ok, `a tab after the errors: ${JSON.stringify(r)}`);
      }
      const r = await call(tab2, "query", "SELECT count(*) AS n FROM lists WHERE id LIKE ?", [`${list}-%`]);
      check(r.ok && r.value[0].n === 2, JSON.stringify(r));
      await tab2.close();
    });

    // --- Merge policies through the page API: text edits, manual conflicts. ---
    let deviceC, deviceD, tabC, tabD;
    const sameOnBoth = async (sql, params, what) => {
      await withTimeout(Promise.all([tabC.evaluate(() => db.sync({ timeoutMs: 25000 })), tabD.evaluate(() => db.sync({ timeoutMs: 25000 }))]), `${what}: both synced`, 30000);
      const [c, d] = await Promise.all([call(tabC, "query", sql, params), call(tabD, "query", sql, params)]);
      check(c.ok && d.ok && JSON.stringify(c.value) === JSON.stringify(d.value), `${what}: C ${JSON.stringify(c)}, D ${JSON.stringify(d)}`);
      return c.value;
    };
    await test("text: two devices edit the same note with the server stopped (editText by code point, and a plain UPDATE); both edits survive on both", async () => {
      deviceC = await newDevice(browser, server.origin);
      deviceD = await newDevice(browser, server.origin);
      cleanups.push(() => deviceC.close(), () => deviceD.close());
      tabC = await openTab(deviceC, server.origin);
      tabD = await openTab(deviceD, server.origin);
      const list = uid("list");
      const todo = uid("todo");
      let r = await call(tabC, "exec", "INSERT INTO lists (id, name) VALUES (?, ?)", [list, "notes"]);
      check(r.ok, JSON.stringify(r));
      // The crab is one code point but two UTF-16 units: positions after it tell the two apart.
      r = await call(tabC, "exec", "INSERT INTO todos (id, list_id, title, notes) VALUES (?, ?, ?, ?)", [todo, list, "note", "a🦀b"]);
      check(r.ok, JSON.stringify(r));
      await sameOnBoth("SELECT notes FROM todos WHERE id = ?", [todo], "the note on both");
      const tabC2 = await openTab(deviceC, server.origin);
      await startLive(tabC2, "note", "SELECT notes FROM todos WHERE id = ?", [todo]);
      await server.stop();
      await waitFor(tabC, () => !db.status().online, null, "C sees the server gone");
      await waitFor(tabD, () => !db.status().online, null, "D sees the server gone");
      const edited = await withTimeout(
        tabC.evaluate((todo) => db.editText("todos", todo, "notes", [{ index: 2, delete: 0, insert: "C" }]), todo),
        "C's editText",
      );
      check(typeof edited.mutation === "number" && edited.rowsAffected === 1, `editText's result: ${JSON.stringify(edited)}`);
      r = await call(tabC, "query", "SELECT notes FROM todos WHERE id = ?", [todo]);
      check(r.ok && r.value[0].notes === "a🦀Cb", `C's note after its edit: ${JSON.stringify(r)}`);
      await waitLive(tabC2, "note", (rows) => rows[0]?.notes === "a🦀Cb", "C's other tab sees the edit");
      r = await call(tabD, "exec", "UPDATE todos SET notes = ? WHERE id = ?", ["a🦀bD", todo]);
      check(r.ok && r.value.rowsAffected === 1, JSON.stringify(r));
      const pending = await Promise.all([tabC, tabD].map((t) => t.evaluate(() => db.status().pending)));
      check(pending[0] >= 1 && pending[1] >= 1, `both edits queued: ${pending}`);
      server = await server.restart();
      const [row] = await sameOnBoth("SELECT notes FROM todos WHERE id = ?", [todo], "the note after reconnecting");
      check(row.notes === "a🦀CbD", `both edits survive: ${JSON.stringify(row)}`);
      await waitLive(tabC2, "note", (rows) => rows[0]?.notes === "a🦀CbD", "C's other tab sees the merge");
      await tabC2.close();
    });

    await test("manual merge: concurrent writes open a conflict on both devices; resolving on one closes it on both", async () => {
      check(tabC && tabD, "needs the two devices of the previous test");
      const list = uid("list");
      const todo = uid("todo");
      let r = await call(tabC, "exec", "INSERT INTO lists (id, name) VALUES (?, ?)", [list, "due"]);
      r = await call(tabC, "exec", "INSERT INTO todos (id, list_id, title, due) VALUES (?, ?, ?, ?)", [todo, list, "taxes", "2026-03-01"]);
      check(r.ok, JSON.stringify(r));
      await sameOnBoth("SELECT due FROM todos WHERE id = ?", [todo], "the todo on both");
      const conflictsSql = "SELECT id, column_name, candidates FROM hearth_conflicts WHERE table_name = 'todos' AND row_key = ?";
      const key = JSON.stringify(todo);
      for (const tab of [tabC, tabD]) await startLive(tab, "conflicts", conflictsSql, [key]);
      await deviceC.setOffline(true);
      await deviceD.setOffline(true);
      await waitFor(tabC, () => !db.status().online, null, "C offline");
      await waitFor(tabD, () => !db.status().online, null, "D offline");
      r = await call(tabC, "exec", "UPDATE todos SET due = ? WHERE id = ?", ["2026-04-01", todo]);
      check(r.ok, JSON.stringify(r));
      r = await call(tabD, "exec", "UPDATE todos SET due = ? WHERE id = ?", ["2026-05-01", todo]);
      check(r.ok, JSON.stringify(r));
      await deviceC.setOffline(false);
      await withTimeout(tabC.evaluate(() => db.sync({ timeoutMs: 20000 })), "C synced first", 25000);
      await deviceD.setOffline(false);
      const open = (rows) => rows.length === 1 && rows[0].column_name === "due";
      await waitLive(tabC, "conflicts", open, "the conflict on C");
      await waitLive(tabD, "conflicts", open, "the conflict on D");
      const [conflict] = await sameOnBoth(conflictsSql, [key], "the conflict");
      const candidates = JSON.parse(conflict.candidates).map((c) => c.value);
      check(candidates.includes("2026-04-01") && candidates.includes("2026-05-01"), `both candidates: ${conflict.candidates}`);
      // A value of one's own, not one of the candidates.
      const resolved = await withTimeout(tabD.evaluate((id) => db.resolve(id, "2026-06-01"), conflict.id), "D resolves");
      check(typeof resolved.mutation === "number" && resolved.rowsAffected >= 1, `resolve's result: ${JSON.stringify(resolved)}`);
      await waitLive(tabD, "conflicts", (rows) => rows.length === 0, "the conflict gone on D at once");
      await waitLive(tabC, "conflicts", (rows) => rows.length === 0, "the conflict gone on C");
      const [row] = await sameOnBoth("SELECT due FROM todos WHERE id = ?", [todo], "the resolved value");
      check(row.due === "2026-06-01", `resolved value on both: ${JSON.stringify(row)}`);
      const again = await tabC.evaluate((id) => db.resolve(id, "x").then(() => "ok", (e) => e.code), conflict.id);
      check(again === "INVALID_ARGUMENT", `resolving a closed conflict: ${again}`);
    });

    await test("editText and resolve with bad arguments: Errors coded INVALID_ARGUMENT; the worker keeps serving", async () => {
      check(tabC, "needs device C");
      const list = uid("list");
      const todo = uid("todo");
      await call(tabC, "exec", "INSERT INTO lists (id, name) VALUES (?, ?)", [list, "bad"]);
      await call(tabC, "exec", "INSERT INTO todos (id, list_id, title, notes) VALUES (?, ?, ?, ?)", [todo, list, "t", "abc"]);
      const codes = await tabC.evaluate(async (todo) => {
        const code = (p) => p.then(() => "ok", (e) => (e instanceof Error ? e.code : `not an Error: ${e}`));
        return {
          badColumn: await code(db.editText("todos", todo, "no_such_column", [{ index: 0, delete: 0, insert: "x" }])),
          notText: await code(db.editText("todos", todo, "title", [{ index: 0, delete: 0, insert: "x" }])),
          badTable: await code(db.editText("nope", todo, "notes", [{ index: 0, insert: "x" }])),
          noRow: await code(db.editText("todos", "no-such-row", "notes", [{ index: 0, insert: "x" }])),
          pastEnd: await code(db.editText("todos", todo, "notes", [{ index: 2, delete: 5 }])),
          notArray: await code(db.editText("todos", todo, "notes", { index: 0 })),
          negative: await code(db.editText("todos", todo, "notes", [{ index: -1, insert: "x" }])),
          notString: await code(db.editText("todos", todo, "notes", [{ index: 0, insert: 5 }])),
          noConflict: await code(db.resolve("no-such-conflict", "x")),
          badValue: await code(db.resolve("no-such-conflict", { an: "object" })),
          direct: await code(db.exec("DELETE FROM hearth_conflicts")),
        };
      }, todo);
      const { direct, ...invalid } = codes;
      check(Object.values(invalid).every((c) => c === "INVALID_ARGUMENT"), `codes: ${JSON.stringify(codes)}`);
      check(direct === "SQL_ERROR", `writing hearth_conflicts directly: ${direct}`);
      const r = await call(tabC, "query", "SELECT notes FROM todos WHERE id = ?", [todo]);
      check(r.ok && r.value[0].notes === "abc", `nothing changed: ${JSON.stringify(r)}`);
      const ok = await tabC.evaluate((todo) => db.editText("todos", todo, "notes", [{ index: 3, delete: 0, insert: "d" }, { index: 0, delete: 1, insert: "" }]), todo);
      check(ok.rowsAffected === 1, JSON.stringify(ok));
      const [row] = await sameOnBoth("SELECT notes FROM todos WHERE id = ?", [todo], "after the errors");
      check(row.notes === "bcd", `edits apply in order: ${JSON.stringify(row)}`);
    });

    await test("a tab that closes mid-request leaves nothing stuck; its live queries go with it", async () => {
      const doomed = await openTab(deviceA, server.origin);
      await startLive(doomed, "doomed", "SELECT count(*) AS n FROM todos");
      // Fire requests and close without waiting for them (no pagehide handler runs).
      await doomed.evaluate(() => {
        for (let i = 0; i < 50; i++) db.exec("INSERT INTO lists (id, name) VALUES (?, ?)", [`doomed-${i}-${Math.random()}`, "x"]);
        db.sync({ timeoutMs: 60000 });
      });
      await doomed.close({ runBeforeUnload: false });
      const list = uid("list");
      await startLive(tabA, "after", "SELECT name FROM lists WHERE id = ?", [list]);
      const r = await call(tabA, "exec", "INSERT INTO lists (id, name) VALUES (?, ?)", [list, "after the close"]);
      check(r.ok, JSON.stringify(r));
      await waitLive(tabA, "after", (rows) => rows.length === 1, "live query in the surviving tab");
      await withTimeout(tabA.evaluate(() => db.sync({ timeoutMs: 20000 })), "sync after a tab closed", 25000);
    });

    // --- Rejected write. ---
    await test("a write the server refuses raises `rejected` with the reason and is rolled back; receipts, hearth_pending, the outbox and discard", async () => {
      const dir = await mkdtemp(path.join(os.tmpdir(), "hearth-e2e-schema-"));
      const schema = path.join(dir, "users.toml");
      await writeFile(
        schema,
        `version = 1\n[tables.users]\ncreate = "CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT UNIQUE, name TEXT NOT NULL)"\nmerge = "lww"\n`,
      );
      const unique = await startServer({ schema });
      cleanups.push(() => unique.cleanup(), () => rm(dir, { recursive: true, force: true }));
      const a = await newDevice(browser, unique.origin);
      const b = await newDevice(browser, unique.origin);
      cleanups.push(() => a.close(), () => b.close());
      const ta = await openTab(a, unique.origin, "users");
      const tb = await openTab(b, unique.origin, "users");
      const ta2 = await openTab(a, unique.origin, "users");
      await a.setOffline(true);
      await waitFor(ta, () => !db.status().online, null, "A offline");
      await startLive(ta, "users", "SELECT id, hearth_pending('users', id) AS pending FROM users ORDER BY id");
      let r = await call(tb, "exec", "INSERT INTO users (id, email, name) VALUES ('b1', 'same@example.com', 'B')");
      check(r.ok, JSON.stringify(r));
      await withTimeout(tb.evaluate(() => db.sync()), "B synced");
      const bVerdict = await withTimeout(tb.evaluate((m) => window.settled[m], r.value.mutation), "B's verdict");
      check(bVerdict.status === "applied" && bVerdict.serverSeq >= 1, `B's write settled: ${JSON.stringify(bVerdict)}`);
      r = await call(ta, "exec", "INSERT INTO users (id, email, name) VALUES ('a1', 'same@example.com', 'A')");
      check(r.ok, `locally the write is fine: ${JSON.stringify(r)}`);
      const refused = r.value.mutation;
      await waitLive(ta, "users", (rows) => JSON.stringify(rows) === JSON.stringify([{ id: "a1", pending: 1 }]), "A sees its own write first, marked pending");
      // A second offline write, dropped on purpose from another tab of A: undone, every tab told.
      const kept = await call(ta, "exec", "INSERT INTO users (id, email, name) VALUES ('a2', 'a2@example.com', 'A2')");
      check(kept.ok, JSON.stringify(kept));
      const outbox = await ta2.evaluate(() => db.pending());
      check(
        outbox.length === 2 &&
          outbox[0].mutation === refused &&
          JSON.stringify(outbox[1].rows) === JSON.stringify([{ table: "users", key: "a2" }]) &&
          JSON.stringify(outbox[1].tables) === JSON.stringify(["users"]) &&
          outbox.every((w) => w.attempts === 0 && w.sent === false && Math.abs(w.madeAt - Date.now()) < 60_000),
        `the outbox: ${JSON.stringify(outbox)}`,
      );
      const discarded = await ta2.evaluate((m) => db.discard(m), kept.value.mutation);
      check(JSON.stringify(discarded) === JSON.stringify({ undone: [{ table: "users", key: "a2" }] }), `discard: ${JSON.stringify(discarded)}`);
      await waitFor(ta, () => window.events.rejected.some((e) => e.serverCode === "DISCARDED"), null, "the other tab hears of the discard");
      const keptVerdict = await withTimeout(ta.evaluate((m) => window.settled[m], kept.value.mutation), "the discarded write's verdict");
      check(keptVerdict.status === "rejected" && keptVerdict.code === "DISCARDED", JSON.stringify(keptVerdict));
      await waitLive(ta, "users", (rows) => rows.map((x) => x.id).join() === "a1", "the discarded row is gone");
      const again = await ta2.evaluate((m) => db.discard(m).then(() => "ok", (e) => e.code), kept.value.mutation);
      check(again === "NOT_PENDING", `discarding twice: ${again}`);
      await a.setOffline(false);
      await waitFor(ta, () => window.events.rejected.some((e) => e.serverCode !== "DISCARDED"), null, "the rejected event");
      const rejected = (await ta.evaluate(() => window.events.rejected)).find((e) => e.serverCode !== "DISCARDED");
      check(rejected.code === "REJECTED" && /UNIQUE/i.test(rejected.reason) && rejected.mutation === refused, `rejected: ${JSON.stringify(rejected)}`);
      check(JSON.stringify(rejected.undone) === JSON.stringify([{ table: "users", key: "a1" }]), `undone: ${JSON.stringify(rejected.undone)}`);
      const verdict = await withTimeout(ta.evaluate((m) => window.settled[m], refused), "A's verdict");
      check(
        verdict.status === "rejected" && verdict.code === rejected.serverCode && verdict.reason === rejected.reason && JSON.stringify(verdict.undone) === JSON.stringify(rejected.undone),
        `A's write settled as refused: ${JSON.stringify(verdict)}`,
      );
      await waitLive(ta, "users", (rows) => JSON.stringify(rows) === JSON.stringify([{ id: "b1", pending: 0 }]), "A's row rolled back, B's row there, confirmed");
      const status = await withTimeout(ta.evaluate(() => db.sync()), "A synced");
      check(status.pending === 0, JSON.stringify(status));
      // After a reload the verdict is still there; an unknown write is named as such.
      await withTimeout(ta2.reload(), "reload");
      const later = await withTimeout(
        ta2.evaluate(async (m) => {
          const db = await Hearth.open({ name: "users" });
          const unknown = await db.settled(1e9).then(() => "ok", (e) => e.code);
          const bad = await db.settled("x").then(() => "ok", (e) => e.code);
          return { verdict: await db.settled(m), unknown, bad, pending: await db.pending() };
        }, refused),
        "settled after a reload",
      );
      check(JSON.stringify(later.verdict) === JSON.stringify(verdict), `after a reload: ${JSON.stringify(later)}`);
      check(later.unknown === "UNKNOWN_MUTATION" && later.bad === "INVALID_ARGUMENT" && later.pending.length === 0, JSON.stringify(later));
    });

    // --- Values cross the JS boundary exactly; reads never open a transaction. ---
    await test("values cross JS -> worker -> server -> another device exactly; bad ones are refused up front", async () => {
      const dir = await mkdtemp(path.join(os.tmpdir(), "hearth-e2e-schema-"));
      const schema = path.join(dir, "vals.toml");
      await writeFile(schema, `version = 1\n[tables.vals]\ncreate = "CREATE TABLE vals (id TEXT PRIMARY KEY, v)"\n`);
      const vals = await startServer({ schema });
      cleanups.push(() => vals.cleanup(), () => rm(dir, { recursive: true, force: true }));
      const a = await newDevice(browser, vals.origin);
      const b = await newDevice(browser, vals.origin);
      cleanups.push(() => a.close(), () => b.close());
      const ta = await openTab(a, vals.origin, "vals");
      const tb = await openTab(b, vals.origin, "vals");
      // Written and compared inside the pages: values playwright could not carry as they are.
      const cases = () => [
        ["i64_min", -(2n ** 63n)],
        ["i64_max", 2n ** 63n - 1n],
        ["safe_max", 2 ** 53 - 1],
        ["beyond_safe", 2n ** 53n + 1n],
        ["neg_zero", -0],
        ["sum", 0.1 + 0.2],
        ["inf", Infinity],
        ["neg_inf", -Infinity],
        ["max", Number.MAX_VALUE],
        ["subnormal", 5e-324],
        ["big_real", 1e20],
        ["text", "nul \u0000 inside, \u00e9, \u{1F980}"],
        ["empty", ""],
        ["blob", new Uint8Array([0, 255, 1, 254, 128])],
        ["null", null],
      ];
      const same = (x, y) =>
        x instanceof Uint8Array && y instanceof Uint8Array
          ? x.length === y.length && x.every((v, i) => v === y[i])
          : typeof x === typeof y && Object.is(x, y);
      const write = await ta.evaluate(async (cases) => {
        const list = eval(cases)();
        for (const [id, v] of list) await db.exec("INSERT INTO vals (id, v) VALUES (?, ?)", [id, v]);
        const refused = [];
        for (const bad of ["\uD800 lone surrogate", 2n ** 63n, -(2n ** 63n) - 1n, { an: "object" }]) {
          refused.push(await db.exec("INSERT INTO vals (id, v) VALUES ('bad', ?)", [bad]).then(() => "ok", (e) => e.code));
        }
        refused.push(await db.query("BEGIN").then(() => "ok", (e) => e.code));
        refused.push(await db.query("PRAGMA foreign_keys = OFF").then(() => "ok", (e) => e.code));
        refused.push(await db.exec("ATTACH 'x' AS x").then(() => "ok", (e) => e.code));
        await db.exec("INSERT INTO vals (id, v) VALUES ('after-begin', 1)");
        await db.sync();
        return { refused };
      }, cases.toString());
      check(write.refused.every((c) => c === "INVALID_ARGUMENT" || c === "SQL_ERROR") && write.refused.slice(0, 4).every((c) => c === "INVALID_ARGUMENT"), `bad values and SQL: ${JSON.stringify(write.refused)}`);
      const mismatches = await tb.evaluate(async ([cases, same]) => {
        await db.sync();
        const list = eval(cases)();
        const eq = eval(same);
        const rows = await db.query("SELECT id, v FROM vals");
        const got = new Map(rows.map((r) => [r.id, r.v]));
        const bad = [];
        for (const [id, v] of list) {
          const want = typeof v === "bigint" && v >= -(2n ** 53n) + 1n && v <= 2n ** 53n - 1n ? Number(v) : v;
          if (!eq(got.get(id), want)) bad.push(`${id}: got ${String(got.get(id))} (${typeof got.get(id)}), want ${String(want)} (${typeof want})`);
        }
        if (got.get("after-begin") !== 1) bad.push("the write after query('BEGIN') is missing");
        if (got.has("bad")) bad.push("a refused value was stored");
        return bad;
      }, [cases.toString(), same.toString()]);
      check(mismatches.length === 0, mismatches.join("; "));
    });

    // --- Schema changes: the server is restarted on a newer schema while tabs stay open. ---
    await test("schema changes: open tabs see a new column, keep a write made under the old schema, a live query on a dropped column gets its error; a server behind the device shows schemaAhead", async () => {
      const dir = await mkdtemp(path.join(os.tmpdir(), "hearth-e2e-schema-"));
      const schema = path.join(dir, "notes.toml");
      const table = (columns) => `[tables.notes]\ncreate = "CREATE TABLE notes (id TEXT PRIMARY KEY, title TEXT NOT NULL${columns})"\n`;
      await writeFile(schema, `version = 1\n${table(", body TEXT")}`);
      let srv = await startServer({ schema });
      const older = await mkdtemp(path.join(os.tmpdir(), "hearth-e2e-older-"));
      const data = srv.data;
      cleanups.push(
        () => srv.cleanup(),
        () => rm(data, { recursive: true, force: true }),
        () => rm(dir, { recursive: true, force: true }),
        () => rm(older, { recursive: true, force: true }),
      );
      const a = await newDevice(browser, srv.origin);
      const b = await newDevice(browser, srv.origin);
      cleanups.push(() => a.close(), () => b.close());
      const one = await openTab(a, srv.origin, "notes");
      const two = await openTab(a, srv.origin, "notes");
      let r = await call(one, "exec", "INSERT INTO notes VALUES ('n1', 'first', 'one')");
      check(r.ok, JSON.stringify(r));
      await withTimeout(one.evaluate(() => db.sync({ timeoutMs: 20000 })), "synced under version 1", 25000);
      await startLive(one, "all", "SELECT * FROM notes ORDER BY id");
      await one.evaluate(() => {
        window.bodyErrors = [];
        db.live("SELECT id, body FROM notes", [], () => {}, (e) => window.bodyErrors.push({ code: e.code, message: e.message }));
      });
      // The server goes down; another tab writes under version 1.
      await srv.stop();
      r = await call(two, "exec", "INSERT INTO notes (id, title, body) VALUES ('n2', 'second', 'two')");
      check(r.ok, JSON.stringify(r));
      // Version 2 adds a column with a default: both tabs see it, the write made under
      // version 1 goes through.
      await writeFile(schema, `version = 2\n${table(", body TEXT, done INTEGER NOT NULL DEFAULT 0")}`);
      srv = await startServer({ schema, data, listen: srv.addr });
      await waitLive(
        one,
        "all",
        (rows) => JSON.stringify(rows) === JSON.stringify([{ id: "n1", title: "first", body: "one", done: 0 }, { id: "n2", title: "second", body: "two", done: 0 }]),
        "the open tab's live query shows the new column",
        30000,
      );
      const synced = await withTimeout(two.evaluate(() => db.sync({ timeoutMs: 20000 })), "synced under version 2", 25000);
      check(synced.pending === 0 && synced.schemaVersion === 2 && synced.schemaAhead === false, JSON.stringify(synced));
      r = await call(two, "exec", "UPDATE notes SET done = 1 WHERE id = 'n2'");
      check(r.ok && r.value.rowsAffected === 1, JSON.stringify(r));
      await withTimeout(two.evaluate(() => db.sync({ timeoutMs: 20000 })), "the new column synced", 25000);
      const other = await openTab(b, srv.origin, "notes");
      await withTimeout(other.evaluate(() => db.sync({ timeoutMs: 20000 })), "a fresh device synced", 25000);
      const seen = await call(other, "query", "SELECT id, done FROM notes ORDER BY id");
      check(JSON.stringify(seen.value) === JSON.stringify([{ id: "n1", done: 0 }, { id: "n2", done: 1 }]), `another device: ${JSON.stringify(seen)}`);
      // Version 3 drops `body`: the live query reading it gets its error callback, the
      // other one its new rows, and the tabs keep writing.
      await srv.stop();
      await writeFile(schema, `version = 3\n${table(", done INTEGER NOT NULL DEFAULT 0")}`);
      srv = await startServer({ schema, data, listen: srv.addr });
      await waitFor(one, () => window.bodyErrors.length > 0, null, "the live query on the dropped column gets its error", 30000);
      const error = (await one.evaluate(() => window.bodyErrors))[0];
      check(error.code === "SQL_ERROR" && /body/.test(error.message), `the live query's error: ${JSON.stringify(error)}`);
      await waitLive(one, "all", (rows) => rows.length === 2 && rows.every((row) => !("body" in row)), "the live query shows the column gone", 30000);
      r = await call(two, "exec", "INSERT INTO notes (id, title) VALUES ('n3', 'third')");
      check(r.ok, JSON.stringify(r));
      const three = await withTimeout(two.evaluate(() => db.sync({ timeoutMs: 20000 })), "synced under version 3", 25000);
      check(three.pending === 0 && three.schemaVersion === 3, JSON.stringify(three));
      // A server still at version 1 (a deploy that went back) gets nothing from this
      // device: every tab sees schemaAhead, writes wait; the right server takes them.
      await srv.stop();
      await writeFile(path.join(older, "v1.toml"), `version = 1\n${table(", body TEXT")}`);
      const behind = await startServer({ schema: path.join(older, "v1.toml"), data: older, listen: srv.addr });
      cleanups.push(() => behind.stop());
      await waitFor(two, () => db.status().schemaAhead === true, null, "status.schemaAhead", 30000);
      r = await call(one, "exec", "UPDATE notes SET title = 'waits' WHERE id = 'n3'");
      check(r.ok, JSON.stringify(r));
      check((await one.evaluate(() => db.status().pending)) === 1, "the write waits");
      await behind.stop();
      srv = await startServer({ schema, data, listen: srv.addr });
      const back = await withTimeout(one.evaluate(() => db.sync({ timeoutMs: 30000 })), "synced with the right server", 35000);
      check(back.pending === 0 && back.schemaAhead === false, JSON.stringify(back));
    });

    // --- Stream subscriptions (selective sync): each device holds only what it subscribed to. ---
    // One server with a streams schema for the tests below; W writes, A and B subscribe.
    const streamsDir = await mkdtemp(path.join(os.tmpdir(), "hearth-e2e-streams-"));
    cleanups.push(() => rm(streamsDir, { recursive: true, force: true }));
    const streamsSchema = path.join(streamsDir, "streams.toml");
    await writeFile(
      streamsSchema,
      `version = 1
[tables.lists]
create = "CREATE TABLE lists (id TEXT PRIMARY KEY, name TEXT NOT NULL)"
[tables.todos]
create = "CREATE TABLE todos (id TEXT PRIMARY KEY, list_id TEXT NOT NULL, title TEXT NOT NULL)"
[streams.list_todos]
table = "todos"
where = "list_id = :list"
`,
    );
    let streams, tabW;
    const todosOf = (tab) => call(tab, "query", "SELECT id, list_id, title FROM todos ORDER BY id").then((r) => (check(r.ok, JSON.stringify(r)), r.value));
    // `db.subscribe` in the tab, kept as window.subs[key]; returns {ok, id, progress} or {ok: false, code, message}.
    const subscribe = (tab, key, stream, params) =>
      withTimeout(
        tab.evaluate(
          async ([key, stream, params]) => {
            window.subs = window.subs || {};
            const progress = [];
            try {
              const pending = db.subscribe(stream, params, { onProgress: (p) => progress.push(p) });
              const sub = await pending;
              window.subs[key] = sub;
              return { ok: true, id: sub.id, stream: sub.stream, params: sub.params, progress };
            } catch (error) {
              return { ok: false, code: error.code, message: error.message, isError: error instanceof Error };
            }
          },
          [key, stream, params],
        ),
        `subscribe(${stream}, ${JSON.stringify(params)})`,
      );
    const unsubscribe = (tab, key) => withTimeout(tab.evaluate((key) => window.subs[key].unsubscribe(), key), `unsubscribe ${key}`);
    const subscriptionsOf = (tab) => withTimeout(tab.evaluate(() => db.subscriptions()), "subscriptions()");
    const poll = async (fn, ok, what, ms = 10_000) => {
      const end = Date.now() + ms;
      for (;;) {
        const value = await fn();
        if (ok(value)) return value;
        if (Date.now() > end) throw new Error(`timed out: ${what}: last ${JSON.stringify(value)}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };

    await test("subscriptions: two devices subscribed to different lists hold only theirs; a row moved between lists moves between devices; unsubscribe evicts", async () => {
      streams = await startServer({ schema: streamsSchema });
      cleanups.push(() => streams.cleanup());
      const [w, a, b] = [await newDevice(browser), await newDevice(browser), await newDevice(browser)];
      cleanups.push(() => w.close(), () => a.close(), () => b.close());
      [tabW] = [await openTab(w, streams.origin, "streams")];
      const tabA = await openTab(a, streams.origin, "streams");
      const tabB = await openTab(b, streams.origin, "streams");
      const [g, k] = [uid("groceries"), uid("work")];
      for (const [id, list, title] of [["t1", g, "milk"], ["t2", g, "eggs"], ["t3", k, "report"]]) {
        const r = await call(tabW, "exec", "INSERT INTO todos (id, list_id, title) VALUES (?, ?, ?)", [`${g}-${id}`, list, title]);
        check(r.ok, JSON.stringify(r));
      }
      await withTimeout(tabW.evaluate(() => db.sync()), "W synced");
      // W subscribed to nothing: once its writes are acknowledged, they leave it too.
      await poll(() => todosOf(tabW), (rows) => rows.length === 0, "W holds no todos");
      // W follows both lists, so it can move a row from one to the other.
      for (const [key, list] of [["wg", g], ["wk", k]]) {
        const s = await subscribe(tabW, key, "list_todos", { list });
        check(s.ok, JSON.stringify(s));
      }
      check((await todosOf(tabW)).length === 3, "W holds both lists");
      await startLive(tabA, "todos", "SELECT id, list_id FROM todos ORDER BY id");
      await waitLive(tabA, "todos", (rows) => rows.length === 0, "A's first live result");
      // Resolves once the rows are in A's database: read at once, no waiting.
      const subA = await subscribe(tabA, "g", "list_todos", { list: g });
      check(subA.ok && typeof subA.id === "string" && subA.stream === "list_todos" && subA.params.list === g, JSON.stringify(subA));
      check(subA.progress.some((p) => p.done === true && p.rows === 2), `A's progress: ${JSON.stringify(subA.progress)}`);
      let rows = await todosOf(tabA);
      check(rows.map((r) => r.title).join() === "milk,eggs", `A holds its list: ${JSON.stringify(rows)}`);
      await waitLive(tabA, "todos", (rows) => rows.length === 2, "A's live query sees the load");
      const subB = await subscribe(tabB, "k", "list_todos", { list: k });
      check(subB.ok && subB.id !== subA.id, JSON.stringify(subB));
      rows = await todosOf(tabB);
      check(rows.map((r) => r.title).join() === "report", `B holds its list: ${JSON.stringify(rows)}`);
      const subs = await subscriptionsOf(tabA);
      check(
        subs.length === 1 && subs[0].id === subA.id && subs[0].stream === "list_todos" && subs[0].params.list === g && subs[0].loaded === true && subs[0].rows === 2 && subs[0].tabs === 1,
        `A's subscriptions: ${JSON.stringify(subs)}`,
      );
      // A row moves from A's list to B's: it leaves A and arrives, whole, on B.
      await startLive(tabB, "todos", "SELECT id, list_id, title FROM todos ORDER BY id");
      const r = await call(tabW, "exec", "UPDATE todos SET list_id = ? WHERE id = ?", [k, `${g}-t1`]);
      check(r.ok, JSON.stringify(r));
      await waitLive(tabA, "todos", (rows) => rows.length === 1 && rows[0].id.endsWith("-t2"), "t1 leaves A");
      await waitLive(tabB, "todos", (rows) => rows.length === 2 && rows.some((x) => x.id.endsWith("-t1") && x.title === "milk"), "t1 arrives on B, whole");
      // Unsubscribing evicts A's rows (locally: nothing is deleted on the server).
      await unsubscribe(tabA, "g");
      rows = await todosOf(tabA);
      check(rows.length === 0, `A after unsubscribe: ${JSON.stringify(rows)}`);
      await waitLive(tabA, "todos", (rows) => rows.length === 0, "A's live query sees the eviction");
      check((await subscriptionsOf(tabA)).length === 0, "A has no subscriptions left");
      check((await tabA.evaluate(() => db.status().pending)) === 0, "the eviction queued no write");
      await call(tabW, "exec", "INSERT INTO todos (id, list_id, title) VALUES (?, ?, ?)", [`${g}-t4`, g, "bread"]);
      await withTimeout(tabW.evaluate(() => db.sync()), "W synced");
      await withTimeout(tabB.evaluate(() => db.sync()), "B synced");
      await withTimeout(tabA.evaluate(() => db.sync()), "A synced");
      check((await todosOf(tabA)).length === 0, "A no longer receives its old list");
      check((await todosOf(tabB)).map((x) => x.title).join() === "milk,report", "B has only its list");
    });

    await test("subscriptions: two tabs of one device share one; closing one keeps it; the last unsubscribe evicts; bad streams and params reject with INVALID_ARGUMENT", async () => {
      check(streams && tabW, "needs the server of the previous test");
      const c = await newDevice(browser);
      cleanups.push(() => c.close());
      const tab1 = await openTab(c, streams.origin, "streams");
      const tab2 = await openTab(c, streams.origin, "streams");
      const list = uid("shared");
      await call(tabW, "exec", "INSERT INTO todos (id, list_id, title) VALUES (?, ?, ?)", [`${list}-1`, list, "one"]);
      await withTimeout(tabW.evaluate(() => db.sync()), "W synced");
      const s1 = await subscribe(tab1, "s", "list_todos", { list });
      check(s1.ok, JSON.stringify(s1));
      // Already loaded: tab 2 gets the same subscription, at once.
      const s2 = await subscribe(tab2, "s", "list_todos", { list });
      check(s2.ok && s2.id === s1.id, `the same id in both tabs: ${JSON.stringify([s1, s2])}`);
      let subs = await subscriptionsOf(tab2);
      check(subs.length === 1 && subs[0].tabs === 2 && subs[0].loaded, `one subscription, two tabs: ${JSON.stringify(subs)}`);
      await startLive(tab2, "todos", "SELECT title FROM todos ORDER BY id");
      await waitLive(tab2, "todos", (rows) => rows.map((x) => x.title).join() === "one", "tab 2 sees the row");
      await tab1.close();
      subs = await poll(() => subscriptionsOf(tab2), (subs) => subs.length === 1 && subs[0].tabs === 1, "tab 1's hold released");
      // Still subscribed at the server: a new row of the list arrives.
      await call(tabW, "exec", "INSERT INTO todos (id, list_id, title) VALUES (?, ?, ?)", [`${list}-2`, list, "two"]);
      await waitLive(tab2, "todos", (rows) => rows.map((x) => x.title).join() === "one,two", "tab 2 still receives the list");
      await unsubscribe(tab2, "s");
      check((await todosOf(tab2)).length === 0, "the last unsubscribe evicts");
      check((await subscriptionsOf(tab2)).length === 0, "no subscription left");
      const bad = await tab2.evaluate(async () => {
        const codes = [];
        for (const [stream, params] of [
          ["no_such_stream", { list: "x" }],
          ["list_todos", {}],
          ["list_todos", { list: "x", extra: 1 }],
          ["list_todos", { list: { an: "object" } }],
          ["list_todos", "not an object"],
          [42, { list: "x" }],
        ]) {
          codes.push(await db.subscribe(stream, params).then(() => "resolved", (e) => (e instanceof Error ? e.code : `not an Error: ${e}`)));
        }
        return { codes, subs: (await db.subscriptions()).length };
      });
      check(bad.codes.every((c) => c === "INVALID_ARGUMENT") && bad.subs === 0, `bad subscriptions: ${JSON.stringify(bad)}`);
    });

    // --- The demo app. ---
    await test("demo app: a todo added in one tab shows in another; after one load, the app opens with the server down, with its data", async () => {
      const demo = await startServer();
      cleanups.push(() => demo.cleanup());
      const device = await browser.newContext();
      cleanups.push(() => device.close());
      const open = async () => {
        const page = await device.newPage();
        page.on("pageerror", (error) => console.error(`  [demo error] ${error.message}`));
        await page.goto(demo.origin + "/");
        await waitFor(page, () => window.db && document.querySelector("#sync.online"), null, "demo online");
        return page;
      };
      const one = await open();
      const two = await open();
      await one.fill("#new-list-name", "Groceries");
      await one.press("#new-list-name", "Enter");
      await waitFor(one, () => !document.querySelector("#new-todo-title").disabled, null, "list selected");
      await one.fill("#new-todo-title", "Oat milk");
      await one.press("#new-todo-title", "Enter");
      await waitFor(two, () => [...document.querySelectorAll(".todo .title")].some((t) => t.textContent === "Oat milk"), null, "todo in tab 2");
      await two.click(".todo input[type=checkbox]");
      await waitFor(one, () => document.querySelector(".todo.done"), null, "tick shows in tab 1");
      // Hearth's files are content-hashed and immutable; the entry points that name them
      // are revalidated on each load.
      const hashed = (await clientAssets(demo.origin)).filter((f) => f.startsWith("/pkg/"));
      for (const [file, cache] of [["/hearth.js", "no-cache"], ["/hearth-sw.js", "no-cache"], [hashed[0], "public, max-age=31536000, immutable"]]) {
        const got = (await fetch(demo.origin + file)).headers.get("cache-control");
        check(got === cache, `${file}: cache-control ${got}, expected ${cache}`);
      }
      // One load is enough: hearth-sw.js (registered by the demo) keeps Hearth's files at
      // install and the page's own, which hearth.js hands it.
      await waitFor(
        one,
        (urls) => caches.open("hearth").then((cache) => Promise.all(urls.map((u) => cache.match(u)))).then((hits) => hits.every(Boolean)),
        ["/", "/app.js", "/app.css", "/hearth.js", ...hashed],
        "the service worker cached the first load",
      );
      await demo.stop();
      await waitFor(one, () => document.querySelector("#sync.offline"), null, "offline shown");
      await one.reload();
      await waitFor(one, () => [...document.querySelectorAll(".todo .title")].some((t) => t.textContent === "Oat milk"), null, "app and data with the server down");
      await one.fill("#new-todo-title", "Bread");
      await one.press("#new-todo-title", "Enter");
      await waitFor(one, () => document.querySelector("#pending:not([hidden])")?.textContent === "1 pending", null, "pending count shown");
      await waitFor(
        one,
        () => [...document.querySelectorAll(".todo.unconfirmed .title")].map((t) => t.textContent).join() === "Bread",
        null,
        "only the unconfirmed todo marked",
      );
    });

    await test("demo app: notes typed on one device show letter by letter on another; a due-date conflict is a banner on both, and a click resolves it", async () => {
      const demo = await startServer();
      cleanups.push(() => demo.cleanup());
      const x = await browser.newContext();
      const y = await browser.newContext();
      cleanups.push(() => x.close(), () => y.close());
      await demoFromWebDir(x);
      await demoFromWebDir(y);
      const open = async (device) => {
        const page = await device.newPage();
        page.on("pageerror", (error) => console.error(`  [demo error] ${error.message}`));
        await page.goto(demo.origin + "/");
        await waitFor(page, () => window.db && document.querySelector("#sync.online"), null, "demo online");
        return page;
      };
      const px = await open(x);
      const py = await open(y);
      await px.fill("#new-list-name", "Trip");
      await px.press("#new-list-name", "Enter");
      await waitFor(px, () => !document.querySelector("#new-todo-title").disabled, null, "list selected");
      await px.fill("#new-todo-title", "Book the cabin");
      await px.press("#new-todo-title", "Enter");
      for (const page of [px, py]) {
        await waitFor(page, () => document.querySelector(".todo .title")?.textContent === "Book the cabin", null, "the todo on both");
        await page.click(".todo .icon.open");
        await waitFor(page, () => document.querySelector("#detail").open, null, "the detail dialog");
      }
      // Typed key by key: each input event is one db.editText.
      await px.click("#detail-notes");
      await px.keyboard.type("Hi 🦀!");
      await waitFor(py, () => document.querySelector("#detail-notes").value === "Hi 🦀!", null, "X's notes on Y");
      await py.click("#detail-notes");
      await py.keyboard.press("End");
      await py.keyboard.type(" ok");
      await waitFor(px, () => document.querySelector("#detail-notes").value === "Hi 🦀! ok", null, "Y's notes on X");
      await px.click("#detail-like");
      await py.click("#detail-like");
      await waitFor(px, () => document.querySelector("#detail-like").textContent === "♥ 2", null, "both likes counted on X");
      await waitFor(py, () => document.querySelector("#detail-like").textContent === "♥ 2", null, "both likes counted on Y");
      // Both devices change the due date offline: a conflict for a person to resolve.
      await x.setOffline(true);
      await y.setOffline(true);
      await waitFor(px, () => document.querySelector("#sync.offline"), null, "X offline");
      await waitFor(py, () => document.querySelector("#sync.offline"), null, "Y offline");
      await px.fill("#detail-due", "2026-07-03");
      await py.fill("#detail-due", "2026-07-10");
      await waitFor(px, () => db.status().pending > 0, null, "X's due date queued");
      await waitFor(py, () => db.status().pending > 0, null, "Y's due date queued");
      await x.setOffline(false);
      await withTimeout(px.evaluate(() => db.sync({ timeoutMs: 20000 })), "X synced", 25000);
      await y.setOffline(false);
      for (const page of [px, py]) {
        const choices = () => [...document.querySelectorAll("#detail-conflicts .choice")].map((b) => b.textContent).sort().join();
        await waitFor(page, `(${choices})() === "2026-07-03,2026-07-10,Set"`, null, "the banner with both dates").catch(async (error) => {
          const seen = await page.evaluate(async (choices) => ({ choices: eval(choices)(), conflicts: await db.query("SELECT * FROM hearth_conflicts"), todo: await db.query("SELECT due FROM todos"), status: db.status() }), choices.toString());
          throw new Error(`${error.message}: ${JSON.stringify(seen)}`);
        });
      }
      await py.click("#detail-conflicts .choice:has-text('2026-07-10')");
      for (const page of [px, py]) {
        await waitFor(page, () => !document.querySelector(".conflict") && document.querySelector("#detail-due").value === "2026-07-10", null, "the conflict gone, the date chosen").catch(async (error) => {
          const seen = await page.evaluate(async () => ({ banners: document.querySelectorAll(".conflict").length, input: document.querySelector("#detail-due").value, conflicts: await db.query("SELECT * FROM hearth_conflicts"), todo: await db.query("SELECT due FROM todos") }));
          throw new Error(`${error.message}: ${JSON.stringify(seen)}`);
        });
      }
    });

    // --- Rooms and presence: ephemeral, server-decided. ---
    // Joins room `name` in the tab as `who`; the room's latest member list and messages
    // collect in window.rooms[name].
    const joinRoom = (page, name, who) =>
      withTimeout(
        page.evaluate(
          async ([name, who]) => {
            window.rooms = window.rooms || {};
            const room = db.room(name);
            const seen = (window.rooms[name] = { room, members: [], messages: [], errors: [] });
            room.on("presence", (members) => (seen.members = members));
            room.on("message", (message, from) => seen.messages.push({ message, from }));
            room.on("error", (error) => seen.errors.push(error.code));
            await room.setPresence({ name: who });
          },
          [name, who],
        ),
        `join ${name} as ${who}`,
      );
    const namesIn = (page, room) =>
      page.evaluate((room) => (window.rooms?.[room]?.members || []).map((m) => m.state.name).sort(), room);
    const waitNames = (page, room, names, what, ms) =>
      waitFor(
        page,
        ([room, names]) => JSON.stringify((window.rooms?.[room]?.members || []).map((m) => m.state.name).sort()) === JSON.stringify(names),
        [room, [...names].sort()],
        what,
        ms,
      );

    await test("presence: another device appears with its state, tabs are members of their own, broadcasts arrive latest last, bounds are refused by code", async () => {
      const room = uid("doc");
      const ann = await newDevice(browser, server.origin);
      const bob = await newDevice(browser, server.origin);
      cleanups.push(() => ann.close(), () => bob.close());
      const a1 = await openTab(ann, server.origin);
      const a2 = await openTab(ann, server.origin);
      const b1 = await openTab(bob, server.origin);
      await joinRoom(a1, room, "ann");
      await joinRoom(b1, room, "bob");
      await joinRoom(a2, room, "ann (tab 2)");
      for (const page of [a1, a2, b1]) await waitNames(page, room, ["ann", "ann (tab 2)", "bob"], "three members everywhere");
      const seenByBob = await b1.evaluate((room) => window.rooms[room].members, room);
      const annSeen = seenByBob.find((m) => m.state.name === "ann");
      const bobSelf = seenByBob.find((m) => m.state.name === "bob");
      check(bobSelf.me && !annSeen.me, `me marks only the tab itself: ${JSON.stringify(seenByBob)}`);
      check(typeof annSeen.clientId === "string" && /^\d+$/.test(annSeen.clientId) && typeof annSeen.tab === "number", `ids: ${JSON.stringify(annSeen)}`);
      check(Math.abs(Date.now() - annSeen.since) < 60_000, `since is when it joined: ${annSeen.since}`);
      const annTabs = seenByBob.filter((m) => m.clientId === annSeen.clientId);
      check(annTabs.length === 2 && annTabs[0].tab !== annTabs[1].tab, `one device, two tabs: ${JSON.stringify(annTabs)}`);
      // A state change shows on the other device.
      await a1.evaluate(([room]) => window.rooms[room].room.setPresence({ name: "ann", cursor: [3, 4] }), [room]);
      await waitFor(b1, ([room]) => window.rooms[room].members.some((m) => m.state.cursor?.[1] === 4), [room], "ann's cursor on bob");
      // A cursor stream: 200 sends in a burst arrive coalesced, the last one last, at the
      // other device and the sender's other tab, never back at the sender.
      await a1.evaluate(async ([room]) => {
        for (let i = 0; i < 200; i++) window.rooms[room].room.send({ x: i });
        await window.rooms[room].room.send({ x: 199, last: true });
      }, [room]);
      for (const page of [b1, a2]) {
        await waitFor(page, ([room]) => window.rooms[room].messages.at(-1)?.message.last === true, [room], "the last message");
        const got = await page.evaluate(([room]) => window.rooms[room].messages, [room]);
        check(got.length < 50, `coalesced: ${got.length} of 201 relayed`);
        check(got.every((m) => m.from.clientId === annSeen.clientId), "from ann");
      }
      check((await a1.evaluate(([room]) => window.rooms[room].messages.length, [room])) === 0, "the sender hears nothing back");
      // Bounds: a clear error with a stable code, and the tab stays in its room.
      const refused = await a1.evaluate(async (room) => {
        const codes = [];
        for (const [name, state] of [["x".repeat(200), {}], ["", {}], [room, { big: "y".repeat(5000) }]]) {
          try {
            await db.room(name).setPresence(state);
            codes.push("ok");
          } catch (error) {
            codes.push(error.code);
          }
        }
        try {
          await db.room(room + "-not-joined").send({});
        } catch (error) {
          codes.push(error.code);
        }
        return codes;
      }, room);
      check(JSON.stringify(refused) === JSON.stringify(["BAD_ROOM", "BAD_ROOM", "PRESENCE_TOO_LARGE", "NOT_IN_ROOM"]), `codes: ${JSON.stringify(refused)}`);
      check((await namesIn(b1, room)).length === 3, "still three members");
      // leave() is seen by the others.
      await a2.evaluate(([room]) => window.rooms[room].room.leave(), [room]);
      await waitNames(b1, room, ["ann", "bob"], "ann's second tab left");
    });

    await test("presence: a closed tab, and a device whose browser context dies, leave within 5 s; the server's socket drop rejoins without duplicates", async () => {
      const room = uid("doc");
      const ann = await newDevice(browser, server.origin);
      const bob = await newDevice(browser, server.origin);
      const cat = await newDevice(browser, server.origin);
      cleanups.push(() => ann.close(), () => bob.close(), () => cat.close().catch(() => {}));
      const a1 = await openTab(ann, server.origin);
      const a2 = await openTab(ann, server.origin);
      const b1 = await openTab(bob, server.origin);
      const c1 = await openTab(cat, server.origin);
      for (const [page, who] of [[a1, "ann"], [a2, "ann 2"], [b1, "bob"], [c1, "cat"]]) await joinRoom(page, room, who);
      await waitNames(b1, room, ["ann", "ann 2", "bob", "cat"], "four members");
      // A tab that closes: its device's other tab stays.
      let started = performance.now();
      await a2.close();
      await waitNames(b1, room, ["ann", "bob", "cat"], "the closed tab gone", 5000);
      const tabGone = performance.now() - started;
      // A device whose browser context dies (its SharedWorker and socket with it).
      started = performance.now();
      await cat.close();
      await waitNames(b1, room, ["ann", "bob"], "the dead device gone", 5000);
      const deviceGone = performance.now() - started;
      console.log(`     a closed tab left in ${Math.round(tabGone)} ms, a closed device in ${Math.round(deviceGone)} ms`);
      check(tabGone < 5000 && deviceGone < 5000, "within 5 s");
      // The server restarts (every socket drops, every room is forgotten): both devices
      // reconnect and rejoin, each member once.
      server = await server.restart();
      await waitFor(a1, () => db.status().online, null, "ann back online", 20000);
      await waitFor(b1, () => db.status().online, null, "bob back online", 20000);
      for (const page of [a1, b1]) await waitNames(page, room, ["ann", "bob"], "rejoined after the restart", 20000);
      // Held for a while (heartbeats keep them), and never doubled.
      await new Promise((resolve) => setTimeout(resolve, 6000));
      for (const page of [a1, b1]) {
        const members = await page.evaluate((room) => window.rooms[room].members, room);
        check(members.length === 2, `still exactly two after 6 s: ${JSON.stringify(members)}`);
      }
      check((await metric(server.origin, "hearth_server_seq")) >= 0, "server up");
    });

    await test("presence: a device whose network vanishes without closing its socket leaves within 5 s", async () => {
      // Dan's device talks to the server through a TCP relay that the test freezes: no
      // byte moves either way and no socket closes, as when a laptop dies or its Wi-Fi
      // drops. Only the server's liveness rule can notice.
      const [host, port] = [server.addr.slice(0, server.addr.lastIndexOf(":")), Number(server.addr.slice(server.addr.lastIndexOf(":") + 1))];
      const pairs = [];
      const relay = net.createServer((down) => {
        const up = net.connect(port, host);
        down.pipe(up);
        up.pipe(down);
        const drop = () => (down.destroy(), up.destroy());
        down.on("error", drop);
        up.on("error", drop);
        pairs.push({ down, up });
      });
      relay.listen(0, "127.0.0.1");
      await once(relay, "listening");
      cleanups.push(async () => {
        for (const { down, up } of pairs) (down.destroy(), up.destroy());
        relay.close();
      });
      const room = uid("doc");
      const bob = await newDevice(browser, server.origin);
      const dan = await newDevice(browser, server.origin);
      cleanups.push(() => bob.close(), () => dan.close());
      const b1 = await openTab(bob, server.origin);
      const d1 = await dan.newPage();
      await withTimeout(d1.goto(`${server.origin}/__hearth_e2e.html`), "page load");
      const relayUrl = `ws://127.0.0.1:${relay.address().port}/sync`;
      await withTimeout(d1.evaluate(async (server) => (window.db = await Hearth.open({ name: "e2e", server })), relayUrl), "open through the relay");
      await joinRoom(b1, room, "bob");
      await joinRoom(d1, room, "dan");
      await waitNames(b1, room, ["bob", "dan"], "dan present through the relay");
      const started = performance.now();
      for (const { down, up } of pairs) {
        down.unpipe(up);
        up.unpipe(down);
        down.pause();
        up.pause();
      }
      await waitNames(b1, room, ["bob"], "dan gone", 5000);
      const gone = performance.now() - started;
      console.log(`     a device whose network vanished left in ${Math.round(gone)} ms`);
      check(gone < 5000, `dan stayed ${gone} ms`);
      // Bob, still heartbeating, is still there.
      await new Promise((resolve) => setTimeout(resolve, 1000));
      check(JSON.stringify(await namesIn(b1, room)) === JSON.stringify(["bob"]), "bob stays");
    });

    await test("permissions: two users see only their lists; sharing brings a list live, unsharing takes it away; a token refreshed while offline keeps pending writes", async () => {
      const secret = "an e2e secret, long enough for HS256 use";
      process.env.HEARTH_E2E_JWT_SECRET = secret;
      const dir = await mkdtemp(path.join(os.tmpdir(), "hearth-e2e-auth-"));
      cleanups.push(() => rm(dir, { recursive: true, force: true }));
      const schema = path.join(dir, "auth.toml");
      const member = "list_id IN (SELECT list_id FROM members WHERE user_id = auth.sub)";
      await writeFile(
        schema,
        `version = 1
[auth]
hs256_secret_env = "HEARTH_E2E_JWT_SECRET"
audience = "hearth"
leeway_s = 0
[tables.lists]
create = "CREATE TABLE lists (id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT NOT NULL DEFAULT '')"
rules = { read = "id IN (SELECT list_id FROM members WHERE user_id = auth.sub)", insert = "owner = auth.sub", update = "owner = auth.sub", delete = "owner = auth.sub" }
[tables.members]
create = "CREATE TABLE members (id TEXT PRIMARY KEY, list_id TEXT NOT NULL, user_id TEXT NOT NULL)"
rules = { read = "${member}", insert = "EXISTS (SELECT 1 FROM lists WHERE lists.id = list_id AND lists.owner = auth.sub)", delete = "EXISTS (SELECT 1 FROM lists WHERE lists.id = list_id AND lists.owner = auth.sub)" }
[tables.todos]
create = "CREATE TABLE todos (id TEXT PRIMARY KEY, list_id TEXT NOT NULL, title TEXT NOT NULL DEFAULT '')"
rules = { read = "${member}", insert = "${member}", update = "${member}", delete = "${member}" }
`,
      );
      const authed = await startServer({ schema });
      cleanups.push(() => authed.cleanup());
      const b64 = (value) => Buffer.from(typeof value === "string" ? value : JSON.stringify(value)).toString("base64url");
      const jwt = (sub, seconds) => {
        const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, aud: "hearth", exp: Math.floor(Date.now() / 1000) + seconds })}`;
        return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
      };
      const openAs = async (device, token) => {
        const page = await device.newPage();
        page.on("pageerror", (error) => console.error(`  [page error] ${error.message}`));
        await withTimeout(page.goto(`${authed.origin}${TEST_PAGE_PATH}`), "page load");
        await withTimeout(
          page.evaluate(async (token) => {
            window.tok = token;
            window.asked = 0;
            window.db = await Hearth.open({ name: "auth", token: () => { window.asked += 1; return window.tok; } });
            window.events = { rejected: [], auth: [] };
            db.on("rejected", (e) => window.events.rejected.push({ code: e.serverCode, reason: e.reason }));
            db.on("auth", (e) => window.events.auth.push({ code: e.code, message: e.message }));
          }, token),
          "Hearth.open with a token",
        );
        return page;
      };
      const [a, b] = [await browser.newContext(), await browser.newContext()];
      cleanups.push(() => a.close(), () => b.close());
      await routeTestPage(a);
      await routeTestPage(b);
      const alice = await openAs(a, jwt("alice", 3600));
      // Bob's first token runs out while the test goes on; the page gives a new one.
      const bobExpiresAt = Date.now() + 12_000;
      const bob = await openAs(b, jwt("bob", 12));
      for (const [tab, who] of [[alice, "alice"], [bob, "bob"]]) {
        const r = await call(
          tab,
          "exec",
          `INSERT INTO lists (id, owner, name) VALUES ('${who}-list', '${who}', '${who}''s');
           INSERT INTO members (id, list_id, user_id) VALUES ('${who}-m', '${who}-list', '${who}');
           INSERT INTO todos (id, list_id, title) VALUES ('${who}-t1', '${who}-list', 'first of ${who}')`,
        );
        check(r.ok, JSON.stringify(r));
        await withTimeout(tab.evaluate(() => db.sync()), `${who} synced`);
      }
      await startLive(alice, "todos", "SELECT id FROM todos ORDER BY id");
      await startLive(bob, "todos", "SELECT id FROM todos ORDER BY id");
      await startLive(bob, "lists", "SELECT id FROM lists ORDER BY id");
      await waitLive(alice, "todos", (rows) => rows.map((r) => r.id).join() === "alice-t1", "alice holds only hers");
      await waitLive(bob, "todos", (rows) => rows.map((r) => r.id).join() === "bob-t1", "bob holds only his");
      // Alice shares her list with bob: it appears on his device, live, whole.
      let r = await call(alice, "exec", "INSERT INTO members (id, list_id, user_id) VALUES ('share', 'alice-list', 'bob')");
      check(r.ok, JSON.stringify(r));
      await waitLive(bob, "todos", (rows) => rows.map((r) => r.id).join() === "alice-t1,bob-t1", "alice's list appears on bob's device");
      await waitLive(bob, "lists", (rows) => rows.map((r) => r.id).join() === "alice-list,bob-list", "with the list row");
      // ... and a todo she adds later arrives live.
      r = await call(alice, "exec", "INSERT INTO todos (id, list_id, title) VALUES ('alice-t2', 'alice-list', 'second')");
      check(r.ok, JSON.stringify(r));
      await waitLive(bob, "todos", (rows) => rows.map((r) => r.id).join() === "alice-t1,alice-t2,bob-t1", "a new todo of the shared list reaches bob");
      // Unsharing takes it away again.
      r = await call(alice, "exec", "DELETE FROM members WHERE id = 'share'");
      check(r.ok, JSON.stringify(r));
      await waitLive(bob, "todos", (rows) => rows.map((r) => r.id).join() === "bob-t1", "the unshared list leaves bob's device");
      await waitLive(bob, "lists", (rows) => rows.map((r) => r.id).join() === "bob-list", "with its list row");
      check((await bob.evaluate(() => window.events.rejected)).length === 0, "nothing of bob's was refused");

      // Bob goes offline and writes; his token expires meanwhile; the page has a new one
      // when the worker asks. The write is never rolled back and reaches the server.
      await b.setOffline(true);
      r = await call(bob, "exec", "INSERT INTO todos (id, list_id, title) VALUES ('bob-t2', 'bob-list', 'written offline')");
      check(r.ok, JSON.stringify(r));
      const wait = bobExpiresAt + 1500 - Date.now();
      if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
      await bob.evaluate((token) => { window.tok = token; }, jwt("bob", 3600));
      await b.setOffline(false);
      await withTimeout(bob.evaluate(() => db.sync()), "bob's pending write goes with the new token");
      const auth = await bob.evaluate(() => window.events.auth);
      check(auth.some((e) => e.code === "AUTH_EXPIRED"), `bob was told his token expired: ${JSON.stringify(auth)}`);
      check((await bob.evaluate(() => window.events.rejected)).length === 0, "the offline write was not refused");
      await waitLive(bob, "todos", (rows) => rows.map((r) => r.id).join() === "bob-t1,bob-t2", "bob's offline write stays");
      // Alice never sees bob's list; a fresh device of alice's has hers only.
      check((await call(alice, "query", "SELECT id FROM todos ORDER BY id")).value.map((x) => x.id).join() === "alice-t1,alice-t2", "alice's device holds hers");
      const a2 = await browser.newContext();
      cleanups.push(() => a2.close());
      await routeTestPage(a2);
      const alice2 = await openAs(a2, jwt("alice", 3600));
      await withTimeout(alice2.evaluate(() => db.sync()), "alice's second device synced");
      check((await call(alice2, "query", "SELECT id FROM todos ORDER BY id")).value.map((x) => x.id).join() === "alice-t1,alice-t2", "a fresh device of alice's holds hers only");
      // Bob's token on alice's device: refused, unless the app asks for a reset.
      const other = await alice2.evaluate(async (token) => {
        try {
          await Hearth.open({ name: "auth", token });
          return "opened";
        } catch (error) {
          return error.code;
        }
      }, jwt("bob", 3600));
      check(other === "AUTH_USER_CHANGED", `another user's token on alice's device: ${other}`);
    });

    await test("demo app: the list shows who else has it open, live", async () => {
      const demo = await startServer();
      cleanups.push(() => demo.cleanup());
      const x = await browser.newContext();
      const y = await browser.newContext();
      cleanups.push(() => x.close(), () => y.close().catch(() => {}));
      await demoFromWebDir(x);
      await demoFromWebDir(y);
      const open = async (device, name) => {
        await device.addInitScript((name) => localStorage.setItem("hearth.name", name), name);
        const page = await device.newPage();
        page.on("pageerror", (error) => console.error(`  [demo error] ${error.message}`));
        await page.goto(demo.origin + "/");
        await waitFor(page, () => window.db && document.querySelector("#sync.online"), null, "demo online");
        return page;
      };
      const px = await open(x, "Xavier");
      await px.fill("#new-list-name", "Shared");
      await px.press("#new-list-name", "Enter");
      await waitFor(px, () => !document.querySelector("#new-todo-title").disabled, null, "list selected");
      const py = await open(y, "Yasmin");
      await py.click("#lists .list:has-text('Shared')");
      await waitFor(px, () => document.querySelector("#present")?.textContent.includes("Yasmin"), null, "Y shown on X");
      await waitFor(py, () => document.querySelector("#present")?.textContent.includes("Xavier"), null, "X shown on Y");
      // Y goes to another list: X no longer shows Y.
      await py.fill("#new-list-name", "Elsewhere");
      await py.press("#new-list-name", "Enter");
      await waitFor(px, () => !document.querySelector("#present")?.textContent.includes("Yasmin"), null, "Y gone from X", 5000);
      await py.click("#lists .list:has-text('Shared')");
      await waitFor(px, () => document.querySelector("#present")?.textContent.includes("Yasmin"), null, "Y back on X");
      await y.close();
      await waitFor(px, () => !document.querySelector("#present")?.textContent.includes("Yasmin"), null, "Y's closed device gone from X", 5000);
    });

    // --- 8. Serving an app: from the sync server, and from another origin. ---
    await test("serve --app: the app's files at /, Hearth's own beside them for any origin, traversal refused; a page on another origin with a copied worker syncs, two tabs on one worker, and opens with the sync server down", async () => {
      const root = await mkdtemp(path.join(os.tmpdir(), "hearth-e2e-app-"));
      cleanups.push(() => rm(root, { recursive: true, force: true }));
      await writeFile(path.join(root, "secret.txt"), "outside the app");
      const appDir = path.join(root, "app");
      await mkdir(path.join(appDir, "css"), { recursive: true });
      await writeFile(path.join(appDir, "index.html"), `<!doctype html><title>my app</title><script src="/hearth.js"></script>`);
      await writeFile(path.join(appDir, "css", "a b.css"), "body { color: teal }");
      await writeFile(path.join(appDir, "hearthstone.txt"), "the app's own");
      const sync = await startServer({ app: appDir });
      cleanups.push(() => sync.cleanup());

      const get = async (url) => {
        const r = await fetch(sync.origin + url, { headers: { origin: "http://elsewhere.test" } });
        return { status: r.status, type: r.headers.get("content-type"), cors: r.headers.get("access-control-allow-origin"), body: await r.text() };
      };
      const index = await get("/");
      check(index.status === 200 && index.body.includes("my app") && index.type.startsWith("text/html") && !index.cors, `/ is the app's index: ${JSON.stringify(index)}`);
      const css = await get("/css/a%20b.css");
      check(css.status === 200 && css.type.startsWith("text/css") && css.body.includes("teal"), `a nested file with a space: ${JSON.stringify(css)}`);
      const named = await get("/hearthstone.txt");
      check(named.status === 200 && named.body === "the app's own" && !named.cors, `an app file named hearth*: ${JSON.stringify(named)}`);
      check((await get("/app.js")).status === 404 && (await get("/nothing.html")).status === 404, "the demo's files are gone, missing files are 404");
      for (const own of ["/hearth.js", "/hearth.mjs", "/hearth-worker.js"]) {
        const r = await get(own);
        check(r.status === 200 && r.type.startsWith("text/javascript") && r.cors === "*", `${own} for any origin: ${JSON.stringify({ ...r, body: undefined })}`);
      }
      const types = await get("/hearth.d.ts");
      check(types.status === 200 && types.body === (await readFile(path.join(repoRoot, "web/hearth.d.ts"), "utf8")), "/hearth.d.ts is web/hearth.d.ts");
      // Raw request paths, as a hostile client sends them (fetch would normalise them).
      const raw = (target) =>
        new Promise((resolve, reject) => {
          http.get({ host: "127.0.0.1", port: Number(sync.addr.split(":").pop()), path: target }, (res) => {
            let body = "";
            res.on("data", (c) => (body += c)).on("end", () => resolve({ status: res.statusCode, body }));
          }).on("error", reject);
        });
      for (const target of ["/../secret.txt", "/%2e%2e/secret.txt", "/css/..%2f..%2fsecret.txt", "/css%5c..%5c..%5csecret.txt"]) {
        const r = await raw(target);
        check(r.status === 400 && !r.body.includes("outside"), `${target} refused: ${JSON.stringify(r)}`);
      }

      // Another origin: a static host with the app's page and its copy of the worker file.
      const siteDir = path.join(root, "site");
      await mkdir(siteDir);
      await writeFile(
        path.join(siteDir, "index.html"),
        `<!doctype html><title>elsewhere</title><script src="${sync.origin}/hearth.js"></script>
<script>navigator.serviceWorker.register("/sw.js")</script>`,
      );
      await writeFile(path.join(siteDir, "hearth-worker.js"), await (await fetch(sync.origin + "/hearth-worker.js")).text());
      // The site's service worker keeps Hearth's files from the sync server's origin too.
      await writeFile(path.join(siteDir, "sw.js"), `self.hearthAssets = "${sync.origin}/";\nimportScripts("${sync.origin}/hearth-sw.js");\n`);
      const site = await startStaticDir(siteDir);
      cleanups.push(() => site.stop());
      check(site.origin !== sync.origin, "two origins");
      const device = await browser.newContext();
      cleanups.push(() => device.close());
      const tab = async () => {
        const page = await device.newPage();
        page.on("pageerror", (error) => console.error(`  [page error] ${error.message}`));
        await withTimeout(page.goto(site.origin + "/"), "cross-origin page load");
        await withTimeout(page.evaluate(async () => (window.db = await Hearth.open({ name: "elsewhere", workerUrl: "/hearth-worker.js" }))), "Hearth.open cross-origin");
        return page;
      };
      const [one, two] = [await tab(), await tab()];
      // A workerUrl the browser could never start is refused up front, with a code.
      const refusals = await withTimeout(
        one.evaluate(async () => {
          const codes = [];
          for (const workerUrl of [undefined, "", 123, {}, "javascript:alert(1)", "data:text/javascript,", "https://elsewhere.example/w.js"]) {
            codes.push(await Hearth.open({ name: "bad", workerUrl }).then(() => "opened", (e) => e.code));
          }
          return codes;
        }),
        "bad workerUrl values",
      );
      check(refusals.every((c) => c === "INVALID_ARGUMENT"), `bad workerUrl values: ${JSON.stringify(refusals)}`);
      const cdp = await browser.newBrowserCDPSession();
      const siteWorkers = async () =>
        (await cdp.send("Target.getTargets")).targetInfos.filter((t) => t.type === "shared_worker" && t.url.startsWith(site.origin));
      const workers = await siteWorkers();
      check(workers.length === 1 && workers[0].url.includes("assets="), `one worker, the site's copy: ${JSON.stringify(workers.map((w) => w.url))}`);
      const list = uid("list");
      await startLive(two, "lists", "SELECT name FROM lists WHERE id = ?", [list]);
      const before = await metric(sync.origin, APPLIED);
      const r = await call(one, "exec", "INSERT INTO lists (id, name) VALUES (?, ?)", [list, "from elsewhere"]);
      check(r.ok, JSON.stringify(r));
      await waitLive(two, "lists", (rows) => rows.length === 1 && rows[0].name === "from elsewhere", "tab 2 sees tab 1's write");
      await withTimeout(one.evaluate(() => db.sync()), "sync with the server on the other origin");
      check((await metric(sync.origin, APPLIED)) === before + 1, "the write reached the sync server");
      // And a device on the sync server's own origin (the app served by --app) gets it.
      const home = await browser.newContext();
      cleanups.push(() => home.close());
      const page = await home.newPage();
      await page.goto(sync.origin + "/");
      await withTimeout(page.evaluate(async () => (window.db = await Hearth.open({ name: "home" }))), "open on the app's own origin");
      await startLive(page, "lists", "SELECT name FROM lists WHERE id = ?", [list]);
      await waitLive(page, "lists", (rows) => rows.length === 1, "the other device gets the write");

      // Offline cold start of the site: its files and Hearth's (from the other origin) come
      // from its service worker's cache, with the sync server down and the tabs closed.
      await waitFor(
        one,
        (urls) => caches.open("hearth").then((cache) => Promise.all(urls.map((u) => cache.match(u)))).then((hits) => hits.every(Boolean)),
        [site.origin + "/", site.origin + "/hearth-worker.js", sync.origin + "/hearth.js", sync.origin + "/hearth-worker.js"],
        "the site's service worker cached the site and Hearth",
      );
      await sync.stop();
      await Promise.all([one.close(), two.close()]);
      // The worker goes with its last tab: the next tab starts it from the cache.
      const gone = Date.now() + 5000;
      while ((await siteWorkers()).length > 0) check(Date.now() < gone, "the site's worker ended within 5 s of its last tab");
      const cold = await tab();
      const row = await call(cold, "query", "SELECT name FROM lists WHERE id = ?", [list]);
      check(row.ok && row.value.length === 1 && row.value[0].name === "from elsewhere", `the site opens with its data, the sync server down: ${JSON.stringify(row)}`);
    });

    await test("React: useLiveQuery shows live rows and updates when another tab writes; useHearthStatus shows online, offline and pending; under the app's own service worker (importScripts hearth-sw.js) it opens with the server down", async () => {
      const appDir = await mkdtemp(path.join(os.tmpdir(), "hearth-e2e-react-"));
      cleanups.push(() => rm(appDir, { recursive: true, force: true }));
      await writeFile(path.join(appDir, "react.mjs"), await reactAsModule());
      // An app as its developer would write it: React from its import map, the hooks and
      // the library from the sync server.
      await writeFile(
        path.join(appDir, "index.html"),
        `<!doctype html><meta charset="utf-8"><title>react app</title>
<script type="importmap">{"imports": {"react": "/react.mjs", "react-dom/client": "/react.mjs"}}</script>
<div id="root"></div>
<script type="module">
import { createElement as h, useEffect, useState } from "react";
import { createRoot } from "react-dom/client";
import { useHearthStatus, useLiveQuery } from "/hearth-react.mjs";
import { open } from "/hearth.mjs";
function Lists({ db }) {
  const { rows, loading } = useLiveQuery(db, "SELECT id, name FROM lists WHERE name LIKE ? ORDER BY name", ["react %"]);
  const status = useHearthStatus(db);
  return h("div", null,
    h("p", { id: "status" }, status ? (status.online ? "online" : "offline") + ", " + status.pending + " pending" : "opening"),
    loading ? h("p", { id: "loading" }, "loading") : h("ul", { id: "rows" }, rows.map((row) => h("li", { key: row.id }, row.name))));
}
function App() {
  const [db, setDb] = useState(null);
  useEffect(() => { open({ name: "react" }).then((db) => { window.db = db; setDb(db); }); }, []);
  return h(Lists, { db });
}
createRoot(document.getElementById("root")).render(h(App));
navigator.serviceWorker.register("/sw.js");
</script>`,
      );
      // The app's own service worker, with Hearth's inside it.
      await writeFile(path.join(appDir, "sw.js"), `importScripts("/hearth-sw.js");\n`);
      const app = await startServer({ app: appDir });
      cleanups.push(() => app.cleanup());
      const device = await browser.newContext();
      cleanups.push(() => device.close());
      const tab = async () => {
        const page = await device.newPage();
        page.on("pageerror", (error) => console.error(`  [react page error] ${error.message}`));
        await page.goto(app.origin + "/");
        await waitFor(page, () => window.db && document.querySelector("#rows"), null, "React app rendered its rows");
        return page;
      };
      const [one, two] = [await tab(), await tab()];
      const shown = (page) => page.evaluate(() => [...document.querySelectorAll("#rows li")].map((li) => li.textContent));
      const statusIs = (page, text, what) =>
        waitFor(page, (text) => document.querySelector("#status")?.textContent === text, text, what).catch(async (error) => {
          const [shown, status] = await page.evaluate(() => [document.querySelector("#status")?.textContent, db.status()]);
          throw new Error(`${error.message}; shows "${shown}", db.status() ${JSON.stringify(status)}`);
        });
      await statusIs(one, "online, 0 pending", "status online");
      check((await shown(one)).length === 0, "no rows at first");
      let r = await call(two, "exec", "INSERT INTO lists (id, name) VALUES (?, ?)", [uid("list"), "react one"]);
      check(r.ok, JSON.stringify(r));
      await waitFor(one, () => [...document.querySelectorAll("#rows li")].some((li) => li.textContent === "react one"), null, "tab 1 shows tab 2's row");
      await statusIs(one, "online, 0 pending", "the write confirmed by the server");
      await device.setOffline(true);
      await statusIs(one, "offline, 0 pending", "status offline");
      r = await call(two, "exec", "INSERT INTO lists (id, name) VALUES (?, ?)", [uid("list"), "react two"]);
      check(r.ok, JSON.stringify(r));
      await statusIs(one, "offline, 1 pending", "one write pending");
      check(JSON.stringify(await shown(one)) === JSON.stringify(["react one", "react two"]), `rows in order: ${await shown(one)}`);
      await device.setOffline(false);
      await statusIs(one, "online, 0 pending", "back online, nothing pending");
      // Offline cold start through the app's service worker: React, the hooks and the page
      // come from its cache, the rows from the device's database.
      await waitFor(
        one,
        (urls) => caches.open("hearth").then((cache) => Promise.all(urls.map((u) => cache.match(u)))).then((hits) => hits.every(Boolean)),
        ["/", "/react.mjs", "/hearth-react.mjs", "/hearth.mjs"],
        "the app's service worker cached the app",
      );
      await app.stop();
      await one.reload();
      await waitFor(one, () => document.querySelectorAll("#rows li").length === 2, null, "the app opens with the server down, with its rows");
      await statusIs(one, "offline, 0 pending", "and says it is offline");
    });
  } finally {
    for (const cleanup of cleanups.reverse()) await cleanup().catch(() => {});
    await browser.close();
  }

  // --- 4. Persistence across a browser crash. ---
  await test("an exec that resolved survives killing the browser; the pending write reaches the server once", async () => {
    const profile = await mkdtemp(path.join(os.tmpdir(), "hearth-e2e-profile-"));
    let own = await startOwnBrowser(profile);
    try {
      let tab = await openTab(own.context, server.origin, "crash");
      await withTimeout(tab.evaluate(() => db.sync()), "first sync");
      const seqBefore = await metric(server.origin, "hearth_server_seq");
      const assets = await snapshotAssets(server.origin);
      await server.stop();
      await waitFor(tab, () => !db.status().online, null, "server gone");
      const list = uid("list");
      const r = await call(tab, "exec", "INSERT INTO lists (id, name) VALUES (?, ?)", [list, "survives the kill"]);
      await killOwnBrowser(own);
      check(r.ok, `exec before the kill: ${JSON.stringify(r)}`);
      // Pages load from a stand-in static host while the sync server stays down, so the
      // write must still be pending when the browser comes back.
      const standIn = await startStaticStandIn(server.addr, assets);
      own = await startOwnBrowser(profile);
      tab = await openTab(own.context, server.origin, "crash");
      const row = await call(tab, "query", "SELECT name FROM lists WHERE id = ?", [list]);
      check(row.ok && row.value.length === 1, `row after the restart: ${JSON.stringify(row)}`);
      const status = await tab.evaluate(() => db.status());
      check(status.pending === 1 && !status.online, `the pending write is still queued: ${JSON.stringify(status)}`);
      await standIn.stop();
      server = await startServer({ data: server.data, listen: server.addr });
      await withTimeout(tab.evaluate(() => db.sync({ timeoutMs: 20000 })), "sync after the restart", 25000);
      // A fresh server process: its counter starts at 0, and the log grew by one entry.
      const applied = await metric(server.origin, APPLIED);
      const seqAfter = await metric(server.origin, "hearth_server_seq");
      check(applied === 1 && seqAfter === seqBefore + 1, `applied exactly once: applied ${applied}, seq ${seqBefore} -> ${seqAfter}`);
      const synced = await call(tab, "query", "SELECT name FROM lists WHERE id = ?", [list]);
      check(synced.ok && synced.value.length === 1, "the row is still there after the sync");
    } finally {
      await own.browser.close().catch(() => {});
      await killOwnBrowser(own).catch(() => {});
      await rm(profile, { recursive: true, force: true });
    }
  });

  await server.cleanup();
  await rm(dataDir, { recursive: true, force: true });
  const passed = results.filter(Boolean).length;
  const failed = results.length - passed;
  console.log(`${passed} passed, ${failed} failed`);
  process.exitCode = failed ? 1 : 0;
}

main().catch((error) => {
  console.error(error);
  console.log(`${results.filter(Boolean).length} passed, ${results.filter((r) => !r).length + 1} failed`);
  process.exitCode = 1;
});
