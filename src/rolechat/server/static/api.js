// The page's side of the HTTP API: fetch under /v1 with the API key, JSON bodies and errors,
// server-sent events. The key lives in sessionStorage (this tab) unless the user asked to
// remember it on this device (localStorage). A request answered 503 model_loading (the
// server is switching models) is sent again after its Retry-After, for up to LOADING_MS.

import { t } from "./i18n.js";

const KEY_STORE = "rolechat.apiKey";

function storage(kind) {
  try { return kind === "local" ? window.localStorage : window.sessionStorage; }
  catch (_) { return null; }  // storage blocked: the key lives in memory only
}

let memoryKey = "";

export const apiKey = {
  get() {
    for (const kind of ["session", "local"]) {
      const store = storage(kind);
      const key = store && store.getItem(KEY_STORE);
      if (key) return key;
    }
    return memoryKey;
  },
  // remember: keep it on this device (localStorage); otherwise for this tab only.
  set(key, remember) {
    memoryKey = key;
    const keep = storage(remember ? "local" : "session");
    const drop = storage(remember ? "session" : "local");
    try {
      if (keep) keep.setItem(KEY_STORE, key);
      if (drop) drop.removeItem(KEY_STORE);
    } catch (_) { /* private mode: memory only */ }
  },
  forget() {
    memoryKey = "";
    for (const kind of ["session", "local"]) {
      const store = storage(kind);
      try { if (store) store.removeItem(KEY_STORE); } catch (_) { /* nothing to forget */ }
    }
  },
};

// Called on a 401 with a message; resolves once the user entered a key (set by the page).
let askForKey = () => Promise.reject(new Error(t("key.needed")));
export function onKeyNeeded(ask) { askForKey = ask; }

export function errorMessage(body, status) {
  if (body && body.error) return body.error.message || JSON.stringify(body.error);
  return t("error.requestFailed", { status: status });
}

// An Error with the server's message, its HTTP status and its error code (a 409
// "conversation_changed" means another tab or window changed the conversation first).
export function apiError(body, status) {
  const error = new Error(errorMessage(body, status));
  error.status = status;
  error.code = (body && body.error && body.error.code) || null;
  return error;
}

export function isChanged(error) {
  return Boolean(error) && error.status === 409 && error.code === "conversation_changed";
}

// Called each time a request is answered 503 model_loading, before it is sent again.
let onLoading = () => {};
export function onModelLoading(notify) { onLoading = notify; }

// How long a request waits for a model to load, at most.
const LOADING_MS = 10 * 60 * 1000;

function pause(ms, signal) {
  return new Promise((resolve, reject) => {
    const stop = () => { clearTimeout(timer); reject(new DOMException("Stopped", "AbortError")); };
    const timer = setTimeout(() => {
      if (signal) signal.removeEventListener("abort", stop);
      resolve();
    }, ms);
    if (signal && signal.aborted) stop();
    else if (signal) signal.addEventListener("abort", stop, { once: true });
  });
}

// The server is loading a model: true when `response` says so (503 model_loading).
async function loading(response) {
  if (response.status !== 503) return false;
  try {
    const body = await response.clone().json();
    return Boolean(body && body.error && body.error.code === "model_loading");
  } catch (_) {
    return false;
  }
}

// fetch() under /v1 with the API key; on 401 asks for a key and tries again; while the server
// loads a model, waits (Stop still works) and tries again.
export async function request(path, init) {
  const until = Date.now() + LOADING_MS;
  for (;;) {
    const opts = Object.assign({}, init || {});
    const headers = Object.assign({}, opts.headers || {});
    const key = apiKey.get();
    if (key) headers["Authorization"] = "Bearer " + key;
    if (opts.body !== undefined && typeof opts.body !== "string") {
      opts.body = JSON.stringify(opts.body);
      headers["Content-Type"] = "application/json";
    }
    opts.headers = headers;
    const response = await fetch("/v1" + path, opts);
    if (Date.now() < until && await loading(response)) {
      onLoading();
      const seconds = parseInt(response.headers.get("Retry-After") || "", 10);
      await pause(Math.min(30, Math.max(1, seconds || 1)) * 1000, opts.signal);
      continue;
    }
    if (response.status !== 401) return response;
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    if (key) apiKey.forget();  // refused: do not keep sending it
    await askForKey(key ? t("key.refused", { message: errorMessage(body, 401) })
                        : t("key.needed"));
  }
}

// A JSON request; the parsed body, or an Error with the server's message (apiError).
export async function api(path, init) {
  const response = await request(path, init);
  let body = null;
  const text = await response.text();
  if (text) { try { body = JSON.parse(text); } catch (_) { body = null; } }
  if (!response.ok) throw apiError(body, response.status);
  return body;
}

export function conversationPath(cid, action) {
  return "/conversations/" + encodeURIComponent(cid) + (action ? "/" + action : "");
}

// Reads an SSE body, calling onEvent(parsedJson) per "data:" line; stops at [DONE].
export async function readSSE(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buffer += decoder.decode(value, { stream: true });
    if (done) buffer += decoder.decode();
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, nl).replace(/\r$/, "");
      buffer = buffer.slice(nl + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trimStart();
      if (data === "[DONE]") return;
      let event;
      try { event = JSON.parse(data); } catch (_) { continue; }
      onEvent(event);
    }
    if (done) return;
  }
}
