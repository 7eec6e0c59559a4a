// Routing: the path is the state; links push it. The shell (app.tsx) shows the page for the
// path (usePath); the pages link to each other (Link) and move on (navigate).

import type { ComponentChildren } from "preact";
import { useEffect, useState } from "preact/hooks";

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
