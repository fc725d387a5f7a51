// Hearth as an ES module: `import { open } from "https://HOST/hearth.mjs"`. The same API
// as `window.Hearth` from hearth.js (see there); files resolve relative to this module.
const base = new URL(".", import.meta.url);

let pageModule = null;

function loadPage() {
  if (!pageModule) {
    pageModule = import(new URL("pkg/hearth_page.js", base).href).then(async (module) => {
      await module.default({ module_or_path: new URL("pkg/hearth_page_bg.wasm", base) });
      return module;
    });
    pageModule.catch(() => {
      pageModule = null;
    });
  }
  return pageModule;
}

// The sync endpoint: `sync` beside this module, over wss when it came over https.
function defaultServer() {
  const url = new URL("sync", base);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

// hearth-worker.js beside this module, or the app's own copy of it (see hearth.js).
function workerScript(workerUrl) {
  if (workerUrl === undefined || workerUrl === null) return new URL("hearth-worker.js", base).href;
  const url = new URL(String(workerUrl), location.href);
  if (new URL(".", url).href !== base.href) url.searchParams.set("assets", base.href);
  return url.href;
}

export async function open(options) {
  const { server = defaultServer(), name = "default", token, reset = false, workerUrl } = options || {};
  const page = await loadPage();
  return page.open(workerScript(workerUrl), String(name), String(server), token, Boolean(reset));
}

// Offline cold start: hand a service worker (hearth-sw.js) what this page loaded (see hearth.js).
if ("serviceWorker" in navigator) {
  navigator.serviceWorker.ready.then((registration) => {
    const urls = [location.href, ...performance.getEntriesByType("resource").map((entry) => entry.name)];
    if (registration.active) registration.active.postMessage({ hearth: "cache", urls });
  }, () => {});
}

export default Object.freeze({ open });
