// Screenshots of the demo app at desktop and phone size, with some data in it:
//   node tests/e2e/screenshot.mjs [OUT_DIR]     (default target/screenshots)
import { mkdir } from "node:fs/promises";
import path from "node:path";
import { launchBrowser, repoRoot, startServer, withTimeout } from "./harness.mjs";

const out = path.resolve(process.argv[2] || path.join(repoRoot, "target/screenshots"));
await mkdir(out, { recursive: true });
const server = await startServer();
const browser = await launchBrowser();
try {
  for (const [name, viewport, mobile] of [["desktop", { width: 1280, height: 800 }, false], ["phone", { width: 390, height: 844 }, true]]) {
    const context = await browser.newContext({ viewport, isMobile: mobile, hasTouch: mobile, deviceScaleFactor: mobile ? 2 : 1 });
    const page = await context.newPage();
    page.on("console", (m) => console.log(`  [${name} console] ${m.text()}`));
    page.on("pageerror", (e) => console.log(`  [${name} error] ${e.message}`));
    page.on("response", (r) => { if (r.status() >= 400) console.log(`  [${name}] ${r.status()} ${r.url()}`); });
    await page.goto(server.origin + "/");
    await withTimeout(page.waitForFunction(() => window.db && db.status().online), "app ready");
    await page.evaluate(async () => {
      if ((await db.query("SELECT count(*) AS n FROM lists"))[0].n === 0) {
        const lists = [["groceries", "Groceries", ["Oat milk", "Sourdough bread", "Lemons", "Coffee beans"]], ["trip", "Weekend trip", ["Book the cabin", "Pack the tent"]], ["work", "Work", ["Ship the browser client"]]];
        let t = 1;
        for (const [id, listName, todos] of lists) {
          await db.exec("INSERT INTO lists (id, name, created_at) VALUES (?, ?, ?)", [id, listName, t++]);
          let p = 1;
          for (const title of todos) await db.exec("INSERT INTO todos (id, list_id, title, position, done) VALUES (?, ?, ?, ?, ?)", [`${id}-${p}`, id, title, p, p === 2 ? 1 : 0]), p++;
        }
      }
    });
    await page.reload();
    await withTimeout(page.waitForFunction(() => document.querySelectorAll(".todo").length > 0), "todos shown");
    await page.waitForTimeout(300);
    await page.screenshot({ path: path.join(out, `demo-${name}.png`) });
    console.log(path.join(out, `demo-${name}.png`));
    await context.close();
  }
} finally {
  await browser.close();
  await server.cleanup();
}
