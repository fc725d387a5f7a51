// Entry script of Hearth's SharedWorker (started by the page as a module worker, named
// "hearth:<database name>").
//
// The browser delivers the first tab's `connect` event as soon as this script runs, while
// the wasm is still loading. So the handler is set first, synchronously, and the events
// are kept until the wasm's `run` takes over; without this the first tab would never get
// an answer.
import init, { run } from "./pkg/hearth_worker.js";

const pendingConnects = [];
self.onconnect = (event) => pendingConnects.push(event);

init({ module_or_path: new URL("./pkg/hearth_worker_bg.wasm", import.meta.url) }).then(
  () => run(pendingConnects),
  (error) => console.error("hearth-worker: cannot load its wasm", error),
);
