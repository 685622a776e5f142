// rolechat web chat page: the conversation list, the chat, per-message actions (copy,
// regenerate, edit and resend, undo, pin) and per-conversation ones (rename, system prompt,
// memory, export, the exact prompt and the window's plan). Plain ES modules, no build step,
// nothing loaded from elsewhere. The model picker is models.js.
// SAFETY: user text is only ever set through textContent; assistant text only through
// renderMarkdown (markdown.js: marked, then DOMPurify, always).
// Other tabs and windows write to the same conversations: Regenerate, Undo and Edit name the
// turn they act on (the id of the last reply shown); if it changed elsewhere first (409), the
// page shows the stored conversation again with a note saying so, and nothing is changed.
// The open conversation is followed (follow.js): a change stored by anyone is shown at once,
// and a reply being written that this tab did not send (another tab's, or this tab's before a
// reload: replies are sent detached, so they outlive the page) shows as it is written, with
// Stop. A reply whose message was interrupted (Stop, a crash) offers Retry; the server not
// answering shows a connection-lost line until it is back, with Resend for a failed message.

import { api, apiError, apiKey, conversationPath, isChanged, onKeyNeeded, readSSE, request }
  from "./api.js";
import { download, exportText } from "./exporting.js";
import { follow, following, unfollow } from "./follow.js";
import { onLanguageChange, t, tn, translatePage, wireLanguage } from "./i18n.js";
import { announce, setTitle, wireKeys, wireMenus } from "./keys.js";
import { announceLoad, refreshModels, wireModels, withModel } from "./models.js";
import { addLine, addMemoryLines, addMessage, addToolCards, clearEmpty, endWaiting,
         keepEnd, keepPartial, loadPartials, markStatus, nearBottom, rawText, savePartials, scrollDown,
         setText, showWaiting, stickToEnd,
         startWaiting, streamText, turnList, usageText } from "./messages.js";
import { act, button, el, els, showError, showNotice, state } from "./page.js";
import { wireSearch } from "./search.js";

// ----- the API key ------------------------------------------------------------------------
function askKey(message) {
  els.keyBox.hidden = false;
  showError(message || t("key.needed"));
  els.apiKey.focus();
  return new Promise((resolve) => state.keyWaiters.push(resolve));
}

function saveKey() {
  const key = els.apiKey.value.trim();
  if (!key) return;
  apiKey.set(key, els.apiKeyRemember.checked);
  els.keyBox.hidden = true;
  els.apiKey.value = "";
  showError("");
  state.keyWaiters.splice(0).forEach((resolve) => resolve(key));
}

// ----- memory: pinned turns and the running summary ------------------------------------------
function memoryOf(conv) {
  return (conv && conv.memory && typeof conv.memory === "object") ? conv.memory : {};
}

function pinsOf(conv) {
  const pins = memoryOf(conv).pins;
  return Array.isArray(pins) ? pins.filter(Number.isInteger) : [];
}

// The replies of the completed turns on the page, in order (the n-th is turn n, from 0): a
// reply with no status right after a user message with none. Interrupted, failed and
// kept-in-this-tab messages are not turns.
function completedReplies() {
  return [...els.messages.querySelectorAll(".msg.assistant")].filter((n) => {
    const asked = n.previousElementSibling;
    return !n.dataset.status && !n.hidden && asked && asked.dataset.role === "user"
      && !asked.dataset.status;
  });
}

// Pin/Unpin on every completed turn's reply, and the pinned turns marked (a pin badge on the
// reply, the "pinned" class on both its messages). Only when the page shows exactly the
// stored turns, so a pin always names the turn it is next to.
function refreshPins() {
  els.messages.querySelectorAll(".pin-badge").forEach((n) => n.remove());
  els.messages.querySelectorAll(".msg.pinned").forEach((n) => n.classList.remove("pinned"));
  els.messages.querySelectorAll(".msg[data-turn]").forEach((n) => delete n.dataset.turn);
  if (state.cid === null || state.streaming || !state.conv) return;
  const replies = completedReplies();
  if (replies.length !== state.conv.turns) return;
  const pins = new Set(pinsOf(state.conv));
  replies.forEach((reply, index) => {
    const asked = reply.previousElementSibling;
    reply.dataset.turn = asked.dataset.turn = String(index);
    const pinned = pins.has(index);
    const label = t("turn.name", { n: index + 1 });
    const pin = button(pinned ? t("pin.unpin") : t("pin.pin"), "pin", () => togglePin(index),
                       pinned ? t("pin.unpinTitle", { turn: label })
                         : t("pin.pinTitle", { turn: label }));
    pin.setAttribute("aria-pressed", String(pinned));
    pin.classList.add("turn-action");
    reply.querySelector(".msg-actions").appendChild(pin);
    if (pinned) {
      reply.classList.add("pinned");
      asked.classList.add("pinned");
      const badge = el("span", "pin-badge", t("pin.badge"));
      badge.dataset.testid = "pin-badge";
      badge.title = t("pin.badgeTitle", { turn: label });
      reply.insertBefore(badge, reply.firstChild);
    }
  });
}

async function togglePin(index) {
  if (state.streaming || state.cid === null || !state.conv) return;
  const pins = new Set(pinsOf(state.conv));
  if (pins.has(index)) pins.delete(index);
  else pins.add(index);
  showError("");
  try {
    state.conv = await api(conversationPath(state.cid), {
      method: "PATCH", body: { pins: [...pins].sort((a, b) => a - b) } });
  } catch (err) {
    showError(err.message);
  }
  refreshTurnActions();
  await refreshPrompt();
}

// The ⋯ menu's "Summarize dropped turns" switch shows the conversation's memory mode.
function refreshMemory() {
  const on = memoryOf(state.conv).mode === "summary";
  els.memoryToggle.disabled = state.cid === null;
  els.memoryToggle.setAttribute("aria-checked", String(on));
  els.memoryToggle.textContent = on ? t("menu.memoryOn") : t("menu.memoryOff");
}

