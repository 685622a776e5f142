// Messages on the page: one node per message (its text, status and usage lines, its actions),
// users' text as plain text, the assistant's as sanitized Markdown; and the partial replies a
// Stop leaves, kept in this tab.

import { t, tn } from "./i18n.js";
import { copyButton, renderMarkdown } from "./markdown.js";
import { el, els, fmt } from "./page.js";

export const rawText = new WeakMap();  // message node -> its text as written (what Copy copies)

// One line of numbers for a reply. Accepts the SSE "done" event's usage + rolechat, or a
// stored message's usage (whatever mix of these keys it has).
export function usageText(usage, extra) {
  const u = Object.assign({}, usage || {}, extra || {});
  const parts = [];
  const completion = u.completion_tokens ?? u.generated_tokens ?? u.tokens;
  if (completion != null) parts.push(t("usage.tokens", { n: completion }));
  const prompt = u.prompt_tokens;
  if (prompt != null) parts.push(t("usage.prompt", { n: prompt }));
  const tps = fmt(u.tokens_per_s, 1);
  if (tps) parts.push(t("usage.speed", { n: tps }));
  const ttft = fmt(u.ttft_s, 2);
  if (ttft) parts.push(t("usage.ttft", { n: ttft }));
  const cached = (u.prompt_tokens_details && u.prompt_tokens_details.cached_tokens)
    ?? u.cached_tokens;
  if (cached != null) parts.push(t("usage.cached", { n: cached }));
  if (u.restored_tokens) parts.push(t("usage.restored", { source: u.kv_source }));
  const turns = u.dropped_turns ?? (u.window && u.window.dropped);  // live, or as stored
  const dropped = Array.isArray(turns) ? turns.length : turns;
  if (dropped) parts.push(tn("usage.dropped", dropped));
  if (u.finish_reason && u.finish_reason !== "stop") {
    parts.push(t("usage.finish", { reason: u.finish_reason }));
  }
  return parts.join(" · ");
}

// Turn indices (from 0) as people number them: 1-based, runs joined ("turns 1, 3–5").
export function turnList(indices) {
  const sorted = [...new Set(indices || [])].filter(Number.isInteger).sort((a, b) => a - b);
  if (!sorted.length) return t("turns.none");
  const runs = [];
  for (const i of sorted) {
    const run = runs[runs.length - 1];
    if (run && i === run[1] + 1) run[1] = i;
    else runs.push([i, i]);
  }
  const comma = t("turns.separator");
  const text = runs.map(([a, b]) => (a === b ? String(a + 1)
    : (b === a + 1 ? (a + 1) + comma + (b + 1) : (a + 1) + "–" + (b + 1)))).join(comma);
  return tn("turns", sorted.length, { list: text });
}

// The lines a slide of the window leaves under a reply: what its summarization cost
// (`usage`: its own usage, or null when the window did not summarize), how many turns it
// folded into the summary, and why turns were dropped without one (`note`, warning colour).
export function addMemoryLines(node, usage, note, folded) {
  if (usage) {
    const secs = fmt(usage.total_s, 1);
    const took = secs ? t("memory.took", { s: secs }) : "";
    addLine(node, "memory-usage", folded ? tn("memory.slid", folded, { took: took })
      : (secs ? t("memory.slidTook", { s: secs }) : t("memory.slidWhile")),
    "memory-usage");
  }
  if (note) addLine(node, "memory-note", t("memory.note", { note: note }), "memory-note");
}

// The text of a message node, rendered: users' as plain text, the assistant's as Markdown.
export function setText(node, text) {
  rawText.set(node, text);
  const content = node.querySelector(".content");
  if (node.dataset.role === "user") content.textContent = text;
  else renderMarkdown(content, text, node.classList.contains("streaming"));
}

// While streaming, render at most once a frame; the view follows the text's end unless the
// reader scrolled up (keepEnd).
const renderQueued = new Set();
export function streamText(node, text) {
  rawText.set(node, text);
  if (renderQueued.has(node)) return;
  renderQueued.add(node);
  requestAnimationFrame(() => {
    renderQueued.delete(node);
    if (node.classList.contains("streaming")) setText(node, rawText.get(node) || "");
    keepEnd();
  });
}

// ----- following the end of the conversation ----------------------------------------------
// The view sticks to the end while it is there: text that grows (a streamed reply, its usage
// line, its actions) keeps the end in sight above the composer; a reader who scrolls up is
// left where they are until they come back down (or send a message).
// The reader's own moves say they went up (a scroll event alone cannot: the page's own
// scrolling to the end makes them too); reaching the end again sticks to it.
let sticky = true;
const away = () => { sticky = false; };
els.messages.addEventListener("wheel", (ev) => { if (ev.deltaY < 0) away(); }, { passive: true });
els.messages.addEventListener("touchmove", away, { passive: true });
els.messages.addEventListener("pointerdown", (ev) => { if (ev.target === els.messages) away(); });
els.messages.addEventListener("keydown", (ev) => {
  if (["ArrowUp", "PageUp", "Home"].includes(ev.key)) away();
});
let lastTop = 0;
els.messages.addEventListener("scroll", () => {
  const top = els.messages.scrollTop;
  if (top > lastTop && nearBottom()) sticky = true;  // down to the end again
  lastTop = top;
}, { passive: true });

export function keepEnd() { if (sticky) scrollDown(); }

export function stickToEnd() { sticky = true; scrollDown(); }

