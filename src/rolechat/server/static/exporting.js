// Conversation exports, made in the page from GET /v1/conversations/{id}: the same Markdown
// and JSON as `rolechat conversations export` (the JSON can be imported again).

import { el } from "./page.js";

// The completed turns, as the store exports them (interrupted messages are left out).
export function completedTurns(messages) {
  const turns = [];
  for (let i = 0; i + 1 < messages.length; i++) {
    const user = messages[i];
    const reply = messages[i + 1];
    if (user.role === "user" && reply.role === "assistant" && user.status === "complete") {
      turns.push([user.content, reply.content]);
    }
  }
  return turns;
}

// The text of an export: format "json" (rolechat's own, importable) or "md".
export function exportText(conv, format) {
  const turns = completedTurns(conv.messages || []);
  if (format === "json") {
    const messages = [];
    for (const [user, reply] of turns) {
      messages.push({ role: "user", content: user }, { role: "assistant", content: reply });
    }
    return JSON.stringify({ system: conv.system ?? null, messages: messages, id: conv.id,
                            title: conv.title, persona: conv.persona, params: conv.params,
                            created_at: conv.created_at }, null, 2);
  }
  const lines = ["# " + (conv.title || "Conversation " + conv.id), ""];
  if (conv.system) lines.push("**System:** " + conv.system, "");
  for (const [user, reply] of turns) {
    lines.push("### You", "", user, "", "### Assistant", "", reply, "");
  }
  return lines.join("\n");
}

export function download(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type: type }));
  const link = el("a");
  link.href = url;
  link.download = name;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