async function toggleMemory() {
  closeMenu();
  if (state.streaming || state.cid === null) return;
  const on = memoryOf(state.conv).mode === "summary";
  showError("");
  try {
    state.conv = await api(conversationPath(state.cid), {
      method: "PATCH", body: { memory: on ? "none" : "summary" } });
  } catch (err) {
    showError(err.message);
  }
  refreshMemory();
  await refreshPrompt();
}

// The turns the conversation's summary covered before this reply (to tell the new ones).
function summarizedBefore() {
  const memory = memoryOf(state.conv);
  if (!memory.summary) return new Set();
  const pins = new Set(pinsOf(state.conv));
  const covered = [];
  for (let i = 0; i < (memory.covers || 0); i++) if (!pins.has(i)) covered.push(i);
  return new Set(covered);
}

function folded(now, before) {
  return (Array.isArray(now) ? now : []).filter((i) => !before.has(i)).length;
}

// Regenerate and Undo on the last complete reply, Edit on the message it answers. These are
// the stored conversation's last turn (interrupted messages are not part of it). Pin/Unpin on
// every completed turn.
function refreshTurnActions() {
  els.messages.querySelectorAll(".turn-action").forEach((n) => n.remove());
  refreshPins();
  if (state.cid === null || state.streaming || state.live) return;
  const users = [...els.messages.querySelectorAll(".msg.user")];
  const lastUser = users[users.length - 1];
  if (lastUser && lastUser.dataset.status === "interrupted") {
    const again = button(t("action.retryMessage"), "retry-message",
                         () => retryMessage(lastUser), t("action.retryMessageTitle"));
    again.classList.add("turn-action");
    lastUser.querySelector(".msg-actions").appendChild(again);
    const stopped = lastUser.nextElementSibling;  // its reply, stopped: it may go on
    if (stopped && stopped.dataset.role === "assistant" && stopped.dataset.id
        && stopped.dataset.status === "interrupted" && !stopped.nextElementSibling) {
      const more = button(t("action.continue"), "continue", () => continueReply(stopped),
                          t("action.continueStoppedTitle"));
      more.classList.add("turn-action");
      stopped.querySelector(".msg-actions").appendChild(more);
    }
  }
  const replies = [...els.messages.querySelectorAll(".msg.assistant")]
    .filter((n) => !n.dataset.status);
  const last = replies[replies.length - 1];
  if (!last) return;
  const add = (node, b) => {
    b.classList.add("turn-action");
    node.querySelector(".msg-actions").appendChild(b);
  };
  if (last.dataset.finish === "length") {  // cut at max new tokens: it can go on
    add(last, button(t("action.continue"), "continue", continueReply,
                     t("action.continueTitle")));
  }
  add(last, button(t("action.regenerate"), "retry", retry, t("action.regenerateTitle")));
  add(last, button(t("action.undo"), "undo", undo, t("action.undoTitle")));
  // Edit on every message you sent: sending the edit starts a new version from there.
  for (const asked of els.messages.querySelectorAll(".msg.user")) {
    if (asked.dataset.status || !asked.dataset.id) continue;
    add(asked, button(t("action.edit"), "edit", () => startEdit(asked), t("action.editTitle")));
  }
}

// ----- the conversation -------------------------------------------------------------------
function renderConversation(conv) {
  // The same conversation shown again (a change made elsewhere): a rename being typed stays.
  const same = conv && state.conv && String(state.conv.id) === String(conv.id);
  state.conv = conv;
  state.shown = conv ? conv.version : null;  // the version the messages on the page show
  if (!same) endRename();
  els.messages.replaceChildren();
  liveNode = null;
  if (!conv) { unfollow(); setLive(null); }
  else if (String(following()) !== String(conv.id)) { setLive(null); startFollowing(conv.id); }
  els.title.textContent = conv ? (conv.title || t("conv.untitled")) : t("conv.new");
  setTitle(conv ? (conv.title || t("conv.untitled")) : "");
  els.rename.disabled = els.exportMd.disabled = els.exportJson.disabled = !conv;
  refreshMemory();
  if (!conv) {
    els.messages.appendChild(el("p", "empty", t("conv.empty")));
    return;
  }
  const partials = loadPartials(conv.id);
  const shown = [];
  let summarized = new Set();  // the turns the summary covered after the previous reply
  const messages = conv.messages || [];
  messages.forEach((m, index) => {
    if (m.steps) addToolCards(m.steps);
    const node = addMessage(m.role, m.content, m.status, undefined, m.id);
    if (m.usage && m.usage.finish_reason) node.dataset.finish = m.usage.finish_reason;
    if (m.versions) addVersions(node, m.versions);
    if (m.role === "assistant" && m.usage) {
      addLine(node, "usage", usageText(m.usage), "usage");
      const plan = m.usage.window;
      if (plan && typeof plan === "object") {
        addMemoryLines(node, plan.summary_usage, plan.memory_note,
                       folded(plan.summarized, summarized));
        if (Array.isArray(plan.summarized)) summarized = new Set(plan.summarized);
      }
    }
    const next = messages[index + 1];
    const stored = next && next.role === "assistant" && next.status === "interrupted";
    if (m.role === "user" && !stored && m.status === "interrupted") {
      // The server keeps a stopped reply's text; a partial kept by this tab covers a reply the
      // server had not started, or one from before it kept them.
      const found = partials.find((p) => p.user === m.content && !shown.includes(p));
      if (found) {
        shown.push(found);
        addMessage("assistant", found.text, "interrupted", t("status.keptHere"));
      }
    }
  });
  savePartials(conv.id, shown);  // forget those whose message is gone
  if (!(conv.messages || []).length) {
    els.messages.appendChild(el("p", "empty", t("conv.noMessages")));
  }
  refreshTurnActions();
  scrollDown();
  if (state.live) showLive(state.live);
}

// ----- following the conversation (follow.js) ------------------------------------------------
let liveNode = null;  // the node of the reply being written that this tab did not send
// The replies this tab asked for (their X-Rolechat-Reply ids): it shows them itself, and
// one it stopped, which the server may still be ending, is not another tab's reply.
const ownReplies = new Set();

function ownReply(response) {
  const id = response.headers.get("X-Rolechat-Reply");
  if (!id) return;
  ownReplies.add(id);
  if (ownReplies.size > 50) ownReplies.delete(ownReplies.values().next().value);
}

