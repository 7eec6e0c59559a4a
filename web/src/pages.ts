// A list the API pages: the items loaded so far, the cursor of the next page, whether the first
// page has come (until then an empty list means nothing yet, not "none"), and the last error as
// a message. `load(null)` reloads the first page; `load(next)` appends the next one.

import { useCallback, useState } from "preact/hooks";
import { api } from "./api";

/** A page of a list: `SlidePage`, `JobPage` and `AuditPage` in the API's document, whose `next`
 * is absent or null on the last page. */
export type Paged<T, C> = { items: T[]; next?: C | null };

export function usePages<T, C>(url: (cursor: C | null) => string) {
  const [items, setItems] = useState<T[]>([]);
  const [next, setNext] = useState<C | null>(null);
  const [error, setError] = useState("");
  const [loaded, setLoaded] = useState(false);
  const load = useCallback(
    async (cursor: C | null) => {
      setError("");
      if (!cursor) setLoaded(false);
      try {
        const page = await api<Paged<T, C>>(url(cursor));
        setItems((all) => (cursor ? [...all, ...page.items] : page.items));
        setNext(page.next ?? null);
        setLoaded(true);
      } catch (e) {
        setError((e as Error).message);
      }
    },
    [url],
  );
  return { items, setItems, next, error, setError, load, loaded };
}
