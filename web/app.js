// Hearth Todos: the demo app. Plain JS on the page API (window.Hearth from hearth.js):
// every write is one `db.exec` (or `db.editText` / `db.resolve`), every view a `db.live`
// query, so each tab and each device shows the same data as soon as it changes, online
// or not. Each todo's columns show one merge policy each (see DEMO_SCHEMA): `likes`
// counts every device's likes (counter), `tags` keeps every device's additions (set),
// `notes` merges edits letter by letter (text: the textarea sends each change as a
// positional `db.editText`), and `due` is merged by hand (manual: two devices changing
// it at once open a conflict, shown as a banner where a person picks or types the value).
// The list's header shows who else has the same list open, live: each tab joins the room
// "list:<id>" with its person's name (`db.room(...).setPresence`), and the server says who
// is there (ephemeral: never stored).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  db: null,
  lists: [],
  listId: localStorage.getItem("hearth.list") || null,
  stopTodos: null,
  conflicts: [],
  // The todo open in the detail dialog: {id, stop, shadow, inflight, latest}.
  detail: null,
  // The room of the list on screen: {room, off}.
  room: null,
};

// The name others see in the list's header; kept per browser profile.
function myName() {
  let name = localStorage.getItem("hearth.name");
  if (!name) {
    name = `Guest ${Math.floor(1000 + Math.random() * 9000)}`;
    localStorage.setItem("hearth.name", name);
  }
  return name;
}

function renderPresence(members) {
  const others = members.filter((m) => !m.me);
  const mine = members.find((m) => m.me);
  const box = $("present");
  box.hidden = others.length === 0;
  box.replaceChildren(
    el("span", { class: "present-label" }, "Also here:"),
    ...others.map((m) => {
      const name = (m.state && typeof m.state.name === "string" && m.state.name) || "someone";
      const sameDevice = mine && m.clientId === mine.clientId;
      const since = new Date(m.since).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      return el("span", { class: "person", title: `here since ${since}` }, sameDevice ? `${name} (another tab)` : name);
    }),
  );
}

// Joins the room of list `id` (leaving the previous one).
function enterListRoom(id) {
  if (state.room) {
    state.room.off();
    state.room.room.leave().catch(() => {});
    state.room = null;
  }
  renderPresence([]);
  if (!id) return;
  const room = state.db.room(`list:${id}`);
  const off = room.on("presence", renderPresence);
  room.setPresence({ name: myName() }).catch((error) => toast(`${error.code}: ${error.message}`, "error"));
  state.room = { room, off };
}

function uuid() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (value !== false && value != null) node.setAttribute(key, value === true ? "" : value);
  }
  node.append(...children);
  return node;
}

function toast(message, kind = "info") {
  const item = el("div", { class: `toast ${kind}` }, message);
  $("toasts").append(item);
  setTimeout(() => item.classList.add("leaving"), kind === "error" ? 7000 : 3500);
  setTimeout(() => item.remove(), kind === "error" ? 7400 : 3900);
}

// Runs a write; shows its error (a local one: bad input, a CHECK) instead of throwing.
async function write(sql, params) {
  try {
    return await state.db.exec(sql, params);
  } catch (error) {
    toast(`${error.code}: ${error.message}`, "error");
    return null;
  }
}

function showStatus(status) {
  const sync = $("sync");
  sync.classList.toggle("online", status.online);
  sync.classList.toggle("offline", !status.online);
  $("sync-text").textContent = status.online ? (status.caughtUp ? "Synced" : "Syncing…") : "Offline";
  const pending = $("pending");
  pending.hidden = status.pending === 0;
  pending.textContent = `${status.pending} pending`;
  sync.title = `Server sequence ${status.serverSeq}; ${status.pending} write(s) waiting for the server`;
}

function renderLists(lists) {
  state.lists = lists;
  if (!lists.some((l) => l.id === state.listId)) selectList(lists.length ? lists[0].id : null);
  else if (!state.stopTodos) selectList(state.listId);
  const ul = $("lists");
  ul.replaceChildren(
    ...lists.map((list) =>
      el(
        "li",
        {},
        el(
          "button",
          { class: list.id === state.listId ? "list active" : "list", onclick: () => selectList(list.id) },
          el("span", { class: "name" }, list.name),
          el("span", { class: "badge" }, String(list.open)),
        ),
      ),
    ),
  );
  const current = lists.find((l) => l.id === state.listId);
  $("list-title").textContent = current ? current.name : "No lists yet";
  $("delete-list").hidden = !current;
  for (const id of ["new-todo-title"]) $(id).disabled = !current;
  document.querySelector("#new-todo button").disabled = !current;
}

