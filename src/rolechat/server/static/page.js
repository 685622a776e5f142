// The page's shared pieces: its elements, its state, and small DOM helpers.

const $ = (id) => document.getElementById(id);
export const els = {
  model: $("model"), modelBox: $("model-box"), modelPicker: $("model-picker"), persona: $("persona"), newBtn: $("new"), list: $("conversations"),
  messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"),
  form: $("composer"), error: $("error"), title: $("title"),
  promptToggle: $("prompt-toggle"), promptPanel: $("prompt-panel"),
  promptText: $("prompt-text"), plan: $("plan"),
  keyBox: $("key-box"), apiKey: $("api-key"), apiKeyRemember: $("api-key-remember"),
  temperature: $("temperature"), maxTokens: $("max-tokens"),
  sidebarToggle: $("sidebar-toggle"), backdrop: $("backdrop"),
  menu: $("conv-menu"), rename: $("rename"), exportMd: $("export-md"),
  exportJson: $("export-json"), renameForm: $("rename-form"), titleInput: $("title-input"),
  renameCancel: $("rename-cancel"), systemToggle: $("system-toggle"),
  systemPanel: $("system-panel"), systemInput: $("system-input"), systemNote: $("system-note"),
  systemSave: $("system-save"), systemCancel: $("system-cancel"),
  editBanner: $("edit-banner"), editCancel: $("edit-cancel"), notice: $("notice"),
  memoryNew: $("memory-new"), memoryToggle: $("memory-toggle"), language: $("language"),
  connection: $("connection"), connectionText: $("connection-text"), resend: $("resend"),
  paramsBox: $("params-box"), paramsPersona: $("params-persona"),
  paramsFields: $("params-fields"), personaDefault: $("persona-default"),
  settingsModel: $("settings-model"), settingsModelBox: $("settings-model-box"),
};
export const state = {
  cid: null,          // the open conversation's id (null: a new one, created on first send)
  conv: null,         // its last known body (GET /v1/conversations/{id})
  shown: null,        // the version its messages on the page show (renderConversation)
  streaming: false,
  live: null,         // the reply being written that this tab did not send ({kind, text})
  lost: false,        // the server stopped answering (follow.js)
  unsent: null,       // a message whose sending failed while the server was away
  abort: null,        // AbortController of the reply being streamed
  personas: [],
  editing: false,     // the composer holds the last user message, to replace its turn
  editTurn: null,     // the turn an edit replaces (its reply's id)
  draftSystem: null,  // a system prompt chosen before the conversation exists
  keyWaiters: [],
  relabel: false,     // the language changed while a reply was written: redraw it once done
};

export function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

// body[data-busy] is set while an action (and the refresh after it) runs: tests wait for
// it to go, instead of for a time.
let busy = 0;
export function act(fn) {
  return async (...args) => {
    busy += 1;
    document.body.dataset.busy = "1";
    try { return await fn(...args); }
    finally { busy -= 1; if (!busy) delete document.body.dataset.busy; }
  };
}

export function button(label, testid, onClick, title) {
  const node = el("button", null, label);
  node.type = "button";
  node.dataset.testid = testid;
  if (title) node.title = title;
  const run = act(onClick);
  node.addEventListener("click", (ev) => { ev.stopPropagation(); run(); });
  return node;
}

export function showError(message) {
  if (!message) {
    els.error.hidden = true;
    els.error.textContent = "";
    showNotice("");
    return;
  }
  els.error.textContent = String(message);
  els.error.hidden = false;
}

// A short note that is not an error (why the conversation was just reloaded).
export function showNotice(message) {
  els.notice.textContent = message ? String(message) : "";
  els.notice.hidden = !message;
}

export function fmt(n, digits) {
  return typeof n === "number" && isFinite(n) ? n.toFixed(digits) : null;
}
