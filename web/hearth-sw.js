// Hearth's service worker: a page that loaded once opens again with the server down, with
// its data (the data itself is in the device's database, not here).
//
//   navigator.serviceWorker.register("/hearth-sw.js")        // as is, or in the app's own:
//   importScripts("/hearth-sw.js")                           // (a classic service worker)
//
// What it caches, in the Cache Storage cache "hearth":
//   - Hearth's own files of this build (hearth.js, hearth.mjs, hearth-worker.js,
//     hearth-react.mjs and the content-hashed /pkg/ files), fetched when it installs;
//   - every same-origin GET the app makes while it is in control (pages, scripts, styles,
//     images, ...) that answers 200, and the URLs the page loaded before it took control,
//     which hearth.js / hearth.mjs hand it (see "hearth-cache" below);
//   - never /sync, /metrics or /healthz, other origins, or anything but GET.
// How it answers:
//   - a content-hashed URL (name.<16 hex digits>.ext, which never changes): from the cache,
//     else the network;
//   - anything else: the network first, so a reachable server always serves the newest
//     files (the copy in the cache is refreshed); the cache only when the network fails.
//     A page (navigation) not in the cache falls back to the cached page of the same path
//     with any query.
// Updates: this script names the hashed files of its build, so a new Hearth build changes
// it and the browser installs the new version (importScripts-ed copies are checked too).
// It fetches the new build's files, takes over at once (skipWaiting, clients.claim), and
// drops the older builds' hashed files. The app's own files refresh on each online load.
//
// An app whose Hearth files are not at its origin's root sets `self.hearthAssets` to their
// folder ("/hearth/") before importScripts.
(function () {
  "use strict";

  const CACHE = "hearth";
  const base = new URL(self.hearthAssets || "./", self.location.href);
  // Rewritten by the build to this build's content-hashed names.
  const HEARTH_FILES = [
    "hearth.js",
    "hearth.mjs",
    "hearth-worker.js",
    "hearth-react.mjs",
    "pkg/hearth_page.js",
    "pkg/hearth_page_bg.wasm",
    "pkg/hearth_worker.js",
    "pkg/hearth_worker_bg.wasm",
  ].map((file) => new URL(file, base).href);
  const NEVER = new Set(["/sync", "/metrics", "/healthz", new URL("sync", base).pathname]);
  const HASHED = /\.[0-9a-f]{16}\.[a-z0-9]+$/;

  function cacheable(url) {
    return (
      (url.protocol === "http:" || url.protocol === "https:") &&
      (url.origin === self.location.origin || url.href.startsWith(base.href)) &&
      !NEVER.has(url.pathname)
    );
  }

  // A 200 of the request's own URL is worth keeping (not a partial 206, not a redirect's
  // target under another name, not an opaque answer).
  function keep(cache, request, response) {
    if (response.status === 200 && !response.redirected && response.type !== "opaque") {
      return cache.put(request, response.clone()).catch(() => {});
    }
    return Promise.resolve();
  }

  self.addEventListener("install", (event) => {
    event.waitUntil(
      caches
        .open(CACHE)
        .then((cache) => cache.addAll(HEARTH_FILES))
        .then(() => self.skipWaiting()),
    );
  });

  self.addEventListener("activate", (event) => {
    event.waitUntil(
      caches
        .open(CACHE)
        .then((cache) =>
          cache.keys().then((requests) =>
            Promise.all(
              requests
                .filter((r) => r.url.startsWith(new URL("pkg/", base).href) && !HEARTH_FILES.includes(r.url))
                .map((r) => cache.delete(r)),
            ),
          ),
        )
        // The demo app's service worker of earlier releases kept its own cache.
        .then(() => caches.delete("hearth-shell-v2"))
        .then(() => self.clients.claim()),
    );
  });

  self.addEventListener("fetch", (event) => {
    const request = event.request;
    if (request.method !== "GET") return;
    const url = new URL(request.url);
    if (!cacheable(url)) return;
    event.respondWith(
      caches.open(CACHE).then((cache) => {
        if (HASHED.test(url.pathname)) {
          return cache.match(request).then(
            (hit) => hit || fetch(request).then((response) => keep(cache, request, response).then(() => response)),
          );
        }
        return fetch(request).then(
          (response) => {
            event.waitUntil(keep(cache, request, response));
            return response;
          },
          (error) =>
            cache
              .match(request)
              .then((hit) => hit || (request.mode === "navigate" ? cache.match(request, { ignoreSearch: true }) : undefined))
              .then((hit) => {
                if (hit) return hit;
                throw error;
              }),
        );
      }),
    );
  });

  // {hearth: "cache", urls}: URLs a page loaded before this worker was in control (its
  // first load). Those not cached yet are fetched and kept, so that the first load alone
  // is enough to open offline next time.
  self.addEventListener("message", (event) => {
    const data = event.data;
    if (!data || data.hearth !== "cache" || !Array.isArray(data.urls)) return;
    event.waitUntil(
      caches.open(CACHE).then((cache) =>
        Promise.all(
          data.urls.map((href) => {
            let url;
            try {
              url = new URL(String(href), self.location.href);
            } catch {
              return undefined;
            }
            if (!cacheable(url)) return undefined;
            url.hash = "";
            return cache.match(url.href).then((hit) =>
              hit ? undefined : fetch(url.href).then((response) => keep(cache, new Request(url.href), response), () => {}),
            );
          }),
        ).then(() => event.source && event.source.postMessage({ hearth: "cached" })),
      ),
    );
  });
})();
