// rolechat web chat page. Plain JS, no build step, no external resources.
// SAFETY: model and user text is only ever set through textContent / createTextNode.
"use strict";

(function () {
  const KEY_STORE = "rolechat.apiKey";
  const $ = (id) => document.getElementById(id);
  const els = {
    model: $("model"), persona: $("persona"), newBtn: $("new"), list: $("conversations"),
    messages: $("messages"), input: $("input"), send: $("send"), stop: $("stop"),
    form: $("composer"), error: $("error"), title: $("title"),
    promptToggle: $("prompt-toggle"), promptPanel: $("prompt-panel"),
    promptText: $("prompt-text"), plan: $("plan"), keyBox: $("key-box"),
    apiKey: $("api-key"), apiKeySave: $("api-key-save"), undo: $("undo"), retry: $("retry"),
    temperature: $("temperature"), maxTokens: $("max-tokens"),
  };
  const state = { cid: null, streaming: false, abort: null, personas: [], keyWaiters: [] };

  // ----- small helpers --------------------------------------------------------------------
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function showError(message) {
    if (!message) { els.error.hidden = true; els.error.textContent = ""; return; }
    els.error.textContent = String(message);
    els.error.hidden = false;
  }

  function errorMessage(body, status) {
    if (body && body.error) return body.error.message || JSON.stringify(body.error);
    return "Request failed (HTTP " + status + ")";
  }

  function getKey() {
    try { return localStorage.getItem(KEY_STORE) || ""; } catch (_) { return ""; }
  }

  // Ask for the API key; resolves once the user entered one.
  function askKey(message) {
    els.keyBox.hidden = false;
    showError(message || "This server needs an API key.");
    els.apiKey.focus();
    return new Promise((resolve) => state.keyWaiters.push(resolve));
  }

  function saveKey() {
    const key = els.apiKey.value.trim();
    if (!key) return;
    try { localStorage.setItem(KEY_STORE, key); } catch (_) { /* private mode */ }
    els.keyBox.hidden = true;
    els.apiKey.value = "";
    showError("");
    const waiters = state.keyWaiters.splice(0);
    waiters.forEach((resolve) => resolve(key));
  }

  // fetch() under /v1 with the API key; on 401 asks for the key and retries.
  async function request(path, init) {
    for (;;) {
      const opts = Object.assign({}, init || {});
      const headers = Object.assign({}, opts.headers || {});
      const key = getKey();
      if (key) headers["Authorization"] = "Bearer " + key;
      if (opts.body !== undefined && typeof opts.body !== "string") {
        opts.body = JSON.stringify(opts.body);
        headers["Content-Type"] = "application/json";
      }
      opts.headers = headers;
      const response = await fetch("/v1" + path, opts);
      if (response.status !== 401) return response;
      let body = null;
      try { body = await response.json(); } catch (_) { /* not JSON */ }
      await askKey(getKey() ? "The API key was refused: " + errorMessage(body, 401)
                            : "This server needs an API key.");
    }
  }

  async function api(path, init) {
    const response = await request(path, init);
    let body = null;
    const text = await response.text();
    if (text) { try { body = JSON.parse(text); } catch (_) { body = null; } }
    if (!response.ok) throw new Error(errorMessage(body, response.status));
    return body;
  }

  // ----- rendering ------------------------------------------------------------------------
  function fmt(n, digits) {
    return typeof n === "number" && isFinite(n) ? n.toFixed(digits) : null;
  }

  // One line of numbers for a reply. Accepts the SSE "done" event's usage + rolechat, or a
  // stored message's usage (whatever mix of these keys it has).
  function usageText(usage, extra) {
    const u = Object.assign({}, usage || {}, extra || {});
    const parts = [];
    const completion = u.completion_tokens ?? u.generated_tokens ?? u.tokens;
    if (completion != null) parts.push(completion + " tokens");
    const prompt = u.prompt_tokens;
    if (prompt != null) parts.push("prompt " + prompt);
    const tps = fmt(u.tokens_per_s, 1);
    if (tps) parts.push(tps + " tok/s");
    const ttft = fmt(u.ttft_s, 2);
    if (ttft) parts.push("TTFT " + ttft + " s");
    const cached = (u.prompt_tokens_details && u.prompt_tokens_details.cached_tokens)
      ?? u.cached_tokens;
    if (cached != null) parts.push("cached " + cached);
    if (u.restored_tokens) parts.push("restored from " + u.kv_source);
    const dropped = Array.isArray(u.dropped_turns) ? u.dropped_turns.length : u.dropped_turns;
    if (dropped) parts.push("dropped " + dropped + (dropped === 1 ? " turn" : " turns"));
    if (u.finish_reason && u.finish_reason !== "stop") parts.push("finish: " + u.finish_reason);
    return parts.join(" · ");
  }

  function addMessage(role, content, status) {
    const node = el("div", "msg " + (role === "user" ? "user" : "assistant"));
    node.dataset.role = role;
    node.dataset.testid = "msg-" + role;
    const body = el("div", "content", content || "");
    node.appendChild(body);
    if (status && status !== "complete") {
      node.classList.add(status);
      node.dataset.status = status;
      node.appendChild(el("div", "status", status));
    }
    els.messages.appendChild(node);
    scrollDown();
    return node;
  }

  function addUsage(node, text) {
    if (!text) return;
    const line = el("div", "usage", text);
    line.dataset.testid = "usage";
    node.appendChild(line);
  }

  function scrollDown() { els.messages.scrollTop = els.messages.scrollHeight; }

  function renderConversation(conv) {
    els.messages.replaceChildren();
    els.title.textContent = conv ? (conv.title || "Untitled conversation") : "New conversation";
    els.undo.disabled = els.retry.disabled = !(conv && conv.turns > 0);
    if (!conv) {
      els.messages.appendChild(el("p", "empty", "Say something to start a new conversation."));
      return;
    }
    for (const m of conv.messages || []) {
      const node = addMessage(m.role, m.content, m.status);
      if (m.role === "assistant" && m.usage) addUsage(node, usageText(m.usage));
    }
    if (!(conv.messages || []).length) {
      els.messages.appendChild(el("p", "empty", "No messages yet."));
    }
  }

  function markActive() {
    for (const li of els.list.children) {
      li.classList.toggle("active", String(li.dataset.id) === String(state.cid));
    }
  }

  async function refreshList() {
    const body = await api("/conversations");
    els.list.replaceChildren();
    for (const c of (body && body.data) || []) {
      const li = el("li", "conversation");
      li.dataset.id = c.id;
      li.dataset.testid = "conversation";
      li.tabIndex = 0;
      const text = el("div", "conv-text");
      text.appendChild(el("span", "conv-title", c.title || "Untitled"));
      const turns = c.turns ?? 0;
      text.appendChild(el("span", "conv-turns", turns + (turns === 1 ? " turn" : " turns")));
      li.appendChild(text);
      const del = el("button", "delete", "×");
      del.type = "button";
      del.title = "Delete conversation";
      del.setAttribute("aria-label", "Delete conversation");
      del.dataset.testid = "delete";
      del.addEventListener("click", (ev) => { ev.stopPropagation(); remove(c.id); });
      li.appendChild(del);
      li.addEventListener("click", () => open(c.id));
      li.addEventListener("keydown", (ev) => { if (ev.key === "Enter") open(c.id); });
      els.list.appendChild(li);
    }
    markActive();
  }

  // ----- actions --------------------------------------------------------------------------
  async function open(cid) {
    if (state.streaming) return;
    showError("");
    try {
      const conv = await api("/conversations/" + encodeURIComponent(cid));
      state.cid = conv.id;
      history.replaceState(null, "", "#c=" + encodeURIComponent(conv.id));
      renderConversation(conv);
      markActive();
      refreshPrompt();
    } catch (err) {
      showError(err.message);
    }
  }

  function startNew() {
    if (state.streaming) return;
    state.cid = null;
    history.replaceState(null, "", location.pathname);
    showError("");
    renderConversation(null);
    markActive();
    refreshPrompt();
    els.input.focus();
  }

  async function remove(cid) {
    if (state.streaming) return;
    if (!confirm("Delete this conversation?")) return;
    try {
      await api("/conversations/" + encodeURIComponent(cid), { method: "DELETE" });
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
    return params;
  }

  async function createConversation() {
    const body = {};
    if (els.persona.value) body.persona = els.persona.value;
    const params = newParams();
    if (Object.keys(params).length) body.params = params;
    const conv = await api("/conversations", { method: "POST", body: body });
    state.cid = conv.id;
    history.replaceState(null, "", "#c=" + encodeURIComponent(conv.id));
    return conv;
  }

  function setStreaming(on) {
    state.streaming = on;
    els.send.disabled = on;
    els.stop.hidden = !on;
    els.newBtn.disabled = on;
    els.undo.disabled = els.retry.disabled = on || state.cid === null;
    document.body.classList.toggle("streaming", on);
  }

  // Reads an SSE body, calling onEvent(parsedJson) per "data:" line; stops at [DONE].
  async function readSSE(response, onEvent) {
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

  // Streams one reply from `path` into a new assistant message; resolves when it is done.
  async function streamReply(path, body) {
    const replyNode = addMessage("assistant", "");
    replyNode.classList.add("streaming");
    const content = replyNode.querySelector(".content");
    state.abort = new AbortController();
    try {
      const response = await request(path, { method: "POST", body: body,
                                              signal: state.abort.signal });
      if (!response.ok) {
        let errorBody = null;
        try { errorBody = await response.json(); } catch (_) { /* not JSON */ }
        throw new Error(errorMessage(errorBody, response.status));
      }
      let finished = false;
      await readSSE(response, (event) => {
        if (event.error) throw new Error(errorMessage(event, 500));
        if (typeof event.delta === "string") {
          content.appendChild(document.createTextNode(event.delta));
          scrollDown();
        }
        if (event.done) {
          finished = true;
          if (event.message && typeof event.message.content === "string") {
            content.textContent = event.message.content;
          }
          addUsage(replyNode, usageText(event.usage,
            Object.assign({ finish_reason: event.finish_reason }, event.rolechat || {})));
        }
      });
      replyNode.classList.remove("streaming");
      if (!finished) throw new Error("The reply ended early.");
    } catch (err) {
      replyNode.classList.remove("streaming");
      err.replyNode = replyNode;
      throw err;
    } finally {
      state.abort = null;
    }
  }

  async function send() {
    const text = els.input.value;
    if (state.streaming || !text.trim()) return;
    showError("");
    setStreaming(true);
    let userNode = null;
    try {
      if (state.cid === null) {
        await createConversation();
        els.messages.replaceChildren();
      }
      els.messages.querySelectorAll(".empty").forEach((n) => n.remove());
      userNode = addMessage("user", text);
      els.input.value = "";
      await streamReply("/conversations/" + encodeURIComponent(state.cid) + "/messages",
                        { content: text, stream: true });
    } catch (err) {
      const replyNode = err.replyNode;
      if (err.name === "AbortError") {
        for (const node of [userNode, replyNode]) {
          if (node) { node.classList.add("interrupted"); node.dataset.status = "interrupted"; }
        }
        showError("Stopped.");
      } else {
        if (userNode) userNode.classList.add("failed");
        if (replyNode && !replyNode.querySelector(".content").textContent) replyNode.remove();
        showError(err.message);
      }
    } finally {
      setStreaming(false);
      els.input.focus();
    }
    await afterChange();
  }

  // Undo: the last turn goes, here and in the store.
  async function undo() {
    if (state.streaming || state.cid === null) return;
    showError("");
    try {
      const body = await api("/conversations/" + encodeURIComponent(state.cid) + "/undo",
                             { method: "POST", body: {} });
      renderConversation(body.conversation);
      if (!body.removed) showError("Nothing to undo.");
    } catch (err) {
      showError(err.message);
    }
    await afterChange();
  }

  // Retry: the last reply is generated again; if that fails, the old one stays.
  async function retry() {
    if (state.streaming || state.cid === null) return;
    const replies = els.messages.querySelectorAll(".msg.assistant");
    if (!replies.length) { showError("Nothing to retry."); return; }
    showError("");
    setStreaming(true);
    const old = replies[replies.length - 1];
    old.hidden = true;
    let failed = null;
    try {
      await streamReply("/conversations/" + encodeURIComponent(state.cid) + "/retry",
                        { stream: true });
      old.remove();
    } catch (err) {
      failed = err;
    } finally {
      setStreaming(false);
    }
    if (failed) {
      // The server kept the previous reply: show the conversation as it is stored.
      await open(state.cid);
      showError(failed.name === "AbortError" ? "Stopped: the previous reply is kept."
        : failed.message + " The previous reply is kept.");
    }
    await afterChange();
  }

  async function afterChange() {
    try {
      await refreshList();
      if (state.cid !== null) {
        const conv = await api("/conversations/" + encodeURIComponent(state.cid));
        els.title.textContent = conv.title || "Untitled conversation";
        els.undo.disabled = els.retry.disabled = !(conv.turns > 0);
      }
    } catch (err) {
      showError(err.message);
    }
    refreshPrompt();
  }

  // ----- prompt view ----------------------------------------------------------------------
  let promptTimer = null;
  let promptSeq = 0;

  function planText(plan) {
    if (!plan) return "";
    const kept = Array.isArray(plan.kept_turns) ? plan.kept_turns.length : plan.kept_turns;
    const dropped = Array.isArray(plan.dropped_turns) ? plan.dropped_turns.length
      : plan.dropped_turns;
    const parts = ["kept " + (kept ?? 0) + " turns", "dropped " + (dropped ?? 0) + " turns",
                   (plan.prompt_tokens ?? "?") + " / " + (plan.budget ?? "?") + " prompt tokens"];
    if (plan.context_length != null) parts.push("context " + plan.context_length);
    if (plan.max_new_tokens != null) parts.push("max new " + plan.max_new_tokens);
    return parts.join(" · ");
  }

  async function refreshPrompt() {
    if (els.promptPanel.hidden) return;
    const seq = ++promptSeq;
    if (state.cid === null) {
      els.plan.textContent = "";
      els.promptText.textContent = "(Start a conversation to see its prompt.)";
      return;
    }
    try {
      const body = await api("/conversations/" + encodeURIComponent(state.cid) + "/prompt",
                             { method: "POST", body: { content: els.input.value } });
      if (seq !== promptSeq) return;
      els.promptText.textContent = body.prompt;
      els.plan.textContent = planText(body.plan);
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

  // ----- start ----------------------------------------------------------------------------
  async function init() {
    els.form.addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
    els.input.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        send();
      }
    });
    els.input.addEventListener("input", () => {
      if (els.promptPanel.hidden) return;
      clearTimeout(promptTimer);
      promptTimer = setTimeout(refreshPrompt, 250);
    });
    els.stop.addEventListener("click", () => { if (state.abort) state.abort.abort(); });
    els.newBtn.addEventListener("click", startNew);
    els.undo.addEventListener("click", undo);
    els.retry.addEventListener("click", retry);
    els.promptToggle.addEventListener("click", togglePrompt);
    els.apiKeySave.addEventListener("click", saveKey);
    els.apiKey.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") { ev.preventDefault(); saveKey(); }
    });
    renderConversation(null);
    try {
      const models = await api("/models");
      const m = models && models.data && models.data[0];
      if (m) {
        els.model.textContent = m.id;
        if (m.context_length) els.model.title = "context " + m.context_length + " tokens";
      }
      const personas = await api("/personas");
      state.personas = (personas && personas.data) || [];
      for (const p of state.personas) {
        const opt = el("option", null, p.name);
        opt.value = p.name;
        if (p.description) opt.title = p.description;
        els.persona.appendChild(opt);
      }
      await refreshList();
      const match = /^#c=(.+)$/.exec(location.hash);
      if (match) await open(decodeURIComponent(match[1]));
    } catch (err) {
      showError(err.message);
    }
    document.body.dataset.ready = "1";
    els.input.focus();
  }

  init();
})();
