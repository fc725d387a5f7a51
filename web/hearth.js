// Hearth's drop-in loader: `<script src="https://HOST/hearth.js"></script>` defines
// `window.Hearth`. It is a classic script (not a module) so that one plain tag is all a
// page needs; the heavy parts (the page wasm and its glue) load on the first `open`.
// `hearth.mjs` offers the same API as an ES module (`import { open } from ".../hearth.mjs"`).
//
// Everything else is resolved relative to this script's own URL, so the files can be
// served under any path prefix, and the sync endpoint defaults to `sync` beside it. The
// SharedWorker script must be same-origin with the page (a browser rule): a page on
// another origin than the sync server keeps a copy of the server's /hearth-worker.js
// among its own files and passes its URL as `workerUrl`; the worker is then told (in its
// URL's `assets` parameter) to load the rest from the server this script came from.
//
//   const db = await Hearth.open({ server, name, token, reset, workerUrl })
//                                     // resolves once the schema is there
//   await db.exec(sql, params)        -> { mutation, rowsAffected, settled }, once durable on
//                                        the device; `await settled` -> the server's verdict:
//                                        { status: "applied", serverSeq } or { status:
//                                        "rejected", code, reason, undone: [{ table, key }] }
//                                        ({ status: "local" } when no synced row changed)
//   await db.settled(mutation)        -> the same verdict for a write made earlier (or in
//                                        another tab, or before a reload)
//   await db.pending()                -> the outbox: [{ mutation, tables, rows, madeAt,
//                                        attempts, sent }]
//   await db.discard(mutation)        -> { undone }: a queued write dropped, rolled back,
//                                        never sent; NOT_PENDING, or SENT once it went out
//   SQL: hearth_pending(table, key)   -> 1 while a local write to that row awaits the server
//   await db.editText(table, key, column, [{ index, delete, insert }])
//                                     -> like exec; positions in code points, not UTF-16 units
//   await db.resolve(conflictId, value) -> like exec; closes a hearth_conflicts row
//   await db.query(sql, params)       -> [{ column: value, ... }, ...]
//   const stop = db.live(sql, params, rows => ..., error => ...)
//   db.status()                       -> { online, pending, serverSeq, caughtUp, schemaVersion, schemaAhead }
//   const off = db.on("status" | "change" | "rejected", callback)
//   await db.sync({ timeoutMs })      -> status; rejects with code OFFLINE after the timeout
//   const sub = await db.subscribe(stream, { param: value }, { onProgress })
//                                     -> once the stream's rows are local and durable; sub.id,
//                                        sub.unsubscribe(), sub.on("progress", ({ rows, done }) => ...)
//   await db.subscriptions()          -> [{ id, stream, params, loaded, rows, tabs }]
//                                        (the device's: shared and counted across tabs)
//   const room = db.room("doc:42")    // presence and broadcast: ephemeral, never stored
//   await room.setPresence({ name, cursor })  -> joins (or updates this tab's state)
//   const off = room.on("presence", members => ...)  // [{ clientId, tab, state, since, me }]
//   room.on("message", (message, { clientId, tab }) => ...)   room.on("error", error => ...)
//   room.send(message)                -> fire and forget; coalesced latest-wins per sender
//   await room.leave()
// Errors are `Error`s with a stable `code`: SQL_ERROR, INVALID_ARGUMENT, OFFLINE, REJECTED,
// BAD_SUBSCRIPTION, BAD_ROOM, PRESENCE_TOO_LARGE, NOT_IN_ROOM, NOT_PENDING, SENT,
// UNKNOWN_MUTATION, ... The "rejected" event's error has mutation, serverCode, reason, undone.
(function () {
  "use strict";

  const script = document.currentScript;
  const base = new URL(".", script && script.src ? script.src : location.href);

  let pageModule = null;

  // Loads and initialises the page wasm once per page, however many databases it opens.
  function loadPage() {
    if (!pageModule) {
      pageModule = import(new URL("pkg/hearth_page.js", base).href).then(async (module) => {
        await module.default({ module_or_path: new URL("pkg/hearth_page_bg.wasm", base) });
        return module;
      });
      // A failed load may be a passing network error: let the next open() try again.
      pageModule.catch(() => {
        pageModule = null;
      });
    }
    return pageModule;
  }

  // The sync endpoint: `sync` beside this script, over wss when it came over https.
  function defaultServer() {
    const url = new URL("sync", base);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
  }

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

  // Opens (or joins, if another tab already did) the database `name` on this device.
  // Resolves once the database has its schema: at once on a device that synced before,
  // after the first contact with the server on a fresh device.
  async function open(options) {
    const { server = defaultServer(), name = "default", token, reset = false, workerUrl } = options || {};
    const workerSrc = workerScript(workerUrl);
    const page = await loadPage();
    return page.open(workerSrc, String(name), String(server), token, Boolean(reset));
  }

  // Offline cold start: a service worker (hearth-sw.js) takes control only after the page
  // that registered it loaded, so it is handed the URLs this page loaded, to keep them for
  // the next load. Other service workers ignore the message.
  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.ready.then((registration) => {
      const urls = [location.href, ...performance.getEntriesByType("resource").map((entry) => entry.name)];
      if (registration.active) registration.active.postMessage({ hearth: "cache", urls });
    }, () => {});
  }

  window.Hearth = Object.freeze({ open });
})();
