// Hearth's React hooks: `import { useLiveQuery, useHearthStatus } from "https://HOST/hearth-react.mjs"`.
//
// React is the app's own: this module imports it by the bare name "react", which the app's
// import map (`{"imports": {"react": "..."}}`) or bundler resolves, so the hooks run on the
// one React the app renders with (two copies of React break hooks). Hearth ships no React.
// Types: `declare module "hearth/react"` in /hearth.d.ts.
//
//   const { rows, loading, error } = useLiveQuery(db, "SELECT * FROM todos WHERE list_id = ?", [list]);
//   const status = useHearthStatus(db);   // { online, pending, ... } or null
//
// `db` (what `Hearth.open` resolved to) may be null or undefined while it opens.
import { useEffect, useState } from "react";

// Parameters compared by value, so that `[list]` written afresh on each render does not
// restart the query. BigInts and blobs are values too.
// Each value is tagged with its type, so that values JSON would conflate (null, NaN and
// the infinities; the string "5n" and the bigint 5n) stay apart.
function paramsKey(params) {
  const list = Array.isArray(params) ? params : params == null ? [] : [params];
  return JSON.stringify(
    list.map((value) => {
      if (typeof value === "bigint") return ["bigint", String(value)];
      if (typeof value === "number") return ["number", Object.is(value, -0) ? "-0" : String(value)];
      if (value instanceof Uint8Array) return ["bytes", Array.from(value)];
      if (value instanceof ArrayBuffer) return ["bytes", Array.from(new Uint8Array(value))];
      if (value === undefined || value === null) return ["null"];
      return [typeof value, value];
    }),
  );
}

const LOADING = Object.freeze({ rows: Object.freeze([]), loading: true, error: null });

// The rows of a live query: re-rendered after every change to a table it reads, made by
// any tab or arriving from the server. A new `sql` or new `params` values start a new
// query (the previous rows stay until its first result); unmounting stops it.
export function useLiveQuery(db, sql, params) {
  const key = paramsKey(params);
  const [state, setState] = useState(LOADING);
  useEffect(() => {
    if (!db) {
      setState(LOADING);
      return undefined;
    }
    let active = true;
    setState((previous) => (previous.loading ? previous : { ...previous, loading: true }));
    let stop = null;
    try {
      stop = db.live(
        sql,
        params ?? [],
        (rows) => active && setState({ rows, loading: false, error: null }),
        (error) => active && setState({ rows: [], loading: false, error }),
      );
    } catch (error) {
      setState({ rows: [], loading: false, error });
    }
    return () => {
      active = false;
      if (stop) stop();
    };
    // `params` is read through `key`: the query restarts when its values change.
  }, [db, sql, key]);
  return db ? state : LOADING;
}

// The device's sync state, `{ online, pending, serverSeq, caughtUp, schemaVersion, schemaAhead }`,
// re-rendered whenever the worker reports a change; null while `db` is not there.
export function useHearthStatus(db) {
  const [status, setStatus] = useState(() => (db ? db.status() : null));
  useEffect(() => {
    if (!db) {
      setStatus(null);
      return undefined;
    }
    setStatus(db.status());
    return db.on("status", setStatus);
  }, [db]);
  return db ? status : null;
}
