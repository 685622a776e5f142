// Assistant replies as Markdown: marked turns the text into HTML, DOMPurify ALWAYS sanitizes
// that HTML before it reaches the page, highlight.js colours code blocks, and each code block
// gets a copy button; math (KaTeX) and diagrams (Mermaid) come from extras.js. The libraries
// are vendored (vendor/README.md) and loaded as globals by index.html (Mermaid on demand).
//
// SAFETY: raw HTML in a reply is shown as text (never as markup); whatever marked or
// highlight.js produce still goes through DOMPurify; links open in a new tab with
// rel="noopener noreferrer"; javascript: and other unsafe URLs are dropped by DOMPurify.

import { putMath, renderDiagrams, takeMath } from "./extras.js";
import { t } from "./i18n.js";
import { focusable } from "./keys.js";

const { marked, DOMPurify, hljs } = window;

const ENTITIES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;" };

function escapeHTML(text) {
  return String(text).replace(/[&<>"']/g, (c) => ENTITIES[c]);
}

// Highlighting every frame of a long stream is wasted work past this size.
const AUTO_DETECT_LIMIT = 20000;

function highlighted(code, lang) {
  if (lang && hljs.getLanguage(lang)) {
    return { html: hljs.highlight(code, { language: lang, ignoreIllegals: true }).value, lang };
  }
  if (!lang && code.length <= AUTO_DETECT_LIMIT) {
    const auto = hljs.highlightAuto(code);
    if (auto.language && auto.relevance >= 5) return { html: auto.value, lang: auto.language };
  }
  return { html: escapeHTML(code), lang };
}

const markdown = new marked.Marked({
  gfm: true,
  breaks: true,  // a reply's single newlines are line breaks, as the model meant them
  renderer: {
    html(token) {  // raw HTML: shown as the text it is
      const text = escapeHTML(token.text);
      return token.block ? "<p class=\"raw-html\">" + text.replace(/\n+$/, "") + "</p>\n" : text;
    },
    code(token) {
      const lang = (token.lang || "").trim().split(/\s+/)[0].toLowerCase();
      const out = highlighted(token.text.replace(/\n$/, ""), lang);
      const cls = "hljs" + (out.lang ? " language-" + escapeHTML(out.lang) : "");
      return "<pre><code class=\"" + cls + "\">" + out.html + "</code></pre>\n";
    },
  },
});

const PURIFY = {
  USE_PROFILES: { html: true, mathMl: true },  // KaTeX's MathML (extras.js), nothing more
  FORBID_TAGS: ["style", "form", "button", "textarea", "select", "iframe"],
  FORBID_ATTR: ["style"],
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

// Copies text to the clipboard; resolves to true if it worked.
export async function copyText(text) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch (_) { /* fall back below */ }
  const area = document.createElement("textarea");  // plain http on another host
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  let done = false;
  try { done = document.execCommand("copy"); } catch (_) { done = false; }
  area.remove();
  return done;
}

// A button that copies what get() returns and says so for a moment; `name`, when given, is
// what a screen reader calls it ("Copy reply", "Copy code (python)"). Both in the page's
// language (i18n.js), as is what it says after copying.
export function copyButton(label, get, testid, name) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = label;
  button.dataset.testid = testid;
  if (name) button.setAttribute("aria-label", name);
  button.addEventListener("click", async (ev) => {
    ev.stopPropagation();
    const ok = await copyText(get());
    button.textContent = ok ? t("msg.copied") : t("msg.copyFailed");
    button.dataset.copied = ok ? "1" : "0";
    setTimeout(() => { button.textContent = label; delete button.dataset.copied; }, 1500);
  });
  return button;
}

let codeBlocks = 0;

// Each <pre><code> gets a header with its language and a copy button.
function decorateCode(root) {
  for (const pre of root.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    if (!code) continue;
    const box = document.createElement("div");
    box.className = "code-block";
    const head = document.createElement("div");
    head.className = "code-head";
    const lang = /(?:^|\s)language-([\w+#.-]+)/.exec(code.className);
    const name = document.createElement("span");
    name.className = "code-lang";
    name.textContent = lang ? lang[1] : t("code.plain");
    head.appendChild(name);
    head.appendChild(copyButton(t("code.copy"), () => code.textContent, "copy-code",
                                t("code.copyName", { lang: name.textContent })));
    codeBlocks += 1;  // landmarks need names of their own
    focusable(code, t("code.region", { n: codeBlocks, lang: name.textContent }));  // it scrolls
    pre.replaceWith(box);
    box.appendChild(head);
    box.appendChild(pre);
  }
}

// A reply's headings fit the page's outline (h1 the page, h2 its sections): a reply's first
// heading is at most an h3, and none is more than one level deeper than the heading before it,
// whatever levels the model wrote ("# A" then "### B": h3 then h4), so a screen reader's list
// of headings stays in order. Each keeps the look of the level written (data-level).
function fitHeadings(root) {
  let previous = 2;
  for (const heading of root.querySelectorAll("h1, h2, h3, h4, h5, h6")) {
    const written = Number(heading.tagName[1]);
    const level = Math.min(written + 2, previous + 1, 6);
    previous = level;
    const fitted = document.createElement("h" + level);
    for (const { name, value } of heading.attributes) fitted.setAttribute(name, value);
    fitted.dataset.level = String(written);
    fitted.append(...heading.childNodes);
    heading.replaceWith(fitted);
  }
}

// Renders Markdown `text` into `target` (its children are replaced), sanitized; its math as
// MathML, its diagrams once it is no longer `streaming` (extras.js).
export function renderMarkdown(target, text, streaming = false) {
  const taken = takeMath(String(text || ""));
  const html = putMath(markdown.parse(taken.text, { async: false }), taken, escapeHTML);
  const fragment = DOMPurify.sanitize(html, PURIFY);
  decorateCode(fragment);
  fitHeadings(fragment);
  target.replaceChildren(fragment);
  renderDiagrams(target, streaming);
}
