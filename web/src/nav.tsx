// Routing: the path is the state; links push it. The shell (app.tsx) shows the page for the
// path (usePath); the pages link to each other (Link) and move on (navigate), and each names
// itself and takes the keyboard to its heading (useHeading).

import type { ComponentChildren, RefObject } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";

type RouteListener = (path: string) => void;
const routeListeners = new Set<RouteListener>();

export function navigate(path: string): void {
  if (path !== location.pathname + location.search) history.pushState(null, "", path);
  for (const l of routeListeners) l(location.pathname);
}

export function usePath(): string {
  const [path, setPath] = useState(location.pathname);
  useEffect(() => {
    const l = (p: string) => setPath(p);
    const pop = () => setPath(location.pathname);
    routeListeners.add(l);
    addEventListener("popstate", pop);
    return () => {
      routeListeners.delete(l);
      removeEventListener("popstate", pop);
    };
  }, []);
  return path;
}

export function Link(props: { href: string; children: ComponentChildren; class?: string }) {
  return (
    <a
      href={props.href}
      class={props.class}
      onClick={(e) => {
        if (e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
        e.preventDefault();
        navigate(props.href);
      }}
    >
      {props.children}
    </a>
  );
}

/** Names the page in the tab ("Jobs · Mira") and, the first time its heading is shown, moves the
 * keyboard there: after a link is followed, a screen reader says where it now is, and Tab goes
 * on from the top of the new page, not from a link of the old one. The keyboard is left alone
 * when it is in the page already (a form the page opened with the focus in it). The heading
 * takes the ref and `tabIndex={-1}`. */
export function useHeading(title: string | null): RefObject<HTMLHeadingElement> {
  const heading = useRef<HTMLHeadingElement>(null);
  const moved = useRef(false);
  useEffect(() => {
    if (title) document.title = `${title} · Mira`;
  }, [title]);
  useEffect(() => {
    const h = heading.current;
    if (moved.current || !h) return;
    moved.current = true;
    const active = document.activeElement;
    const page = h.closest("main");
    if (active && active !== document.body && page?.contains(active)) return;
    h.focus();
  });
  return heading;
}
