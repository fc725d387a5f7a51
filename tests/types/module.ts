// An app on the ES module: by URL, or as "hearth" through an import map or bundler alias.
import { open } from "http://127.0.0.1:8787/hearth.mjs";
import Hearth_, { open as openByName } from "hearth";

export async function module(): Promise<number> {
  const db = await open({ name: "todos" });
  const again = await openByName({ name: "todos" });
  const third = await Hearth_.open();
  const [{ n }] = await db.query<{ n: number }>("SELECT count(*) AS n FROM todos");
  again.close();
  third.close();
  return n;
}