function parseTags(json) {
  try {
    const tags = JSON.parse(json);
    return Array.isArray(tags) ? tags : [];
  } catch {
    return [];
  }
}

const like = (id) => write("UPDATE todos SET likes = likes + 1 WHERE id = ?", [id]);

function renderTodos(todos) {
  const open = todos.filter((t) => !t.done).length;
  $("empty").hidden = todos.length > 0;
  $("counts").textContent = todos.length ? `${open} open · ${todos.length - open} done` : "";
  $("todos").replaceChildren(
    ...todos.map((todo) => {
      const title = el("span", { class: "title", title: "Double-click to edit", ondblclick: () => editTodo(item, todo) }, todo.title);
      const tags = parseTags(todo.tags);
      const meta = el(
        "button",
        { class: "meta", "aria-label": `Details of ${todo.title}`, onclick: () => openDetail(todo.id) },
        ...tags.map((tag) => el("span", { class: "tag" }, `#${tag}`)),
        todo.due ? el("span", { class: todo.conflict ? "chip conflicted" : "chip" }, `due ${todo.due}${todo.conflict ? " · conflict" : ""}`) : "",
        todo.has_notes ? el("span", { class: "chip" }, "✎ notes") : "",
      );
      const item = el(
        "li",
        {
          class: `todo${todo.done ? " done" : ""}${todo.unconfirmed ? " unconfirmed" : ""}`,
          title: todo.unconfirmed ? "Not yet confirmed by the server" : "",
        },
        el("input", {
          type: "checkbox",
          checked: !!todo.done,
          "aria-label": `Done: ${todo.title}`,
          onchange: (e) => write("UPDATE todos SET done = ? WHERE id = ?", [e.target.checked ? 1 : 0, todo.id]),
        }),
        el("div", { class: "body" }, title, meta.childElementCount ? meta : ""),
        el("button", { class: todo.likes ? "like liked" : "like", "aria-label": `Like ${todo.title}`, onclick: () => like(todo.id) }, `♥ ${todo.likes}`),
        el("button", { class: "icon open", "aria-label": `Open ${todo.title}`, title: "Tags, due date, notes", onclick: () => openDetail(todo.id) }, "›"),
        el("button", { class: "icon edit", "aria-label": `Edit ${todo.title}`, onclick: () => editTodo(item, todo) }, "✎"),
        el("button", { class: "icon delete", "aria-label": `Delete ${todo.title}`, onclick: () => write("DELETE FROM todos WHERE id = ?", [todo.id]) }, "✕"),
      );
      return item;
    }),
  );
}

// --- Manual merge: open conflicts on todos, as banners with the candidates. ---

const COLUMN_LABELS = { due: "Due date" };

async function resolve(conflictId, value) {
  try {
    await state.db.resolve(conflictId, value);
    toast("Conflict resolved");
  } catch (error) {
    toast(`${error.code}: ${error.message}`, "error");
  }
}

function renderConflicts(container, conflicts) {
  container.hidden = conflicts.length === 0;
  container.replaceChildren(
    ...conflicts.map((conflict) => {
      let candidates = [];
      try {
        candidates = JSON.parse(conflict.candidates);
      } catch {}
      const values = [...new Set(candidates.map((c) => JSON.stringify(c.value)))].map((v) => JSON.parse(v));
      const typed = el("input", { type: "date", "aria-label": "Another value" });
      const label = COLUMN_LABELS[conflict.column_name] || conflict.column_name;
      return el(
        "div",
        { class: "conflict", role: "alert" },
        el("p", {}, "⚠ ", el("b", {}, label), ` of “${conflict.title ?? "a deleted todo"}” was changed on two devices at once. Keep:`),
        el(
          "div",
          { class: "choices" },
          ...values.map((value) => el("button", { class: "choice", onclick: () => resolve(conflict.id, value) }, value ?? "no date")),
          el(
            "form",
            {
              class: "other",
              onsubmit: (e) => {
                e.preventDefault();
                resolve(conflict.id, typed.value || null);
              },
            },
            typed,
            el("button", { type: "submit", class: "choice" }, "Set"),
          ),
        ),
      );
    }),
  );
}

function showConflicts(conflicts) {
  state.conflicts = conflicts;
  renderConflicts($("conflicts"), conflicts);
  if (state.detail) renderConflicts($("detail-conflicts"), conflicts.filter((c) => c.todo_id === state.detail.id));
}

// --- The detail dialog: likes, tags, due date and the shared notes of one todo. ---

