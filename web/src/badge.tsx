// A status in words, as a badge: slides' and jobs' statuses look alike on every page. The colour
// only repeats what the words say.

export function Badge(props: { status: string }) {
  return <span class={`badge badge-${props.status}`}>{props.status.replace(/_/g, " ")}</span>;
}
