// Entry script of Hearth's SharedWorker (started by the page as a module worker, named
// "hearth:<database name>").
//
// The browser delivers the first tab's `connect` event as soon as this script runs, while
// the wasm is still loading. So the handler is set first, synchronously, and the events
// are kept until the wasm's `run` takes over; without this the first tab would never get
// an answer.
//
// An app served from another origin than the sync server keeps a copy of this file among
// its own (a SharedWorker must be same-origin with its page), and the library starts it
// with `?assets=<the sync server's Hearth folder>`. That copy loads nothing of its own: it
// imports the server's current hearth-worker.js (a CORS module import), which finds itself
// in that folder and loads the glue and wasm from there. So the copy never goes stale
// when the server is upgraded.
const connects = (self.hearthConnects ||= []);
if (!self.onconnect) self.onconnect = (event) => connects.push(event);

const here = new URL(".", import.meta.url);
const assets = new URL(self.location.href).searchParams.get("assets");
const from = assets ? new URL(assets, self.location.href) : here;

const started =
  from.href === here.href
    ? import(new URL("pkg/hearth_worker.js", here).href).then(async ({ default: init, run }) => {
        await init({ module_or_path: new URL("pkg/hearth_worker_bg.wasm", here) });
        run(connects);
      })
    : import(new URL("hearth-worker.js", from).href);
started.catch((error) => console.error(`hearth-worker: cannot load Hearth from ${from.href}`, error));
