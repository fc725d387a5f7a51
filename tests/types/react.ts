// The React hooks, used as a component would (without JSX, so that no React types are
// needed here: hearth-react.mjs takes React from the app).
import { useHearthStatus, useLiveQuery } from "hearth/react";
import { useLiveQuery as byUrl } from "http://127.0.0.1:8787/hearth-react.mjs";

interface Todo extends Hearth.Row {
  title: string;
}

export function TodoList(db: Hearth.Database | null, list: string): string {
  const { rows, loading, error } = useLiveQuery<Todo>(db, "SELECT title FROM todos WHERE list_id = ?", [list]);
  const all = byUrl(db, "SELECT count(*) AS n FROM todos");
  const status = useHearthStatus(db);
  if (error) return `failed: ${error.code}`;
  if (loading) return "loading";
  const line = status ? `${status.online ? "online" : "offline"}, ${status.pending} pending` : "opening";
  return `${rows.map((t) => t.title).join(", ")} (${all.rows.length}) ${line}`;
}
