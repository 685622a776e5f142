// Conversation exports, made in the page from GET /v1/conversations/{id}: the same Markdown
// and JSON as `rolechat conversations export` (rolechat/transfer.py and conversation.py), every
// message included, interrupted ones marked (the JSON can be imported again).
// Their text is not translated (i18n.js): an export is a file format, the same whatever the
// page's language, so that the CLI's import and other tools read it alike.

import { el } from "./page.js";

// A fence line: up to three spaces, three or more backticks or tildes, then the rest.
const FENCE = /^ {0,3}(`{3,}|~{3,})(.*)$/;

// `text` with the code fence it leaves open closed at its end (CommonMark's rules, as
// conversation.close_fences): a backtick fence's info string holds no backtick; a fence closes
// with the same character, at least as many, and nothing else on the line.
export function closeFences(text) {
  let open = "";
  for (const line of text.split("\n")) {
    const match = FENCE.exec(line);
    if (!match) continue;
    const [, fence, rest] = match;
    if (!open) {
      if (!(fence[0] === "`" && rest.includes("`"))) open = fence;
    } else if (fence[0] === open[0] && fence.length >= open.length && !rest.trim()) {
      open = "";
    }
  }
  if (!open) return text;
  return text + (text.endsWith("\n") ? "" : "\n") + open;
}

// A message's heading in the Markdown export: interrupted and pending ones labelled so.
function label(messages, index) {
  const m = messages[index];
  const name = m.role === "user" ? "You" : "Assistant";
  if (m.status === "pending") return name + " (pending: its reply is being written)";
  if (m.status !== "complete" && m.role === "assistant") {
    return name + " (interrupted: the reply was cut off here)";
  }
  if (m.status !== "complete") {
    const next = messages[index + 1];
    return name + (next && next.role === "assistant" ? " (interrupted)"
      : " (interrupted: not answered)");
  }
  return name;
}

// A reply's tool calls and their results, as conversation.render_markdown writes them.
function stepLines(steps) {
  const lines = [];
  for (const step of steps || []) {
    if (step.role === "tool") {
      lines.push("### Tool result (" + step.tool_call_id + ")", "", "```",
                 String(step.content).split("```").join("` ` `"), "```", "");
    } else {
      lines.push("### Assistant calls tools", "");
      if (step.content) lines.push(closeFences(step.content), "");
      for (const call of step.tool_calls || []) {
        lines.push("- `" + call.function.name + "(" + call.function.arguments + ")` ("
                   + call.id + ")");
      }
      lines.push("");
    }
  }
  return lines;
}

function markdown(conv) {
  const messages = conv.messages || [];
  const lines = ["# " + (conv.title || "Conversation " + conv.id), ""];
  if (conv.system) lines.push("**System:** " + closeFences(conv.system), "");
  messages.forEach((m, index) => {
    lines.push(...stepLines(m.steps));
    lines.push("### " + label(messages, index), "", closeFences(m.content), "");
  });
  let text = lines.join("\n");
  const memory = (conv.memory && typeof conv.memory === "object") ? conv.memory : {};
  const pins = Array.isArray(memory.pins) ? memory.pins : [];
  if (memory.summary) text += "\n## Summary of the earlier turns\n\n" + memory.summary + "\n";
  if (pins.length) text += "\nPinned turns: " + pins.map((p) => p + 1).join(", ") + "\n";
  return text;
}

function json(conv) {
  const messages = (conv.messages || []).flatMap((m) => [
    ...(m.steps || []),
    (m.status && m.status !== "complete" ? { role: m.role, content: m.content, status: m.status }
      : { role: m.role, content: m.content })]);
  return JSON.stringify({ system: conv.system ?? null, messages: messages, id: conv.id,
                          title: conv.title, persona: conv.persona ?? null,
                          model: conv.model ?? null, params: conv.params ?? {},
                          memory: conv.memory ?? {}, created_at: conv.created_at }, null, 2);
}

// The text of an export: format "json" (rolechat's own, importable) or "md".
export function exportText(conv, format) {
  return format === "json" ? json(conv) : markdown(conv);
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
