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
// A coded error, like the ones the worker answers with.
function hearthError(code, message) {
  const error = new Error(message);
  error.name = "HearthError";
  error.code = code;
  return error;
}

// The SharedWorker's script: hearth-worker.js beside this script, or the app's own copy
// of it (`workerUrl`), which is told where Hearth's files are unless they are beside it.
// A SharedWorker must be same-origin with its page: anything else is INVALID_ARGUMENT
// here rather than a failed worker later.
function workerScript(workerUrl) {
  if (workerUrl === undefined || workerUrl === null) {
    if (base.origin !== location.origin) {
      throw hearthError(
        "INVALID_ARGUMENT",
        `this page (${location.origin}) is not on the sync server's origin (${base.origin}): copy ${new URL("hearth-worker.js", base).href} among the app's files and pass its URL as workerUrl`,
      );
    }
    return new URL("hearth-worker.js", base).href;
  }
  if (typeof workerUrl !== "string" && !(workerUrl instanceof URL)) {
    throw hearthError("INVALID_ARGUMENT", "workerUrl must be a string (or a URL): the app's copy of hearth-worker.js");
  }
  let url;
  try {
    url = new URL(String(workerUrl), location.href);
  } catch {
    throw hearthError("INVALID_ARGUMENT", `workerUrl ${JSON.stringify(String(workerUrl))} is not a URL`);
  }
  if (url.origin !== location.origin || !/^https?:$/.test(url.protocol) || String(workerUrl) === "") {
    throw hearthError(
      "INVALID_ARGUMENT",
      `workerUrl must be an http(s) URL on this page's origin (${location.origin}), not ${JSON.stringify(String(workerUrl))}: a SharedWorker must be same-origin with its page`,
    );
  }
  if (new URL(".", url).href !== base.href) url.searchParams.set("assets", base.href);
  return url.href;
}

export async function open(options) {
  const { server = defaultServer(), name = "default", token, reset = false, workerUrl } = options || {};
  const workerSrc = workerScript(workerUrl);
  const page = await loadPage();
  return page.open(workerSrc, String(name), String(server), token, Boolean(reset));
}

// Offline cold start: hand a service worker (hearth-sw.js) what this page loaded (see hearth.js).
if ("serviceWorker" in navigator) {
  navigator.serviceWorker.ready.then((registration) => {
    const urls = [location.href, ...performance.getEntriesByType("resource").map((entry) => entry.name)];
    if (registration.active) registration.active.postMessage({ hearth: "cache", urls });
  }, () => {});
}

export default Object.freeze({ open });