// A line under the message's content (status, usage), above its actions.
export function addLine(node, cls, text, testid) {
  if (!text) return null;
  const line = el("div", cls, text);
  if (testid) line.dataset.testid = testid;
  node.insertBefore(line, node.querySelector(".msg-actions"));
  return line;
}

// ----- a reply that waits for the server ------------------------------------------------
// While every sequence of the server is busy, a streamed reply waits in its queue; a line in
// the reply says how many requests are ahead. That line is the only live region among the
// messages (role="status", polite): it is put there empty before the reply is asked for, so
// a screen reader hears each new count once, and never the streamed text.
export function waitingText(ahead) {
  return ahead > 0 ? t("waiting.ahead", { n: ahead }) : t("waiting.next");
}

export function startWaiting(node) {
  const line = el("div", "waiting");
  line.setAttribute("role", "status");
  line.setAttribute("aria-live", "polite");
  line.dataset.testid = "waiting";
  line.title = t("waiting.title");
  node.insertBefore(line, node.querySelector(".msg-actions"));
}

// `ahead`: how many requests are ahead of this reply (0: it is next).
export function showWaiting(node, ahead) {
  const line = node.querySelector(".waiting");
  if (!line || !Number.isInteger(ahead) || ahead < 0) return;
  const text = waitingText(ahead);
  if (line.textContent !== text) line.textContent = text;  // announced once per change
  node.classList.add("queued");
}

// The reply's first text came, or it ended or was stopped: the line goes.
export function endWaiting(node) {
  node.classList.remove("queued");
  const line = node.querySelector(".waiting");
  if (line) line.remove();
}

// A message's status as the page says it (an unknown one as the server wrote it).
function statusName(status) {
  if (status === "interrupted") return t("status.interrupted");
  if (status === "failed") return t("status.failed");
  if (status === "pending") return t("status.pending");
  if (status === "live") return t("status.live");
  return status;
}

// `note`: what to add, already in the page's language (t("status.stopped")...).
export function markStatus(node, status, note) {
  if (!node) return;
  node.classList.add(status);
  node.dataset.status = status;
  const old = node.querySelector(".status");
  if (old) old.remove();
  const name = statusName(status);
  addLine(node, "status", note ? t("status.withNote", { status: name, note: note }) : name,
          "status");
}

// A reply's tool calls and their results (stored with it, before it): one collapsible card
// per call, its name and arguments in the summary, the arguments and the result inside. All
// of it is text, never markup.
export function addToolCards(steps) {
  const results = new Map();
  for (const step of steps || []) {
    if (step.role === "tool") results.set(step.tool_call_id, step.content);
  }
  for (const step of steps || []) {
    for (const call of step.tool_calls || []) {
      const card = el("details", "tool-card");
      card.dataset.testid = "tool-call";
      const summary = el("summary", "tool-summary");
      summary.appendChild(el("span", "tool-kind", t("tool.call")));
      summary.appendChild(el("span", "tool-name", call.function.name));
      summary.appendChild(el("span", "tool-args", "(" + call.function.arguments + ")"));
      card.appendChild(summary);
      card.appendChild(el("div", "tool-label", t("tool.arguments")));
      card.appendChild(el("pre", "tool-arguments", prettyJson(call.function.arguments)));
      card.appendChild(el("div", "tool-label", t("tool.result")));
      const result = el("pre", "tool-result", results.get(call.id) ?? t("tool.noResult"));
      result.dataset.testid = "tool-result";
      card.appendChild(result);
      els.messages.appendChild(card);
    }
  }
}

function prettyJson(text) {
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch (_) { return text; }
}

// A message node; `id` is its stored id (a reply's id names its turn to undo and retry).
export function addMessage(role, content, status, note, id) {
  const node = el("div", "msg " + (role === "user" ? "user" : "assistant"));
  node.dataset.role = role;
  if (id !== undefined && id !== null) node.dataset.id = String(id);
  node.dataset.testid = "msg-" + role;
  node.appendChild(el("div", "content"));
  const actions = el("div", "msg-actions");
  actions.appendChild(copyButton(t("msg.copy"), () => rawText.get(node) || "", "copy",
                                 role === "user" ? t("msg.copyUser") : t("msg.copyReply")));
  node.appendChild(actions);
  setText(node, content || "");
  if (status && status !== "complete") markStatus(node, status, note);
  const follow = nearBottom();
  els.messages.appendChild(node);
  if (follow) scrollDown();
  return node;
}

export function nearBottom() {
  const m = els.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

export function scrollDown() { els.messages.scrollTop = els.messages.scrollHeight; }

export function clearEmpty() {
  els.messages.querySelectorAll(".empty").forEach((n) => n.remove());
}

// ----- replies cut off by Stop ----------------------------------------------------------
// The server keeps the user's message and the reply so far, both marked interrupted. This tab
// also keeps what it showed (sessionStorage), for a reply the server had not started yet.
const PARTIALS = "rolechat.partial.";

export function loadPartials(cid) {
  try { return JSON.parse(sessionStorage.getItem(PARTIALS + cid) || "[]"); }
  catch (_) { return []; }
}

export function savePartials(cid, list) {
  try {
    if (list.length) sessionStorage.setItem(PARTIALS + cid, JSON.stringify(list));
    else sessionStorage.removeItem(PARTIALS + cid);
  } catch (_) { /* storage full or blocked: the partial reply is not kept */ }
}

export function keepPartial(cid, user, text) {
  savePartials(cid, loadPartials(cid).concat([{ user: user, text: text }]));
}