// The edit from `before` to `after` as {index, delete, insert} in code points (what
// db.editText counts), or null when they are equal. One input event is one contiguous
// change, so a common prefix and suffix find it.
function codePointEdit(before, after) {
  if (before === after) return null;
  const a = Array.from(before);
  const b = Array.from(after);
  let start = 0;
  while (start < a.length && start < b.length && a[start] === b[start]) start++;
  let end = 0;
  while (end < a.length - start && end < b.length - start && a[a.length - 1 - end] === b[b.length - 1 - end]) end++;
  return { index: start, delete: a.length - start - end, insert: b.slice(start, b.length - end).join("") };
}

// Puts another device's version of the notes in the textarea, keeping the caret where
// it was relative to the text around it (positions here are UTF-16 units, as the DOM's).
function applyNotes(notes) {
  const d = state.detail;
  const area = $("detail-notes");
  if (!d || notes == null) return;
  d.shadow = notes;
  if (area.value === notes) return;
  const before = area.value;
  let start = 0;
  while (start < before.length && start < notes.length && before[start] === notes[start]) start++;
  let end = 0;
  while (end < before.length - start && end < notes.length - start && before[before.length - 1 - end] === notes[notes.length - 1 - end]) end++;
  const map = (pos) => (pos <= start ? pos : pos >= before.length - end ? pos + notes.length - before.length : notes.length - end);
  const [selStart, selEnd] = [map(area.selectionStart), map(area.selectionEnd)];
  area.value = notes;
  if (document.activeElement === area) area.setSelectionRange(selStart, selEnd);
}

function onNotesInput() {
  const d = state.detail;
  if (!d) return;
  const value = $("detail-notes").value;
  const edit = codePointEdit(d.shadow, value);
  if (!edit) return;
  d.shadow = value;
  d.inflight++;
  state.db
    .editText("todos", d.id, "notes", [edit])
    .catch((error) => toast(`${error.code}: ${error.message}`, "error"))
    .finally(() => {
      d.inflight--;
      // Results of the live query that arrived meanwhile waited: they may predate a
      // keystroke still on its way. Now the latest one holds every edit of ours.
      if (d.inflight === 0 && state.detail === d) applyNotes(d.latest);
    });
}

function renderDetail(rows) {
  const d = state.detail;
  if (!d) return;
  const todo = rows[0];
  if (!todo) {
    $("detail").close();
    return;
  }
  $("detail-title").textContent = todo.title;
  $("detail-like").textContent = `♥ ${todo.likes}`;
  $("detail-like").classList.toggle("liked", todo.likes > 0);
  const due = $("detail-due");
  // A date input reports a value only once it is a whole date, so this never cuts typing.
  if (due.value !== (todo.due || "")) due.value = todo.due || "";
  const tags = parseTags(todo.tags);
  d.tags = tags;
  $("detail-tags").replaceChildren(
    ...tags.map((tag) =>
      el(
        "span",
        { class: "tag" },
        `#${tag}`,
        el("button", { class: "untag", "aria-label": `Remove tag ${tag}`, onclick: () => write("UPDATE todos SET tags = ? WHERE id = ?", [JSON.stringify(tags.filter((t) => t !== tag)), d.id]) }, "×"),
      ),
    ),
  );
  d.latest = todo.notes;
  if (d.inflight === 0) applyNotes(todo.notes);
}

function openDetail(id) {
  closeDetail();
  const d = { id, stop: null, shadow: "", inflight: 0, latest: null, tags: [] };
  state.detail = d;
  $("detail-notes").value = "";
  $("detail-due").value = "";
  d.stop = state.db.live("SELECT id, title, likes, tags, due, notes FROM todos WHERE id = ?", [id], renderDetail, (error) => toast(error.message, "error"));
  renderConflicts($("detail-conflicts"), state.conflicts.filter((c) => c.todo_id === id));
  if (!$("detail").open) $("detail").showModal();
}

function closeDetail() {
  if (state.detail && state.detail.stop) state.detail.stop();
  state.detail = null;
}