function startFollowing(cid) {
  follow(cid, {
    onVersion: (version) => act(syncTo)(cid, version),
    onLive: (live) => {
      if (String(state.cid) !== String(cid)) return;
      setLive(live && ownReplies.has(live.id) ? null : live);
    },
    onDeleted: () => { if (String(state.cid) === String(cid)) act(afterChange)(); },
    onLost: () => setConnection(true),
    onBack: () => setConnection(false),
  });
}

// The stored conversation is at `version`: show it, unless this tab shows it already or is
// writing to it (its own reply reloads it when done). The scroll position is kept.
async function syncTo(cid, version) {
  if (String(state.cid) !== String(cid) || state.streaming) return;
  if (state.shown === version) return;
  let conv;
  try { conv = await api(conversationPath(cid)); } catch (_) { return; }
  if (String(state.cid) !== String(cid) || state.streaming) return;
  // What this tab shows may be newer by now (its own action answered meanwhile): keep it.
  if (state.shown !== null && state.shown >= conv.version) return;
  const atEnd = nearBottom();
  const top = els.messages.scrollTop;
  renderConversation(conv);
  if (!atEnd) els.messages.scrollTop = top;
  await afterChange();
}

// A reply being written that this tab did not send: shown as it grows, with Stop.
function setLive(live) {
  if (state.streaming) live = null;  // this tab's own reply shows itself
  const was = state.live;
  state.live = live;
  if (live) showLive(live);
  else if (liveNode) { liveNode.remove(); liveNode = null; }
  if (Boolean(was) !== Boolean(live)) {
    els.stop.hidden = !live && !state.streaming;
    els.send.disabled = Boolean(live) || state.streaming;
    refreshTurnActions();
  }
}

function showLive(live) {
  if (!liveNode || !liveNode.isConnected) {
    clearEmpty();
    if (live.kind === "retry") {  // it replaces the last reply shown
      const old = lastReplyNode();
      if (old) old.hidden = true;
    }
    liveNode = addMessage("assistant", "", "live", null);
    liveNode.classList.add("streaming");
  }
  const atEnd = nearBottom();
  streamText(liveNode, live.text || "");
  if (atEnd) scrollDown();
}

// Stop: this tab's reply (its request is cut, the server told to stop: replies are sent
// detached) or the one it follows.
async function stopReply() {
  const cid = state.cid;
  if (state.abort) state.abort.abort();
  if (cid === null || (!state.streaming && !state.live)) return;
  try {
    await api(conversationPath(cid, "stop"), { method: "POST" });
  } catch (err) {
    showError(err.message);
  }
}

// The server stopped answering (`lost`), or answers again.
function setConnection(lost) {
  state.lost = lost;
  els.connection.hidden = false;
  if (lost) {
    els.connectionText.textContent = t("connection.lost");
    els.resend.hidden = true;
    return;
  }
  showError("");  // "Failed to fetch" and the like are over
  els.connectionText.textContent = state.unsent !== null ? t("connection.backUnsent")
    : t("connection.back");
  els.resend.hidden = state.unsent === null;
  if (state.unsent === null) {
    setTimeout(() => { if (!state.lost) els.connection.hidden = true; }, 4000);
  }
}

async function resend() {
  const text = state.unsent;
  state.unsent = null;
  els.connection.hidden = true;
  if (text === null) return;
  if (!els.input.value.trim()) els.input.value = text;
  await send();
}

// Retry: a message whose reply did not complete (stopped, or cut by a crash) is sent again.
async function retryMessage(node) {
  if (state.streaming || state.live) return;
  els.input.value = rawText.get(node) || "";
  await send();
}

// The last turn the page shows: its reply's node (complete, shown), or null.
function lastReplyNode() {
  const replies = [...els.messages.querySelectorAll(".msg.assistant")]
    .filter((n) => !n.dataset.status && !n.hidden);
  return replies[replies.length - 1] || null;
}

// The name of the turn a reply node shows (its stored id), or null.
function turnOf(node) {
  const id = node && node.dataset.id;
  return id ? Number(id) : null;
}

// Another tab or window changed the conversation first (a 409): show what is stored now, and
// say why (`what`: what did not happen, in the page's language).
async function reloadChanged(what) {
  try {
    renderConversation(await api(conversationPath(state.cid)));
  } catch (err) {
    showError(err.message);
    return;
  }
  showNotice(t("changed.notice", { what: what }));
}

