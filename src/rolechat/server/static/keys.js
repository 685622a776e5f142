// Keyboard shortcuts, the tab's title and what the page says to a screen reader.
// - Esc stops the reply being written (when none is, Esc keeps its other jobs: closing the
//   drawer, the menu, an edit). Ctrl+Shift+O (⌘+Shift+O) starts a new chat. "?" (outside a
//   text field) lists the shortcuts in a dialog; Ctrl+K (search.js) searches.
// - The tab is titled after the open conversation ("Title · rolechat").
// - A finished reply is announced once, through one polite live region (#announcer); the
//   streamed text is never announced chunk by chunk.
// - Scrollable regions (code blocks, the prompt's text) take keyboard focus, so they can be
//   scrolled with the arrow keys.
// - A menu (role="menu" in a <details class="menu">) takes focus on its first item when it
//   opens; the arrow keys, Home and End move between its items.

import { onLanguageChange, t } from "./i18n.js";

// The keys (as written on keyboards, in every language) and what they do (a catalogue key).
export const SHORTCUTS = [
  ["Enter", "shortcuts.send"],
  ["Shift+Enter", "shortcuts.newLine"],
  ["Esc", "shortcuts.stop"],
  ["Ctrl+K", "shortcuts.search"],
  ["Ctrl+Shift+O", "shortcuts.newChat"],
  ["?", "shortcuts.list"],
];

function typing(target) {
  return target instanceof HTMLElement &&
    (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
}

// The shortcuts' texts, in the page's language (again after a switch).
function labelShortcuts(dialog) {
  dialog.querySelector("#shortcuts-title").textContent = t("shortcuts.title");
  dialog.querySelectorAll("dd").forEach((desc, index) => {
    desc.textContent = t(SHORTCUTS[index][1]);
  });
  dialog.querySelector("button").textContent = t("common.close");
}

function shortcutsDialog() {
  let dialog = document.getElementById("shortcuts");
  if (dialog) return dialog;
  dialog = document.createElement("dialog");
  dialog.id = "shortcuts";
  dialog.dataset.testid = "shortcuts";
  dialog.setAttribute("aria-labelledby", "shortcuts-title");
  const title = document.createElement("h2");
  title.id = "shortcuts-title";
  dialog.appendChild(title);
  const list = document.createElement("dl");
  for (const [keys] of SHORTCUTS) {
    const term = document.createElement("dt");
    const kbd = document.createElement("kbd");
    kbd.textContent = keys;
    term.appendChild(kbd);
    list.append(term, document.createElement("dd"));
  }
  dialog.appendChild(list);
  const close = document.createElement("button");
  close.type = "button";
  close.addEventListener("click", () => dialog.close());
  dialog.appendChild(close);
  document.body.appendChild(dialog);
  labelShortcuts(dialog);
  return dialog;
}

onLanguageChange(() => {
  const dialog = document.getElementById("shortcuts");
  if (dialog) labelShortcuts(dialog);
});

// `streaming()`: whether a reply is being written; `stop()` stops it; `newChat()` starts one.
export function wireKeys({ streaming, stop, newChat }) {
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && streaming()) {
      ev.preventDefault();
      stop();
    } else if ((ev.ctrlKey || ev.metaKey) && ev.shiftKey && ev.key.toLowerCase() === "o") {
      ev.preventDefault();
      newChat();
    } else if (ev.key === "?" && !ev.ctrlKey && !ev.metaKey && !ev.altKey && !typing(ev.target)) {
      ev.preventDefault();
      const dialog = shortcutsDialog();
      if (!dialog.open) dialog.showModal();
    }
  }, true);  // before the page's own Esc handling, which closes panels
}

// Arrow keys in every menu of the page.
export function wireMenus() {
  for (const details of document.querySelectorAll("details.menu")) {
    details.addEventListener("toggle", () => {
      const first = details.querySelector("[role^=menuitem]:not(:disabled)");
      if (details.open && first) first.focus();
    });
  }
  document.addEventListener("keydown", (ev) => {
    const menu = ev.target instanceof Element && ev.target.closest("[role=menu]");
    if (!menu || !["ArrowDown", "ArrowUp", "Home", "End"].includes(ev.key)) return;
    const items = [...menu.querySelectorAll("[role^=menuitem]:not(:disabled)")];
    if (!items.length) return;
    ev.preventDefault();
    const at = items.indexOf(ev.target);
    const next = ev.key === "Home" ? 0 : ev.key === "End" ? items.length - 1
      : (at + (ev.key === "ArrowDown" ? 1 : -1) + items.length) % items.length;
    items[next].focus();
  });
}

export function setTitle(title) {
  document.title = title ? t("tab.title", { title: title }) : "rolechat";
}

// One announcement per finished reply (`text`: what to say).
export function announce(text) {
  let region = document.getElementById("announcer");
  if (!region) {
    region = document.createElement("div");
    region.id = "announcer";
    region.className = "visually-hidden";
    region.setAttribute("role", "status");
    region.setAttribute("aria-live", "polite");
    region.dataset.testid = "announcer";
    document.body.appendChild(region);
  }
  region.textContent = "";
  // A change after a tick is announced even when the text is the same as last time.
  setTimeout(() => { region.textContent = text; }, 50);
}

// Makes a scrollable element reachable by keyboard, named for a screen reader.
export function focusable(node, label) {
  node.tabIndex = 0;
  node.setAttribute("role", "region");
  node.setAttribute("aria-label", label);
}
