// The demo app's service worker: keeps the app shell (page, styles, script, Hearth's
// client and its wasm) so the app opens with the server down once it has loaded before.
// Network first, so a running server always serves the newest files; the cache answers
// only when the network cannot. The data itself never goes through here: it lives in
// the device's database, and sync uses the WebSocket.
const CACHE = "hearth-shell-v2";
const SHELL = [
  "/",
  "/index.html",
  "/app.css",
  "/app.js",
  "/icon.svg",
  "/manifest.webmanifest",
  "/hearth.js",
  "/hearth-worker.js",
  "/pkg/hearth_page.js",
  "/pkg/hearth_page_bg.wasm",
  "/pkg/hearth_worker.js",
  "/pkg/hearth_worker_bg.wasm",
];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches
      .keys()
      .then((keys) => Promise.all(keys.filter((k) => k !== CACHE).map((k) => caches.delete(k))))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== location.origin) return;
  if (url.pathname === "/sync" || url.pathname === "/metrics" || url.pathname === "/healthz") return;
  event.respondWith(
    fetch(event.request)
      .then((response) => {
        if (response.ok && SHELL.includes(url.pathname)) {
          const copy = response.clone();
          caches.open(CACHE).then((cache) => cache.put(event.request, copy));
        }
        return response;
      })
      .catch(() =>
        caches.match(event.request, { ignoreSearch: true }).then((hit) => hit || (event.request.mode === "navigate" ? caches.match("/index.html") : Response.error())),
      ),
  );
});
