// Saving what the API answers as a file. A result is fetched with the Bearer token (its
// endpoint redirects to a short-lived signed URL), then handed to the browser as a blob link
// with a file name, so that nothing needs the token in a URL.

import { bearer, problemOf } from "./api";

/** Offers `blob` to the user as a file named `name`. */
export function saveBlob(blob: Blob, name: string): void {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  a.hidden = true;
  document.body.append(a);
  a.click();
  a.remove();
  // The download has taken the blob once the click is handled.
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}

/** Fetches `url` with the Bearer token and saves it as `name`; throws an `ApiError` on a refusal. */
export async function download(url: string, name: string): Promise<void> {
  const res = await fetch(url, { headers: bearer() });
  if (!res.ok) throw await problemOf(res);
  saveBlob(await res.blob(), name);
}
