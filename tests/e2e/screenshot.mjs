// Screenshots of the demo app at desktop and phone size, with some data in it (likes,
// tags, notes, due dates, and one open due-date conflict made by two offline devices):
//   node tests/e2e/screenshot.mjs [OUT_DIR]     (default target/screenshots)
// Each size gives the list (demo-SIZE.png) and a todo's detail dialog (demo-SIZE-detail.png).
// WEB_DIR=web serves the demo's own files (not the client's) from that directory instead of
// the binary, to look at a change to the app without rebuilding.
import { mkdir } from "node:fs/promises";
import path from "node:path";
import { demoFromWebDir, launchBrowser, repoRoot, startServer, waitFor, withTimeout } from "./harness.mjs";

const out = path.resolve(process.argv[2] || path.join(repoRoot, "target/screenshots"));
await mkdir(out, { recursive: true });
const server = await startServer();
const browser = await launchBrowser();

async function newContext(options = {}) {
  const context = await browser.newContext(options);
  await demoFromWebDir(context);
  return context;
}

async function openApp(context, label) {
  const page = await context.newPage();
  page.on("console", (m) => console.log(`  [${label} console] ${m.text()}`));
  page.on("pageerror", (e) => console.log(`  [${label} error] ${e.message}`));
  page.on("response", (r) => {
    if (r.status() >= 400) console.log(`  [${label}] ${r.status()} ${r.url()}`);
  });
  await page.goto(server.origin + "/");
  await withTimeout(page.waitForFunction(() => window.db && db.status().online), "app ready");
  return page;
}

// Two devices write the data; then both change one due date offline, which opens a conflict.
async function seed() {
  const one = await newContext();
  const two = await newContext();
  const a = await openApp(one, "seed a");
  const b = await openApp(two, "seed b");
  await a.evaluate(async () => {
    const lists = [
      ["groceries", "Groceries", [["Oat milk", ["dairy-free"], 2, ""], ["Sourdough bread", [], 0, ""], ["Lemons", ["fruit"], 0, ""], ["Coffee beans", ["beans", "daily"], 5, "Whole beans, not ground.\nThe place on the corner."]]],
      ["trip", "Weekend trip", [["Book the cabin", ["plans"], 3, "Ask about the fireplace.\nCheck-in after 3 pm."], ["Pack the tent", [], 0, ""]]],
      ["work", "Work", [["Ship the browser client", ["release"], 1, ""]]],
    ];
    let t = 1;
    for (const [id, listName, todos] of lists) {
      await db.exec("INSERT INTO lists (id, name, created_at) VALUES (?, ?, ?)", [id, listName, t++]);
      let p = 1;
      for (const [title, tags, likes, notes] of todos) {
        await db.exec("INSERT INTO todos (id, list_id, title, position, done, tags, likes, notes, due) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [
          `${id}-${p}`, id, title, p, p === 2 ? 1 : 0, JSON.stringify(tags), likes, notes, p === 1 ? "2026-07-01" : null,
        ]);
        p++;
      }
    }
    await db.sync();
  });
  await withTimeout(b.evaluate(() => db.sync()), "device b synced");
  await one.setOffline(true);
  await two.setOffline(true);
  await a.evaluate(() => db.exec("UPDATE todos SET due = '2026-07-03' WHERE id = 'trip-1'"));
  await b.evaluate(() => db.exec("UPDATE todos SET due = '2026-07-10' WHERE id = 'trip-1'"));
  await one.setOffline(false);
  await withTimeout(a.evaluate(() => db.sync()), "device a synced");
  await two.setOffline(false);
  await withTimeout(b.evaluate(() => db.sync()), "device b synced");
  await one.close();
  await two.close();
}

try {
  await seed();
  for (const [name, viewport, mobile] of [["desktop", { width: 1280, height: 800 }, false], ["phone", { width: 390, height: 844 }, true]]) {
    const context = await newContext({ viewport, isMobile: mobile, hasTouch: mobile, deviceScaleFactor: mobile ? 2 : 1 });
    const page = await openApp(context, name);
    await waitFor(page, () => [...document.querySelectorAll(".list .name")].some((n) => n.textContent === "Weekend trip"), null, "lists shown");
    await page.click(".list:has-text('Weekend trip')");
    await waitFor(page, () => document.querySelectorAll(".todo").length === 2 && document.querySelector(".conflict"), null, "todos and the conflict shown");
    await page.waitForTimeout(300);
    await page.screenshot({ path: path.join(out, `demo-${name}.png`) });
    console.log(path.join(out, `demo-${name}.png`));
    await page.click(".todo .icon.open");
    await waitFor(page, () => document.querySelector("#detail-notes").value.length > 0, null, "detail shown");
    await page.waitForTimeout(300);
    await page.screenshot({ path: path.join(out, `demo-${name}-detail.png`) });
    console.log(path.join(out, `demo-${name}-detail.png`));
    await context.close();
  }
} finally {
  await browser.close();
  await server.cleanup();
}
