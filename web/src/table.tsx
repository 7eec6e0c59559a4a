// A table's caption and header row, the same on every page: a visually hidden caption, and a
// last column for actions named only for screen readers when `actions` is set.

export function TableHead(props: { caption: string; columns: string[]; actions?: boolean }) {
  return (
    <>
      <caption class="visually-hidden">{props.caption}</caption>
      <thead>
        <tr>
          {props.columns.map((c) => (
            <th key={c} scope="col">
              {c}
            </th>
          ))}
          {props.actions && (
            <th scope="col">
              <span class="visually-hidden">Actions</span>
            </th>
          )}
        </tr>
      </thead>
    </>
  );
}
