// Types for Hearth's browser API, served by every Hearth server at /hearth.d.ts.
//
// It describes three ways in, which share one set of types (the `Hearth` namespace):
//   - the script tag: <script src="https://HOST/hearth.js"></script> defines window.Hearth;
//   - the ES module:  import { open } from "https://HOST/hearth.mjs"  (or "hearth" through an
//                     import map or bundler alias);
//   - the React hooks: import { useLiveQuery, useHearthStatus } from "https://HOST/hearth-react.mjs"
//                     (or "hearth/react").
//
// Use: save this file beside your sources and list it in tsconfig.json ("files" or "include"),
// or `/// <reference path="./hearth.d.ts" />`. Imports by URL ending in /hearth.mjs or
// /hearth-react.mjs, and the bare names "hearth" and "hearth/react", all get these types.
//
// Values cross as plain JS values: SQL NULL is null, INTEGER a number (a bigint beyond
// 2^53), REAL a number, TEXT a string, BLOB a Uint8Array. Every error is an Error named
// "HearthError" with a stable `code` (see Hearth.ErrorCode).

declare namespace Hearth {
  /** A value as it comes out of SQL. */
  type Value = null | number | bigint | string | Uint8Array;

  /**
   * A value as it may go into SQL: a Value, or `undefined` (NULL), a boolean (1 or 0) or an
   * ArrayBuffer (a BLOB). Integral numbers are stored as INTEGER, others as REAL.
   */
  type Param = Value | undefined | boolean | ArrayBuffer;

  /** One row of a result, keyed by column name. */
  type Row = Record<string, Value>;

  /** Every `code` a HearthError can carry. Spellings never change. */
  type ErrorCode =
    | "SQL_ERROR"
    | "STORAGE"
    | "PROTOCOL"
    | "VERSION_MISMATCH"
    | "BUSY"
    | "CLOSED"
    | "INVALID_ARGUMENT"
    | "OFFLINE"
    | "REJECTED"
    | "NO_SCHEMA"
    | "OUTBOX_FULL"
    | "TOO_LARGE"
    | "SCHEMA"
    | "SERVER"
    | "BAD_SUBSCRIPTION"
    | "TOO_MANY_SUBSCRIPTIONS"
    | "BAD_ROOM"
    | "PRESENCE_TOO_LARGE"
    | "MESSAGE_TOO_LARGE"
    | "BAD_JSON"
    | "TOO_MANY_ROOMS"
    | "ROOM_FULL"
    | "NOT_IN_ROOM"
    | "AUTH"
    | "AUTH_EXPIRED"
    | "AUTH_USER_CHANGED"
    /** `discard`: the write already settled (applied or rejected). */
    | "NOT_PENDING"
    /** `discard`: the write was sent, so the server may already have it. */
    | "SENT"
    /** `settled`: no write with this number was made on this device. */
    | "UNKNOWN_MUTATION";

  /** Every error Hearth raises or passes to a callback. */
  interface HearthError extends Error {
    name: "HearthError";
    code: ErrorCode;
  }

  /** The error of the "rejected" event: the server refused a write and it was undone. */
  interface RejectedError extends HearthError {
    code: "REJECTED";
    /** The refused write's number (as `exec` resolved it). */
    mutation: number;
    /** The server's code for the refusal (for example a schema CHECK's or a validator's). */
    serverCode: string;
    /** The server's reason, for people. */
    reason: string;
    /** The rows the refusal rolled back on this device. */
    undone: RowRef[];
  }

  /** A row by its table and primary key (Hearth tables have a one-column primary key). */
  interface RowRef {
    table: string;
    key: Value;
  }

  /** The server's verdict on one write. A write the app discarded settles as rejected with code "DISCARDED". */
  type Verdict =
    | { status: "applied"; serverSeq: number }
    | { status: "rejected"; code: string; reason: string; undone: RowRef[] }
    /** Only from an `exec` that changed no synced row (`mutation: null`): nothing to settle. */
    | { status: "local" };

  /** What `exec`, `editText` and `resolve` resolve to, once the write is durable on this device. */
  interface ExecResult {
    /** The write's number on this device (for `settled` and `discard`); null when no synced row changed. */
    mutation: number | null;
    rowsAffected: number;
    /** The server's verdict, whenever it comes (after a reload: `db.settled(mutation)`). */
    settled: Promise<Verdict>;
  }