function editTodo(item, todo) {
  const input = el("input", { class: "edit-input", value: todo.title, maxlength: 200, "aria-label": "Edit todo" });
  const title = item.querySelector(".title");
  title.replaceWith(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const value = input.value.trim();
    if (save && value && value !== todo.title) await write("UPDATE todos SET title = ? WHERE id = ?", [value, todo.id]);
    if (input.isConnected) input.replaceWith(title);
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

function selectList(id) {
  if (id === state.listId && state.stopTodos) return;
  state.listId = id;
  if (id) localStorage.setItem("hearth.list", id);
  if (state.stopTodos) state.stopTodos();
  state.stopTodos = null;
  enterListRoom(id);
  if (!id) return renderTodos([]);
  state.stopTodos = state.db.live(
    `SELECT id, title, done, likes, tags, due, notes <> '' AS has_notes,
            hearth_pending('todos', id) AS unconfirmed,
            EXISTS (SELECT 1 FROM hearth_conflicts c
                     WHERE c.table_name = 'todos' AND c.row_key = json_quote(todos.id)) AS conflict
       FROM todos WHERE list_id = ? ORDER BY done, position, title`,
    [id],
    renderTodos,
    (error) => toast(error.message, "error"),
  );
  renderLists(state.lists);
}

async function main() {
  showStatus({ online: false, caughtUp: false, pending: 0, serverSeq: 0 });
  try {
    state.db = await Hearth.open({ name: "todos" });
  } catch (error) {
    $("list-title").textContent = "Cannot open the database";
    toast(`${error.code || "ERROR"}: ${error.message}`, "error");
    return;
  }
  const db = state.db;
  window.db = db; // handy in the console
  showStatus(db.status());
  db.on("status", showStatus);
  db.on("rejected", (error) => {
    const undone = (error.undone || []).map((row) => `${row.table} ${row.key}`).join(", ");
    const what = error.serverCode === "DISCARDED" ? "A queued change was discarded" : `The server refused a change (${error.serverCode})`;
    toast(`${what} and it was undone: ${error.reason}${undone ? `. Undone: ${undone}` : ""}`, "error");
  });

  db.live(
    `SELECT l.id, l.name,
            (SELECT count(*) FROM todos t WHERE t.list_id = l.id AND t.done = 0) AS open
       FROM lists l ORDER BY l.created_at, l.name`,
    [],
    renderLists,
    (error) => toast(error.message, "error"),
  );

  db.live(
    `SELECT c.id, c.column_name, c.candidates, json_extract(c.row_key, '$') AS todo_id, t.title
       FROM hearth_conflicts c LEFT JOIN todos t ON t.id = json_extract(c.row_key, '$')
      WHERE c.table_name = 'todos' ORDER BY c.opened_at, c.id`,
    [],
    showConflicts,
    (error) => toast(error.message, "error"),
  );

  $("detail").addEventListener("close", closeDetail);
  $("detail-notes").addEventListener("input", onNotesInput);
  $("detail-like").addEventListener("click", () => state.detail && like(state.detail.id));
  $("detail-due").addEventListener("change", (e) => {
    if (state.detail) write("UPDATE todos SET due = ? WHERE id = ?", [e.target.value || null, state.detail.id]);
  });
  $("detail-tag-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const tag = $("detail-tag").value.trim().replace(/^#/, "");
    const d = state.detail;
    if (!tag || !d) return;
    write("UPDATE todos SET tags = ? WHERE id = ?", [JSON.stringify([...d.tags, tag]), d.id]);
    $("detail-tag").value = "";
  });

  $("new-list").addEventListener("submit", async (e) => {
    e.preventDefault();
    const name = $("new-list-name").value.trim();
    if (!name) return;
    const id = uuid();
    if (await write("INSERT INTO lists (id, name, created_at) VALUES (?, ?, ?)", [id, name, Date.now()])) {
      $("new-list-name").value = "";
      selectList(id);
      $("new-todo-title").focus();
    }
  });

  $("new-todo").addEventListener("submit", async (e) => {
    e.preventDefault();
    const title = $("new-todo-title").value.trim();
    if (!title || !state.listId) return;
    const [{ next }] = await db.query("SELECT coalesce(max(position), 0) + 1 AS next FROM todos WHERE list_id = ?", [state.listId]);
    if (await write("INSERT INTO todos (id, list_id, title, position) VALUES (?, ?, ?, ?)", [uuid(), state.listId, title, next])) {
      $("new-todo-title").value = "";
    }
  });

  $("list-title").addEventListener("click", async () => {
    const current = state.lists.find((l) => l.id === state.listId);
    if (!current) return;
    const name = prompt("Rename list", current.name);
    if (name && name.trim() && name.trim() !== current.name) await write("UPDATE lists SET name = ? WHERE id = ?", [name.trim(), current.id]);
  });

  $("delete-list").addEventListener("click", async () => {
    const current = state.lists.find((l) => l.id === state.listId);
    if (!current || !confirm(`Delete "${current.name}" and its todos?`)) return;
    await write("DELETE FROM todos WHERE list_id = ?", [current.id]);
    await write("DELETE FROM lists WHERE id = ?", [current.id]);
  });
}

if ("serviceWorker" in navigator) {
  navigator.serviceWorker.register("hearth-sw.js").catch((error) => console.warn("no offline app shell:", error));
}
main();
