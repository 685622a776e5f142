// Following the open conversation: GET /v1/conversations/{id}/events (server/follow.py), read
// with fetch (an EventSource cannot send the API key), reconnected after a pause when it
// breaks. It reports:
// - onVersion(version): the stored conversation changed (this tab, another tab, a REPL);
// - onLive(live): the reply being written now ({kind, text}) or null when none is;
// - onDeleted(): the conversation is gone;
// - onLost() / onBack(): the server stopped answering, then answers again (the page shows a
//   connection-lost state meanwhile). Only one conversation is followed at a time.

import { conversationPath, readSSE, request } from "./api.js";

// Pauses before reconnecting (ms), the last one repeated.
const BACKOFF = [500, 1000, 2000, 4000];

let current = null;  // { cid, abort: AbortController }

// Follows conversation `cid` (stops following the previous one); `on` holds the callbacks.
export function follow(cid, on) {
  unfollow();
  const me = { cid, abort: new AbortController(), lost: false };
  current = me;
  run(me, on);
}

// The conversation followed now (null: none).
export function following() { return current ? current.cid : null; }

export function unfollow() {
  if (current) current.abort.abort();
  current = null;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

async function run(me, on) {
  let failures = 0;
  while (!me.abort.signal.aborted) {
    let deleted = false;
    try {
      const response = await request(conversationPath(me.cid, "events"),
                                     { signal: me.abort.signal, cache: "no-store" });
      if (response.status === 404) { deleted = true; }
      else if (response.ok) {
        if (me.lost) { me.lost = false; on.onBack && on.onBack(); }
        failures = 0;
        await readSSE(response, (event) => {
          if (me.abort.signal.aborted) return;
          if (event.deleted) { deleted = true; return; }
          if ("live" in event) on.onLive && on.onLive(event.live);
          if ("version" in event) on.onVersion && on.onVersion(event.version);
        });
      }
    } catch (_) {
      if (me.abort.signal.aborted) return;
    }
    if (me.abort.signal.aborted) return;
    if (deleted) { on.onDeleted && on.onDeleted(); return; }
    // The stream ended or broke: a server restart, a network blip. Say so after the first
    // failed attempt to come back (a plain reconnect is not "lost").
    failures += 1;
    if (failures >= 2 && !me.lost) { me.lost = true; on.onLost && on.onLost(); }
    await sleep(BACKOFF[Math.min(failures - 1, BACKOFF.length - 1)], me.abort.signal);
  }
}
