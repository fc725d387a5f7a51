// Hearth Todos: the demo app. Plain JS on the page API (window.Hearth from hearth.js):
// every write is one `db.exec`, every view a `db.live` query, so each tab and each device
// shows the same data as soon as it changes, online or not.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { db: null, lists: [], listId: localStorage.getItem("hearth.list") || null, stopTodos: null };

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

function renderTodos(todos) {
  const open = todos.filter((t) => !t.done).length;
  $("empty").hidden = todos.length > 0;
  $("counts").textContent = todos.length ? `${open} open · ${todos.length - open} done` : "";
  $("todos").replaceChildren(
    ...todos.map((todo) => {
      const title = el("span", { class: "title", title: "Double-click to edit", ondblclick: () => editTodo(item, todo) }, todo.title);
      const item = el(
        "li",
        { class: todo.done ? "todo done" : "todo" },
        el("input", {
          type: "checkbox",
          checked: !!todo.done,
          "aria-label": `Done: ${todo.title}`,
          onchange: (e) => write("UPDATE todos SET done = ? WHERE id = ?", [e.target.checked ? 1 : 0, todo.id]),
        }),
        title,
        el("button", { class: "icon edit", "aria-label": `Edit ${todo.title}`, onclick: () => editTodo(item, todo) }, "✎"),
        el("button", { class: "icon delete", "aria-label": `Delete ${todo.title}`, onclick: () => write("DELETE FROM todos WHERE id = ?", [todo.id]) }, "✕"),
      );
      return item;
    }),
  );
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
  if (!id) return renderTodos([]);
  state.stopTodos = state.db.live(
    "SELECT id, title, done FROM todos WHERE list_id = ? ORDER BY done, position, title",
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
  db.on("rejected", (error) => toast(`The server refused a change and it was undone: ${error.reason}`, "error"));

  db.live(
    `SELECT l.id, l.name,
            (SELECT count(*) FROM todos t WHERE t.list_id = l.id AND t.done = 0) AS open
       FROM lists l ORDER BY l.created_at, l.name`,
    [],
    renderLists,
    (error) => toast(error.message, "error"),
  );

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
  navigator.serviceWorker.register("sw.js").catch((error) => console.warn("no offline app shell:", error));
}
main();