// The conversation once no reply is being written to it: after a Stop, the server finishes
// the job (marks the message interrupted, puts a regenerated turn back) a moment later.
async function settled(cid) {
  for (let tries = 0; ; tries++) {
    const conv = await api(conversationPath(cid));
    const pending = (conv.messages || []).some((m) => m.status === "pending");
    if (!pending || tries >= 50) return conv;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

function markActive() {
  for (const li of els.list.children) {
    const active = String(li.dataset.id) === String(state.cid);
    li.classList.toggle("active", active);
    const opener = li.querySelector(".conv-text");
    if (active) opener.setAttribute("aria-current", "page");
    else opener.removeAttribute("aria-current");
  }
}

async function refreshList() {
  const body = await api("/conversations");
  els.list.replaceChildren();
  for (const c of (body && body.data) || []) {
    const li = el("li", "conversation");
    li.dataset.id = c.id;
    li.dataset.testid = "conversation";
    const text = el("button", "conv-text");  // a real button: focus, Enter and Space
    text.type = "button";
    text.appendChild(el("span", "conv-title", c.title || t("conv.untitledShort")));
    const turns = c.turns ?? 0;
    text.appendChild(el("span", "conv-turns", tn("conv.turns", turns)));
    li.appendChild(text);
    const del = button("×", "delete", () => remove(c.id), t("conv.delete"));
    del.className = "delete";
    del.setAttribute("aria-label", t("conv.delete"));
    li.appendChild(del);
    text.addEventListener("click", () => act(open)(c.id));
    li.addEventListener("click", (ev) => { if (ev.target === li) act(open)(c.id); });
    els.list.appendChild(li);
  }
  markActive();
}

// The sidebar is a drawer on narrow screens.
function setSidebar(open) {
  document.body.classList.toggle("sidebar-open", open);
  els.sidebarToggle.setAttribute("aria-expanded", String(open));
  els.backdrop.hidden = !open;
}

async function open(cid) {
  if (state.streaming) return;
  showError("");
  setSidebar(false);
  try {
    const conv = await api(conversationPath(cid));
    endEdit();
    state.cid = conv.id;
    history.replaceState(null, "", "#c=" + encodeURIComponent(conv.id));
    renderConversation(conv);
    markActive();
    refreshSystem(true);
    refreshPrompt();
  } catch (err) {
    showError(err.message);
  }
}

function startNew() {
  if (state.streaming) return;
  endEdit();
  setSidebar(false);
  state.cid = null;
  state.draftSystem = null;
  history.replaceState(null, "", location.pathname);
  showError("");
  renderConversation(null);
  markActive();
  refreshSystem(true);
  refreshPrompt();
  els.input.focus();
}

async function remove(cid) {
  if (state.streaming) return;
  if (!confirm(t("conv.confirmDelete"))) return;
  try {
    await api(conversationPath(cid), { method: "DELETE" });
    savePartials(cid, []);
    if (String(cid) === String(state.cid)) startNew();
    await refreshList();
  } catch (err) {
    showError(err.message);
  }
}

function newParams() {
  const params = {};
  const t = els.temperature.value.trim();
  if (t !== "") params.temperature = Number(t);
  const m = els.maxTokens.value.trim();
  if (m !== "") params.max_new_tokens = parseInt(m, 10);
  if (els.memoryNew.checked) params.memory = "summary";
  return params;
}

async function createConversation() {
  const body = {};
  if (els.persona.value) body.persona = els.persona.value;
  const params = newParams();
  if (Object.keys(params).length) body.params = params;
  const system = state.draftSystem;
  if (system !== null && system.trim()) body.system = system;
  let conv = await api("/conversations", { method: "POST", body: withModel(body) });
  if (system !== null && !system.trim()) {  // "no system prompt", not the persona's
    conv = await api(conversationPath(conv.id), { method: "PATCH", body: { system: "" } });
  }
  state.cid = conv.id;
  state.draftSystem = null;
  history.replaceState(null, "", "#c=" + encodeURIComponent(conv.id));
  renderConversation(conv);
  return conv;
}

async function afterChange() {
  try {
    await refreshModels();
    await refreshList();
    if (state.cid !== null) {
      const conv = await api(conversationPath(state.cid));
      state.conv = conv;
      els.title.textContent = conv.title || t("conv.untitled");
      setTitle(conv.title || t("conv.untitled"));
      const last = lastReplyNode();
      // A reply the page cannot name (no id): show the stored conversation, each turn named,
      // so that Undo and Regenerate never act on a turn by guess.
      if (state.relabel && !state.streaming) renderConversation(conv);  // a switch of language
      else if (last && !last.dataset.id && !state.streaming) renderConversation(conv);
      else if (!state.streaming && !state.editing
               && els.messages.querySelector(".msg.user:not([data-id]):not([data-status])")) {
        renderConversation(conv);  // a message just sent: its id, to edit it
      }
    }
    if (!state.streaming) state.relabel = false;
  } catch (err) {
    showError(err.message);
  }
  refreshTurnActions();
  refreshMemory();
  refreshSystem();
  refreshPrompt();
}

// ----- rename, system prompt, export --------------------------------------------------------
function closeMenu() { els.menu.open = false; }

function startRename() {
  closeMenu();
  if (state.cid === null) return;
  els.titleInput.value = state.conv ? state.conv.title || "" : "";
  els.title.hidden = true;
  els.renameForm.hidden = false;
  els.titleInput.focus();
  els.titleInput.select();
}

function endRename() {
  els.renameForm.hidden = true;
  els.title.hidden = false;
}

async function saveRename() {
  const title = els.titleInput.value;
  try {
    const conv = await api(conversationPath(state.cid), { method: "PATCH", body: { title } });
    state.conv = conv;
    els.title.textContent = conv.title || t("conv.untitled");
    setTitle(conv.title || t("conv.untitled"));
    endRename();
    await refreshList();
  } catch (err) {
    showError(err.message);
  }
}

function currentSystem() {
  if (state.cid === null) {
    if (state.draftSystem !== null) return state.draftSystem;
    // "": the default persona, which has its own system prompt
    const persona = state.personas.find((p) => els.persona.value ? p.name === els.persona.value
                                                                   : p.default);
    return persona && persona.system ? persona.system : "";
  }
  return (state.conv && state.conv.system) || "";
}

// The Settings panel shows the open conversation's system prompt and parameters. A refresh
// after a change (this tab's, or a follow event's) keeps what the user is typing there: only
// opening the panel, another conversation or another persona (`fresh`) replaces it.
let systemShown = null;  // the text the system box was last filled with

function refreshSystem(fresh = false) {
  els.systemToggle.classList.toggle("set", Boolean(currentSystem()));
  if (els.systemPanel.hidden) return;
  if (fresh || systemShown === null || els.systemInput.value === systemShown) {
    els.systemInput.value = systemShown = currentSystem();
  }
  els.systemNote.textContent = state.cid === null ? t("system.noteNew") : t("system.noteNext");
  act(refreshParams)(fresh);
}

// ----- the open conversation's parameters (the Settings panel) ------------------------------
// Each is shown with where its value comes from (GET .../params); a changed one is saved with
// the system prompt (PATCH params), an emptied one goes back to its default (null).
const PARAMS = [["temperature", "0.05", "params.temperature"], ["top_p", "0.01", "params.topP"],
                ["top_k", "1", "params.topK"], ["max_new_tokens", "1", "params.maxNewTokens"],
                ["repetition_penalty", "0.05", "params.repetitionPenalty"],
                ["seed", "1", "params.seed"]];
let shownParams = null;  // {name: value} as GET .../params gave them
let paramsOf = null;  // the conversation they are

function sourceName(source) {
  const known = { you: "params.source.you", persona: "params.source.persona",
                  model: "params.source.model", rolechat: "params.source.rolechat",
                  "this reply": "params.source.reply" };
  return known[source] ? t(known[source]) : source;
}

async function refreshParams(fresh = false) {
  const box = els.paramsBox;
  if (state.cid === null || els.systemPanel.hidden) { box.hidden = true; shownParams = null; return; }
  const cid = state.cid;
  let body;
  try { body = await api(conversationPath(cid, "params")); }
  catch (err) { box.hidden = true; shownParams = null; showError(err.message); return; }
  if (String(cid) !== String(state.cid)) return;  // another one opened meanwhile: its own refresh
  const typing = !fresh && shownParams && String(paramsOf) === String(cid)
    && Object.keys(changedParams()).length > 0;
  if (typing) return;  // the user's changes stay in the fields until saved or the panel closes
  paramsOf = cid;
  els.paramsPersona.textContent = "(" + t("params.persona", { name: body.persona }) + ")";
  els.paramsFields.replaceChildren();
  shownParams = {};
  for (const [name, step, key] of PARAMS) {
    const param = body.params[name];
    if (!param) continue;
    shownParams[name] = param.value;
    const label = el("label", "param");
    label.appendChild(el("span", "param-name", t(key)));
    const input = el("input");
    input.type = "number";
    input.step = step;
    input.id = "param-" + name;
    input.dataset.testid = "param-" + name;
    input.dataset.name = name;
    input.value = param.value === null ? "" : String(param.value);
    input.placeholder = t("params.default");
    label.appendChild(input);
    const source = el("span", "param-source note", sourceName(param.source));
    source.dataset.testid = "param-source-" + name;
    label.appendChild(source);
    els.paramsFields.appendChild(label);
  }
  box.hidden = false;
}

// The parameters changed in the panel: {name: number, or null for "back to the default"}.
function changedParams() {
  const changed = {};
  if (!shownParams) return changed;
  for (const input of els.paramsFields.querySelectorAll("input[data-name]")) {
    const name = input.dataset.name;
    const text = input.value.trim();
    const value = text === "" ? null : Number(text);
    if (value !== shownParams[name]) changed[name] = value;
  }
  return changed;
}

function toggleSystem(show) {
  els.systemPanel.hidden = !show;
  els.systemToggle.setAttribute("aria-expanded", String(show));
  els.systemToggle.classList.toggle("on", show);
  if (show) { refreshSystem(true); els.systemInput.focus(); }
}

async function saveSystem() {
  const system = els.systemInput.value;
  showError("");
  if (state.cid === null) {
    state.draftSystem = system;
    toggleSystem(false);
    refreshSystem();
    return;
  }
  try {
    const body = { system };
    const params = changedParams();
    if (Object.keys(params).length) body.params = params;
    state.conv = await api(conversationPath(state.cid), { method: "PATCH", body });
    toggleSystem(false);
    refreshSystem();
    refreshPrompt();
  } catch (err) {
    showError(err.message);
  }
}

async function exportConversation(format) {
  closeMenu();
  if (state.cid === null) return;
  try {
    const conv = await api(conversationPath(state.cid));
    const slug = (conv.title || "").toLowerCase().replace(/[^\p{L}\p{N}]+/gu, "-")
      .replace(/^-+|-+$/g, "").slice(0, 40);
    const name = "rolechat-" + conv.id + (slug ? "-" + slug : "");
    if (format === "json") download(name + ".json", exportText(conv, "json"), "application/json");
    else download(name + ".md", exportText(conv, "md"), "text/markdown");
  } catch (err) {
    showError(err.message);
  }
}

// ----- sending, streaming, stop, regenerate, edit, undo -----------------------------------
function setStreaming(on) {
  state.streaming = on;
  if (on) setLive(null);
  els.send.disabled = on;
  els.stop.hidden = !on;
  els.newBtn.disabled = on;
  document.body.classList.toggle("streaming", on);
  refreshTurnActions();
}

// Streams one reply from `path` into `node`; resolves when it is done. The text so far stays
// on the node (rawText) whatever happens. While the server has no free sequence for it, a
// line in the reply says how many requests are ahead ("waiting (2 ahead)"), until its first
// text comes or it ends.
async function streamReply(path, body, node, prefix = "", headers = undefined) {
  node.classList.add("streaming");
  startWaiting(node);
  const before = summarizedBefore();
  state.abort = new AbortController();
  let text = prefix;  // a continuation goes on from the reply's text
  try {
    const response = await request(path, { method: "POST", body: body, headers: headers,
                                           signal: state.abort.signal });
    if (!response.ok) {
      let errorBody = null;
      try { errorBody = await response.json(); } catch (_) { /* not JSON */ }
      throw apiError(errorBody, response.status);
    }
    ownReply(response);
    let finished = false;
    await readSSE(response, (event) => {
      if (event.error) throw apiError(event, 500);
      if (event.waiting && !text) showWaiting(node, event.waiting.ahead);
      if (typeof event.delta === "string") {
        endWaiting(node);
        text += event.delta;
        streamText(node, text);  // the view follows its end (keepEnd)
      }
      if (event.done) {
        finished = true;
        if (Number.isInteger(event.turn)) node.dataset.id = String(event.turn);
        if (event.message && typeof event.message.content === "string") {
          text = prefix + event.message.content;
        }
        node.dataset.finish = event.finish_reason || "";
        addLine(node, "usage", usageText(event.usage,
          Object.assign({ finish_reason: event.finish_reason }, event.rolechat || {})), "usage");
        const memory = event.rolechat && event.rolechat.memory;
        if (memory) {
          addMemoryLines(node, memory.usage, memory.note,
                         folded(memory.summarized_turns, before));
        }
      }
    });
    if (!finished) throw new Error(t("error.endedEarly"));
  } finally {
    endWaiting(node);
    node.classList.remove("streaming");
    setText(node, text);
    keepEnd();  // the reply's end, its usage and its actions in sight above the composer
    state.abort = null;
  }
  const said = node.querySelector(".content").innerText.trim();  // as rendered, no Markdown
  announce(t("announce.finished", { text: said.length > 300 ? said.slice(0, 300) + "…" : said }));
}

async function send() {
  const text = els.input.value;
  if (state.streaming || !text.trim()) return;
  showError("");
  setStreaming(true);
  let userNode = null;
  let replyNode = null;
  const edit = state.editing ? state.editMessage : null;  // a new version from that message
  try {
    if (edit !== null) {
      let node = els.messages.querySelector(".msg[data-id='" + CSS.escape(String(edit)) + "']");
      while (node) { const next = node.nextElementSibling; node.remove(); node = next; }
      endEdit();
    }
    announceLoad();
    if (state.cid === null) await createConversation();
    clearEmpty();
    stickToEnd();  // the reader wants to see the reply to what they sent
    userNode = addMessage("user", text);
    els.input.value = "";
    fitInput();
    replyNode = addMessage("assistant", "");
    const body = { content: text, stream: true, detach: true };
    if (edit !== null) body.edit = edit;
    await streamReply(conversationPath(state.cid, "messages"), withModel(body), replyNode, "",
                      edit !== null ? versionHeader() : undefined);
    if (edit !== null) renderConversation(await api(conversationPath(state.cid)));  // "2/2"
  } catch (err) {
    const partial = replyNode ? rawText.get(replyNode) : "";
    if (isChanged(err)) {  // the edited turn changed elsewhere: nothing sent, the text kept
      endEdit();
      if (!els.input.value) els.input.value = text;
      await reloadChanged(t("changed.editNotSent"));
    } else if (err.name === "AbortError") {
      markStatus(userNode, "interrupted");
      if (partial) {
        markStatus(replyNode, "interrupted", t("status.stopped"));
        keepPartial(state.cid, text, partial);
      } else if (replyNode) {
        replyNode.remove();
      }
    } else {
      markStatus(userNode, "failed");
      if (replyNode && !partial) replyNode.remove();
      if (!els.input.value) els.input.value = text;  // to send again
      if (err instanceof TypeError) state.unsent = text;  // the network: Resend when back
      showError(err.message);
    }
  } finally {
    setStreaming(false);
    els.input.focus();
  }
  await afterChange();
}

// Regenerate: the last reply is generated again, the old one kept as a version ("2/2"); if
// the new one fails, the old one is shown again (the attempt stays a version).
async function retry() {
  if (state.streaming || state.cid === null) return;
  const old = lastReplyNode();
  const asked = old && old.previousElementSibling;
  if (!old || !asked || asked.dataset.role !== "user" || !asked.dataset.id) {
    showError(t("error.nothingToRegenerate"));
    return;
  }
  showError("");
  const text = rawText.get(asked) || "";
  const fresh = addMessage("assistant", "");
  old.after(fresh);
  old.hidden = true;
  setStreaming(true);
  let failed = null;
  try {
    announceLoad();
    await streamReply(conversationPath(state.cid, "messages"),
                      withModel({ content: text, stream: true, detach: true,
                                  edit: Number(asked.dataset.id) }), fresh, "", versionHeader());
  } catch (err) {
    failed = err;
  } finally {
    setStreaming(false);
  }
  try {  // as stored: the new reply, or (after a failure) the previous one shown again
    let conv = await settled(state.cid);
    if (failed && !isChanged(failed)) conv = await showPrevious(conv, text) || conv;
    renderConversation(conv);
  } catch (err) {
    failed = failed || err;
  }
  if (isChanged(failed)) {
    showNotice(t("changed.notice", { what: t("changed.nothingRegenerated") }));
  } else if (failed) {
    showError(failed.name === "AbortError" ? t("error.stoppedKept")
      : t("error.previousKept", { message: failed.message }));
  }
  await afterChange();
}

// After a failed regeneration of `text`: switch back to the version before the attempt.
async function showPrevious(conv, text) {
  const users = (conv.messages || []).filter((m) => m.role === "user" && m.content === text
                                                   && m.versions);
  const last = users[users.length - 1];
  if (!last || last.versions.index !== last.versions.count || last.versions.count < 2) return null;
  const branch = last.versions.branches[last.versions.count - 2];
  return api(conversationPath(state.cid, "branch"), { method: "POST", body: { branch } });
}

// If-Match with the version this tab shows: a change made elsewhere since is a 409.
function versionHeader() {
  return state.conv && Number.isInteger(state.conv.version)
    ? { "If-Match": '"' + state.conv.version + '"' } : undefined;
}

// The versions of a message ("2/3"): previous and next switch the branch shown.
function addVersions(node, versions) {
  const box = el("span", "versions");
  box.dataset.testid = "versions";
  const go = (branch) => act(switchTo)(branch);
  const prev = button("‹", "version-prev", () => go(versions.branches[versions.index - 2]),
                      t("version.prev"));
  const next = button("›", "version-next", () => go(versions.branches[versions.index]),
                      t("version.next"));
  prev.setAttribute("aria-label", t("version.prev"));
  next.setAttribute("aria-label", t("version.next"));
  prev.disabled = versions.index <= 1;
  next.disabled = versions.index >= versions.count;
  const where = el("span", "version-of", versions.index + "/" + versions.count);
  where.setAttribute("aria-label", t("version.label", { index: versions.index,
                                                        count: versions.count }));
  box.append(prev, where, next);
  node.querySelector(".msg-actions").prepend(box);
}

async function switchTo(branch) {
  if (state.streaming || state.live || state.cid === null || branch == null) return;
  showError("");
  try {
    const conv = await api(conversationPath(state.cid, "branch"),
                           { method: "POST", body: { branch }, headers: versionHeader() });
    renderConversation(conv);
  } catch (err) {
    if (isChanged(err)) await reloadChanged(t("changed.nothingSwitched"));
    else showError(err.message);
  }
  await afterChange();
}

// Continue: the last reply (cut at max new tokens) goes on where it stopped, appended to it.
async function continueReply(node) {
  if (state.streaming || state.cid === null) return;
  const last = node || lastReplyNode();
  if (!last) return;
  showError("");
  const usage = last.querySelector(".usage");
  if (usage) usage.remove();
  setStreaming(true);
  let failed = null;
  try {
    announceLoad();
    await streamReply(conversationPath(state.cid, "continue"),
                      withModel({ stream: true, detach: true, turn: turnOf(last) }), last,
                      rawText.get(last) || "");
  } catch (err) {
    failed = err;
  } finally {
    setStreaming(false);
  }
  try {  // as stored: the longer reply, or the same one if this failed
    renderConversation(await settled(state.cid));
  } catch (err) {
    failed = failed || err;
  }
  if (isChanged(failed)) {
    showNotice(t("changed.notice", { what: t("changed.nothingContinued") }));
  } else if (failed && failed.name !== "AbortError") {
    showError(failed.message);
  }
  await afterChange();
}

// Undo: the last turn goes, here and in the store.
async function undo() {
  if (state.streaming || state.cid === null) return;
  showError("");
  endEdit();
  try {
    const body = await api(conversationPath(state.cid, "undo"),
                           { method: "POST", body: { turn: turnOf(lastReplyNode()) } });
    renderConversation(body.conversation);
    if (!body.removed) showError(t("error.nothingToUndo"));
    else {
      const back = !els.input.value.trim();
      if (back) {  // the removed message, to edit and send again
        els.input.value = body.removed.user;
        fitInput();
        els.input.focus();
      }
      showUndone(back ? body.removed.user : null);
    }
  } catch (err) {
    if (isChanged(err)) await reloadChanged(t("changed.nothingUndone"));
    else showError(err.message);
  }
  await afterChange();
}

// After an undo: a note (the message is back in the box) with Redo, which puts the turn back
// as it was (POST .../redo) unless the conversation changed since.
function showUndone(textBack) {
  showNotice(textBack !== null ? t("undo.textBack") : t("undo.done"));
  const again = button(t("action.redo"), "redo", () => redo(textBack), t("action.redoTitle"));
  again.classList.add("notice-action");
  els.notice.appendChild(again);
}

async function redo(textBack) {
  if (state.streaming || state.cid === null) return;
  showError("");
  try {
    const body = await api(conversationPath(state.cid, "redo"), { method: "POST" });
    renderConversation(body.conversation);
    if (textBack !== null && els.input.value === textBack) {
      els.input.value = "";
      fitInput();
    }
  } catch (err) {
    if (isChanged(err)) await reloadChanged(t("changed.nothingRedone"));
    else showError(err.message);
  }
  await afterChange();
}

// Edit: the last user message goes back into the box; sending replaces its turn.
function startEdit(node) {
  if (state.streaming) return;
  state.editing = true;
  state.editMessage = Number(node.dataset.id);
  state.editTurn = turnOf(node.nextElementSibling);
  els.input.value = rawText.get(node) || "";
  fitInput();
  els.editBanner.hidden = false;
  document.body.classList.add("editing");
  els.messages.querySelectorAll(".msg.editing").forEach((n) => n.classList.remove("editing"));
  node.classList.add("editing");
  if (node.nextElementSibling) node.nextElementSibling.classList.add("editing");
  els.input.focus();
  els.input.setSelectionRange(els.input.value.length, els.input.value.length);
  refreshPrompt();
}

function endEdit() {
  if (!state.editing) return;
  state.editing = false;
  els.editBanner.hidden = true;
  document.body.classList.remove("editing");
  els.messages.querySelectorAll(".msg.editing").forEach((n) => n.classList.remove("editing"));
}

function cancelEdit() {
  endEdit();
  els.input.value = "";
  fitInput();
  refreshPrompt();
}

// The message box grows with its text, up to a limit (CSS max-height).
function fitInput() {
  els.input.style.height = "auto";
  els.input.style.height = els.input.scrollHeight + 2 + "px";
}

// ----- prompt view ------------------------------------------------------------------------
let promptTimer = null;
let promptSeq = 0;

// The window's plan, as text (never markup): the numbers line, then which turns are kept,
// pinned and dropped, the summary the prompt carries, what the next message would fold into
// it, and why a slide dropped turns without one.
function renderPlan(plan, next) {
  els.plan.replaceChildren();
  if (!plan) return;
  const line = (cls, text, testid) => {
    const node = el("div", cls, text);
    if (testid) node.dataset.testid = testid;
    els.plan.appendChild(node);
    return node;
  };
  line("plan-line", planText(plan, next));
  const kept = Array.isArray(plan.kept_turns) ? plan.kept_turns : [];
  const dropped = Array.isArray(plan.dropped_turns) ? plan.dropped_turns : [];
  const pinned = [...new Set([...(plan.pinned_turns || []), ...pinsOf(state.conv)])];
  const memory = plan.memory || {};
  const mode = memoryOf(state.conv).mode;
  const parts = [];
  if (kept.length || dropped.length) {
    parts.push(t("plan.kept", { turns: turnList(kept) }),
               t("plan.dropped", { turns: turnList(dropped) }));
  }
  if (pinned.length) parts.push(t("plan.pinned", { turns: turnList(pinned) }));
  if (mode) {
    parts.push(t("plan.memory", { mode: mode === "summary" ? t("plan.memorySummary")
      : t("plan.memoryNone") }));
  }
  if (parts.length) line("plan-turns", parts.join(" · "), "plan-turns");
  if (memory.summary) {
    const box = line("plan-summary", null, "plan-summary");
    const covered = memory.summarized_turns || [];
    box.appendChild(el("div", "plan-label", covered.length
      ? t("plan.summaryOf", { turns: turnList(covered) }) : t("plan.summaryEarlier")));
    box.appendChild(el("div", "plan-summary-text", memory.summary));
  }
  const fold = memory.summarize_turns || [];
  if (fold.length) {
    line("plan-fold", t(next ? "plan.foldNext" : "plan.foldThis", { turns: turnList(fold) }),
         "plan-fold");
  }
  if (memory.note) line("plan-note", t("memory.note", { note: memory.note }), "plan-note");
}

function planText(plan, next) {
  if (!plan) return "";
  const kept = Array.isArray(plan.kept_turns) ? plan.kept_turns.length : plan.kept_turns;
  const dropped = Array.isArray(plan.dropped_turns) ? plan.dropped_turns.length
    : plan.dropped_turns;
  const parts = [t("plan.keptCount", { n: kept ?? 0 }), t("plan.droppedCount", { n: dropped ?? 0 }),
                 t("plan.tokens", { used: plan.prompt_tokens ?? "?", budget: plan.budget ?? "?" })];
  if (plan.context_length != null) parts.push(t("plan.context", { n: plan.context_length }));
  if (plan.max_new_tokens != null) parts.push(t("plan.maxNew", { n: plan.max_new_tokens }));
  if (next) parts.unshift(t("plan.next"));
  if (state.editing) parts.unshift(t("plan.editing"));
  return parts.join(" · ");
}

async function refreshPrompt() {
  if (els.promptPanel.hidden) return;
  const seq = ++promptSeq;
  if (state.cid === null) {
    els.plan.textContent = "";
    els.promptText.textContent = t("prompt.noConversation");
    return;
  }
  const draft = els.input.value;
  try {
    const body = await api(conversationPath(state.cid, "prompt"),
                           { method: "POST", body: { content: draft.trim() ? draft : "" } });
    if (seq !== promptSeq) return;
    els.promptText.textContent = body.prompt;
    renderPlan(body.plan, body.next_message);
  } catch (err) {
    if (seq !== promptSeq) return;
    els.plan.textContent = "";
    els.promptText.textContent = "";
    showError(err.message);
  }
}

function togglePrompt() {
  const show = els.promptPanel.hidden;
  els.promptPanel.hidden = !show;
  els.promptToggle.setAttribute("aria-expanded", String(show));
  els.promptToggle.classList.toggle("on", show);
  if (show) refreshPrompt();
}

// ----- language ---------------------------------------------------------------------------
// A switch of language (the sidebar's select, i18n.js) redraws at once, without a reload: the
// static markup is translated by i18n.js, and here the open conversation as last loaded (its
// messages' lines and buttons; while a reply is being written, once it is done: afterChange),
// the list, the menu's switch, the panels' notes and the prompt's plan.
// The persona a conversation gets when none is chosen, named (it has a system prompt).
function labelDefaultPersona() {
  const fallback = state.personas.find((p) => p.default);
  els.personaDefault.textContent = t("new.defaultPersona",
                                     { name: fallback ? fallback.name : "?" });
}

function relabel() {
  labelDefaultPersona();
  if (state.streaming) {
    state.relabel = true;
  } else if (state.cid === null || state.conv) {
    const scrolled = els.messages.scrollTop;
    const renaming = !els.renameForm.hidden;
    renderConversation(state.cid === null ? null : state.conv);
    els.messages.scrollTop = scrolled;
    if (renaming) { els.title.hidden = true; els.renameForm.hidden = false; }
    if (state.editing) {  // the turn being edited stays marked
      const reply = els.messages.querySelector(
        ".msg[data-id='" + CSS.escape(String(state.editTurn)) + "']");
      if (reply) {
        reply.classList.add("editing");
        if (reply.previousElementSibling) reply.previousElementSibling.classList.add("editing");
      }
    }
  }
  refreshMemory();
  refreshSystem();
  refreshPrompt();
  act(async () => {
    try { await refreshList(); } catch (err) { showError(err.message); }
  })();
}

// ----- start ------------------------------------------------------------------------------
function wire() {
  const on = (node, event, fn) => node.addEventListener(event, act(fn));
  els.form.addEventListener("submit", (ev) => { ev.preventDefault(); act(send)(); });
  els.input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      act(send)();
    } else if (ev.key === "Escape" && state.editing) {
      cancelEdit();
    }
  });
  els.input.addEventListener("input", () => {
    fitInput();
    if (els.promptPanel.hidden) return;
    clearTimeout(promptTimer);
    promptTimer = setTimeout(refreshPrompt, 250);
  });
  els.stop.addEventListener("click", act(stopReply));
  els.resend.addEventListener("click", act(resend));
  on(els.newBtn, "click", startNew);
  els.promptToggle.addEventListener("click", togglePrompt);
  els.keyBox.addEventListener("submit", (ev) => { ev.preventDefault(); saveKey(); });
  els.sidebarToggle.addEventListener("click", () => {
    setSidebar(!document.body.classList.contains("sidebar-open"));
  });
  els.backdrop.addEventListener("click", () => setSidebar(false));
  document.addEventListener("keydown", (ev) => {
    if (ev.key !== "Escape") return;
    setSidebar(false);
    closeMenu();
  });
  document.addEventListener("click", (ev) => {
    if (els.menu.open && !els.menu.contains(ev.target)) closeMenu();
  });
  els.rename.addEventListener("click", startRename);
  els.renameForm.addEventListener("submit", (ev) => { ev.preventDefault(); act(saveRename)(); });
  els.renameCancel.addEventListener("click", endRename);
  els.titleInput.addEventListener("keydown", (ev) => { if (ev.key === "Escape") endRename(); });
  on(els.memoryToggle, "click", toggleMemory);
  on(els.exportMd, "click", () => exportConversation("md"));
  on(els.exportJson, "click", () => exportConversation("json"));
  els.systemToggle.addEventListener("click", () => toggleSystem(els.systemPanel.hidden));
  on(els.systemSave, "click", saveSystem);
  els.systemCancel.addEventListener("click", () => toggleSystem(false));
  els.persona.addEventListener("change", () => refreshSystem(true));
  els.editCancel.addEventListener("click", cancelEdit);
  wireModels();
  wireMenus();
  wireKeys({ streaming: () => state.streaming || Boolean(state.live),
             stop: act(stopReply),
             newChat: act(startNew) });
  wireSearch(act(open));
  onKeyNeeded(askKey);
  wireLanguage(els.language);
  onLanguageChange(relabel);
}

async function init() {
  translatePage();  // the markup is written in English; the page speaks the user's language
  wire();
  renderConversation(null);
  try {
    await refreshModels();
    const personas = await api("/personas");
    state.personas = (personas && personas.data) || [];
    for (const p of state.personas) {
      const opt = el("option", null, p.name);
      opt.value = p.name;
      if (p.description) opt.title = p.description;
      els.persona.appendChild(opt);
    }
    labelDefaultPersona();
    await refreshList();
    const match = /^#c=(.+)$/.exec(location.hash);
    if (match) await open(decodeURIComponent(match[1]));
  } catch (err) {
    showError(err.message);
  }
  refreshSystem();
  document.body.dataset.ready = "1";
  els.input.focus();
}

act(init)();