  /** One write of the outbox, as `pending()` lists it. */
  interface PendingWrite {
    mutation: number;
    tables: string[];
    rows: RowRef[];
    /** When the write was made, in ms since the epoch. */
    madeAt: number;
    /** How many times it was sent. */
    attempts: number;
    /** Whether the server may already have it (then it can no longer be discarded). */
    sent: boolean;
  }

  /** The device's sync state, as `status()` returns it and the "status" event passes it. */
  interface Status {
    /** The worker holds an open connection to the server. */
    online: boolean;
    /** Local writes the server has not yet confirmed. */
    pending: number;
    /** The newest server log entry this device has. */
    serverSeq: number;
    /** The device has every change the server had when it last connected. */
    caughtUp: boolean;
    /** The schema's version, or null before the first sync of a new device. */
    schemaVersion: number | null;
    /**
     * The server's schema is older than this device's (`SCHEMA_AHEAD`): nothing is sent,
     * writes wait, and the worker retries (with backoff) until the server has its version.
     */
    schemaAhead: boolean;
  }

  /** One edit of `editText`: at `index` delete `delete` characters, then insert `insert`. */
  interface TextEdit {
    /** In Unicode code points, not UTF-16 units: "🦀" is one. */
    index: number;
    /** Code points to delete (default 0). */
    delete?: number;
    /** Text to insert (default ""). */
    insert?: string;
  }

  interface OpenOptions {
    /** The sync endpoint, a ws: or wss: URL. Default: `sync` beside hearth.js (ws: for http:, wss: for https:). */
    server?: string;
    /** The database's name on this device (default "default"); tabs opening the same name share it. */
    name?: string;
    /**
     * The user's token (a JWT) for a server whose schema has [auth], or a function giving one;
     * a function is asked again whenever the server refuses the token or it expires.
     */
    token?: string | (() => string | Promise<string>);
    /** Let a token for another user wipe this device's database and start anew (else AUTH_USER_CHANGED). */
    reset?: boolean;
    /**
     * The URL of a copy of the server's /hearth-worker.js on the page's own origin, for a
     * page served from another origin than the sync server (a SharedWorker must be
     * same-origin with its page). Default: hearth-worker.js beside hearth.js.
     */
    workerUrl?: string | URL;
  }

  interface ProgressEvent {
    /** Rows loaded so far. */
    rows: number;
    /** The initial load is complete. */
    done: boolean;
  }

  /** The device's hold on a stream, as `subscribe` resolves it. */
  interface Subscription {
    /** The device's id for this stream and parameters (the same in every tab). */
    readonly id: string;
    readonly stream: string;
    readonly params: StreamParams;
    /** Releases this tab's hold; the last hold's release removes the rows no other subscription holds. */
    unsubscribe(): Promise<void>;
    on(kind: "progress", callback: (event: ProgressEvent) => void): () => void;
  }

  /** What `subscribe` returns: a promise of the subscription that already takes progress callbacks. */
  interface PendingSubscription extends Promise<Subscription> {
    on(kind: "progress", callback: (event: ProgressEvent) => void): void;
  }

  /** A stream's parameters: name to value, an array for `IN :name`. */
  type StreamParams = Record<string, Param | Param[]>;

  /** One of the device's subscriptions, as `subscriptions()` lists them. */
  interface SubscriptionInfo {
    id: string;
    stream: string;
    params: Record<string, Value | Value[]>;
    loaded: boolean;
    rows: number;
    /** Tabs holding it (0: none since a restart, or its tabs closed). */
    tabs: number;
  }

  type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

  /** One member of a room (each tab is a member of its own). */
  interface RoomMember<State = Json> {
    clientId: string;
    tab: number;
    state: State;
    /** When it joined, in ms since the epoch (the server's clock). */
    since: number;
    /** This tab. */
    me: boolean;
  }

  /** Presence and broadcast, ephemeral: never stored on the device or the server. */
  interface Room<State = Json, Message = Json> {
    readonly name: string;
    /** Joins with `state`, or changes this tab's state. */
    setPresence(state: State): Promise<void>;
    /** Broadcasts to the other members, fire and forget; latest wins per sender. */
    send(message: Message): Promise<void>;
    leave(): Promise<void>;
    on(kind: "presence", callback: (members: RoomMember<State>[]) => void): () => void;
    on(kind: "message", callback: (message: Message, from: { clientId: string; tab: number }) => void): () => void;
    on(kind: "error", callback: (error: HearthError) => void): () => void;
  }

