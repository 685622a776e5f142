// Search over the user's conversations: Ctrl+K (⌘K) or the sidebar's Search button opens a
// modal dialog (index.html's #search-dialog) with a labelled combobox input and a listbox of
// hits. Typing searches through GET /v1/conversations?q= (debounced; an answer to an older
// query is dropped). ↑/↓ move through the hits, Enter (or a click) opens one, Esc closes, and
// focus goes back where it was. Opening a hit loads its conversation (app.js's open, passed to
// wireSearch) and scrolls to the matched message, marked for a moment (.search-found).
// SAFETY: titles and snippets are server text: set only through textContent (el(), text
// nodes); the marked parts are <mark> elements made here, never markup from the server.

import { api } from "./api.js";
import { onLanguageChange, t, tn } from "./i18n.js";
import { el, state } from "./page.js";

const DEBOUNCE_MS = 200;
const FLASH_MS = 2500;
const LIMIT = 30;

const $ = (id) => document.getElementById(id);
let dialog, input, list, status;
let openConversation = async () => {};
let timer = null;
let seq = 0;
let hits = [];       // [{conv, hit}], in the listbox's order
let active = -1;     // the highlighted hit (aria-activedescendant), -1: none
let returnFocus = null;
let shownError = null;  // the search's error (server text), shown instead of the count

// `open(cid)`: loads conversation `cid` in the page (resolves when it is shown).
export function wireSearch(open) {
  openConversation = open;
  dialog = $("search-dialog");
  input = $("search-input");
  list = $("search-results");
  status = $("search-status");
  $("search-open").addEventListener("click", show);
  document.addEventListener("keydown", (ev) => {
    if ((ev.ctrlKey || ev.metaKey) && !ev.altKey && !ev.shiftKey
        && ev.key.toLowerCase() === "k") {
      ev.preventDefault();
      if (dialog.open) input.select();
      else show();
    }
  });
  // Esc closes the search first, and only that (keys.js's Esc would stop a reply being written).
  window.addEventListener("keydown", (ev) => {
    if (ev.key !== "Escape" || !dialog.open || ev.isComposing) return;
    ev.preventDefault();
    ev.stopPropagation();
    dialog.close();
  }, true);
  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(run, DEBOUNCE_MS);
  });
  input.addEventListener("keydown", onKey);
  onLanguageChange(() => {  // the hits' roles and the count, in the language chosen
    if (dialog.dataset.state === "done" && !shownError) render(hits, dialog.dataset.query || "");
  });
  dialog.addEventListener("click", (ev) => { if (ev.target === dialog) dialog.close(); });
  dialog.addEventListener("close", () => {
    clearTimeout(timer);
    const back = returnFocus;
    returnFocus = null;
    if (back && back.isConnected) back.focus();
  });
}

function show() {
  if (dialog.open) return;
  returnFocus = document.activeElement;
  dialog.showModal();
  input.focus();
  input.select();
  if (input.value.trim()) run();  // the last search again: the conversations may have changed
}

function onKey(ev) {
  if (ev.isComposing) return;  // an input method (Chinese, Japanese) is choosing characters
  if (ev.key === "ArrowDown" || ev.key === "ArrowUp") {
    ev.preventDefault();
    if (!hits.length) return;
    const step = ev.key === "ArrowDown" ? 1 : -1;
    select(active < 0 ? (step > 0 ? 0 : hits.length - 1)
      : (active + step + hits.length) % hits.length);
  } else if (ev.key === "Enter") {
    ev.preventDefault();
    enter();
  }
}

// Enter opens the highlighted hit; typed faster than the debounce, it searches first.
async function enter() {
  if (dialog.dataset.query !== input.value.trim()) await run();
  if (hits.length) choose(active < 0 ? 0 : active);
}

async function run() {
  clearTimeout(timer);
  timer = null;
  const q = input.value.trim();
  const mine = ++seq;
  if (!q) {
    render([], "");
    return;
  }
  dialog.dataset.state = "searching";
  try {
    const body = await api("/conversations?q=" + encodeURIComponent(q) + "&limit=" + LIMIT);
    if (mine !== seq) return;
    const found = [];
    for (const conv of (body && body.data) || []) {
      for (const hit of conv.hits || []) found.push({ conv, hit });
    }
    render(found, q);
  } catch (err) {
    if (mine !== seq) return;
    render([], q);
    shownError = err.message;
    status.textContent = err.message;
  }
}

function roleName(role) {
  if (role === "user") return t("search.role.user");
  if (role === "assistant") return t("search.role.assistant");
  return t("search.role.title");
}

function render(found, q) {
  hits = found;
  shownError = null;
  list.replaceChildren();
  found.forEach(({ conv, hit }, index) => {
    const option = el("li", "search-hit");
    option.id = "search-hit-" + index;
    option.setAttribute("role", "option");
    option.setAttribute("aria-selected", "false");
    option.dataset.testid = "search-hit";
    option.dataset.cid = String(conv.id);
    if (hit.message_id !== null && hit.message_id !== undefined) {
      option.dataset.messageId = String(hit.message_id);
    }
    const head = el("div", "search-hit-head");
    head.appendChild(el("span", "search-hit-title", conv.title || t("conv.untitledShort")));
    head.appendChild(el("span", "search-hit-role", roleName(hit.role)));
    option.appendChild(head);
    const snippet = el("div", "search-hit-snippet");
    snippet.dataset.testid = "search-snippet";
    for (const part of hit.parts || []) {
      snippet.appendChild(part.match ? el("mark", null, part.text)
        : document.createTextNode(String(part.text)));
    }
    option.appendChild(snippet);
    option.addEventListener("mousedown", (ev) => ev.preventDefault());  // focus stays put
    option.addEventListener("click", () => choose(index));
    list.appendChild(option);
  });
  input.setAttribute("aria-expanded", String(found.length > 0));
  select(found.length ? 0 : -1);
  status.textContent = !q ? ""
    : found.length ? tn("search.matches", found.length)
      : t("search.nothing", { q: q });
  dialog.dataset.query = q;
  dialog.dataset.state = "done";
}

function select(index) {
  active = index;
  [...list.children].forEach((node, i) => {
    node.setAttribute("aria-selected", String(i === index));
  });
  const node = index >= 0 ? list.children[index] : null;
  if (node) {
    input.setAttribute("aria-activedescendant", node.id);
    node.scrollIntoView({ block: "nearest" });
  } else {
    input.removeAttribute("aria-activedescendant");
  }
}

async function choose(index) {
  const found = hits[index];
  if (!found) return;
  returnFocus = null;  // focus goes to the conversation opened, not back
  dialog.close();
  await openConversation(found.conv.id);
  if (String(state.cid) !== String(found.conv.id)) return;  // not opened (a reply streams)
  reveal(found.hit.message_id);
}

// The matched message: scrolled to the middle of the view, focused, and marked a moment.
function reveal(messageId) {
  if (messageId === null || messageId === undefined) return;
  const node = document.querySelector(
    "#messages .msg[data-id='" + CSS.escape(String(messageId)) + "']");
  if (!node) return;
  node.scrollIntoView({ block: "center" });
  node.tabIndex = -1;
  node.focus({ preventScroll: true });
  node.classList.add("search-found");
  setTimeout(() => node.classList.remove("search-found"), FLASH_MS);
}
