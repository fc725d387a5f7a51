// An app on the script tag (<script src="/hearth.js">): window.Hearth, typed by hearth.d.ts.
// Each line is something an app does; tsc checks that the types allow it and describe the
// results as they are.

interface Todo extends Hearth.Row {
  id: string;
  title: string;
  done: number;
  pending: number;
}

export async function scriptTag(): Promise<void> {
  const db: Hearth.Database = await window.Hearth.open({ name: "todos", token: async () => "jwt" });
  const sameThing: Hearth.Database = await Hearth.open({ server: "wss://sync.example.com/sync", workerUrl: "/hearth-worker.js" });
  sameThing.close();

  const written = await db.exec("INSERT INTO todos (id, title) VALUES (?, ?)", ["t1", "milk"]);
  const mutation: number | null = written.mutation;
  const rows: number = written.rowsAffected;
  const verdict: Hearth.Verdict = await written.settled;
  if (verdict.status === "applied") {
    const seq: number = verdict.serverSeq;
    console.log(seq, rows);
  } else if (verdict.status === "local") {
    console.log("nothing to sync");
  } else {
    const undone: Hearth.RowRef[] = verdict.undone;
    console.log(verdict.code, verdict.reason, undone.map((r) => `${r.table}:${String(r.key)}`));
  }
  if (mutation !== null) await db.settled(mutation);

  const queued: Hearth.PendingWrite[] = await db.pending();
  for (const w of queued) {
    const when = new Date(w.madeAt);
    if (!w.sent && w.attempts === 0 && w.tables.includes("todos")) {
      try {
        const { undone } = await db.discard(w.mutation);
        console.log(when, undone.length, w.rows);
      } catch (error) {
        const code = (error as Hearth.HearthError).code;
        if (code === "NOT_PENDING" || code === "SENT" || code === "UNKNOWN_MUTATION") console.log(code);
      }
    }
  }

  await db.editText("todos", "t1", "notes", [{ index: 0, insert: "🦀" }, { index: 1, delete: 1 }]);
  await db.resolve("conflict-1", 4.5);
  await db.exec("UPDATE todos SET data = ? WHERE id = ?", [new Uint8Array([1, 2]), 12n]);

  const todos: Todo[] = await db.query<Todo>("SELECT *, hearth_pending('todos', id) AS pending FROM todos");
  console.log(todos[0]?.title.toUpperCase());
  const stop: () => void = db.live<Todo>(
    "SELECT *, hearth_pending('todos', id) AS pending FROM todos WHERE done = ?",
    [false],
    (live) => console.log(live.filter((t) => t.pending).length),
    (error) => console.log(error.code),
  );
  stop();

  const status: Hearth.Status = db.status();
  console.log(status.online, status.pending, status.serverSeq, status.caughtUp, status.schemaVersion ?? "none");
  const offs: Array<() => void> = [
    db.on("status", (s) => console.log(s.pending)),
    db.on("change", ({ tables }) => console.log(tables.join())),
    db.on("rejected", (error) => console.log(error.code, error.mutation, error.serverCode, error.reason, error.undone)),
    db.on("auth", (error) => console.log(error.code === "AUTH_EXPIRED")),
  ];
  offs.forEach((off) => off());
  try {
    await db.sync({ timeoutMs: 500 });
  } catch (error) {
    if ((error as Hearth.HearthError).code === "OFFLINE") console.log("offline");
  }

  const pendingSub = db.subscribe("list_todos", { list: "groceries", tags: ["a", "b"] }, { onProgress: ({ rows, done }) => console.log(rows, done) });
  pendingSub.on("progress", (p) => console.log(p.rows));
  const sub: Hearth.Subscription = await pendingSub;
  const offProgress = sub.on("progress", (p) => console.log(p.done));
  offProgress();
  console.log(sub.id, sub.stream, sub.params);
  await sub.unsubscribe();
  const subs: Hearth.SubscriptionInfo[] = await db.subscriptions();
  console.log(subs.map((s) => `${s.stream} ${s.loaded} ${s.rows} ${s.tabs}`));

  const room = db.room<{ name: string; cursor: number }, { emoji: string }>("doc:42");
  await room.setPresence({ name: "Ada", cursor: 3 });
  room.on("presence", (members) => console.log(members.filter((m) => !m.me).map((m) => `${m.state.name}@${m.clientId}/${m.tab} since ${m.since}`)));
  room.on("message", (message, from) => console.log(message.emoji, from.clientId, from.tab));
  room.on("error", (error) => console.log(error.code === "ROOM_FULL"));
  await room.send({ emoji: "👋" });
  await room.leave();
  console.log(db.name, db.server, room.name);
}

// Misuse that the types must catch.
export async function misuse(db: Hearth.Database): Promise<void> {
  // @ts-expect-error: params are an array.
  await db.exec("SELECT ?", "one");
  // @ts-expect-error: an object is no SQL value.
  await db.query("SELECT ?", [{ a: 1 }]);
  // @ts-expect-error: no such event.
  db.on("changed", () => {});
  // @ts-expect-error: mutation numbers are numbers.
  await db.discard("7");
  const verdict = await db.settled(1);
  // @ts-expect-error: only a rejected verdict has a reason.
  console.log(verdict.reason);
}