  /**
   * One tab's handle on a database. Queries may call the SQL function
   * `hearth_pending(table, key)`: 1 while a local write to that row awaits the server,
   * else 0 (it works in live queries too).
   */
  interface Database {
    readonly name: string;
    readonly server: string;
    /** Runs SQL in one local transaction (one write for the server). */
    exec(sql: string, params?: Param[]): Promise<ExecResult>;
    /** Edits a `text` column by position; positions count code points. */
    editText(table: string, key: Param, column: string, edits: TextEdit[]): Promise<ExecResult>;
    /** Closes an open manual-merge conflict (a hearth_conflicts row) by writing `value`. */
    resolve(conflictId: string, value: Param): Promise<ExecResult>;
    query<R extends Row = Row>(sql: string, params?: Param[]): Promise<R[]>;
    /** Calls `callback(rows)` at once and after every change to a table it reads; returns a function that stops it. */
    live<R extends Row = Row>(
      sql: string,
      params: Param[] | undefined,
      callback: (rows: R[]) => void,
      onError?: (error: HearthError) => void,
    ): () => void;
    /** The sync state as the worker last said it (not a promise). */
    status(): Status;
    /** The server's verdict on write `mutation` of this device (UNKNOWN_MUTATION when there is none); never `local`. */
    settled(mutation: number): Promise<Exclude<Verdict, { status: "local" }>>;
    /** The outbox: writes the server has not confirmed, oldest first. */
    pending(): Promise<PendingWrite[]>;
    /** Drops a pending write: rolled back here, never sent, every tab told. Rejects with NOT_PENDING or SENT. */
    discard(mutation: number): Promise<{ undone: RowRef[] }>;
    on(kind: "status", callback: (status: Status) => void): () => void;
    on(kind: "change", callback: (change: { tables: string[] }) => void): () => void;
    on(kind: "rejected", callback: (error: RejectedError) => void): () => void;
    /** The server refused the token, or it expired (code AUTH, AUTH_EXPIRED or AUTH_USER_CHANGED). */
    on(kind: "auth", callback: (error: HearthError) => void): () => void;
    /** Resolves once every local write reached the server and the device caught up; OFFLINE after the timeout (default 10 s). */
    sync(options?: { timeoutMs?: number }): Promise<Status>;
    subscribe(
      stream: string,
      params?: StreamParams,
      options?: { onProgress?: (event: ProgressEvent) => void },
    ): PendingSubscription;
    subscriptions(): Promise<SubscriptionInfo[]>;
    room<State = Json, Message = Json>(name: string): Room<State, Message>;
    /** Closes this tab's connection; other tabs keep theirs. */
    close(): void;
  }

  /** Opens (or joins, if another tab did) a database; resolves once it has its schema. */
  function open(options?: OpenOptions): Promise<Database>;

  /** What `useLiveQuery` returns. */
  interface LiveQueryResult<R extends Row = Row> {
    /** The latest rows ([] until the first result). */
    rows: R[];
    /** True until the first result for the current query (and while `db` is not there yet). */
    loading: boolean;
    /** The query's error, if it failed. */
    error: HearthError | null;
  }
}

interface Window {
  /** Defined by <script src="https://HOST/hearth.js">. */
  readonly Hearth: { open: typeof Hearth.open };
}

/** hearth.mjs: the same API as window.Hearth, as an ES module. */
declare module "hearth" {
  export const open: typeof Hearth.open;
  const hearth: { open: typeof Hearth.open };
  export default hearth;
}
declare module "*/hearth.mjs" {
  export const open: typeof Hearth.open;
  const hearth: { open: typeof Hearth.open };
  export default hearth;
}

/**
 * hearth-react.mjs: React hooks. It imports React as "react", so the app's import map or
 * bundler provides React (the app's own copy; Hearth bundles none).
 */
declare module "hearth/react" {
  /**
   * The rows of a live query, re-rendered on every change any tab or the server makes to a
   * table it reads. `db` may be null or undefined while it opens. A new `sql` or new
   * `params` values (compared by value) start a new query; unmounting stops it.
   */
  export function useLiveQuery<R extends Hearth.Row = Hearth.Row>(
    db: Hearth.Database | null | undefined,
    sql: string,
    params?: Hearth.Param[],
  ): Hearth.LiveQueryResult<R>;
  /** The sync state (online, pending writes, ...), re-rendered on each change; null while `db` is not there. */
  export function useHearthStatus(db: Hearth.Database | null | undefined): Hearth.Status | null;
}
declare module "*/hearth-react.mjs" {
  export { useLiveQuery, useHearthStatus } from "hearth/react";
}
