// The page's language: English or Simplified Chinese. Every user-visible string the page
// writes is a key in one catalogue per language (i18n/en.js, i18n/zh-CN.js: plain objects,
// the same keys); English is the fallback for a key a catalogue lacks.
// - t(key, vars): the current language's text, its {name} placeholders filled from `vars`.
// - tn(key, n, vars): the same for a count: key.one or key.other (Intl.PluralRules), {n} = n.
// - translatePage(root): static markup, by attribute: data-i18n (the text), data-i18n-title,
//   data-i18n-aria-label, data-i18n-placeholder (those attributes).
// - The language: the one chosen in the sidebar's select (kept in localStorage), else the
//   first of the browser's languages the page speaks (zh*: zh-CN, en*: en), else English.
//   setLanguage() switches at once, without a reload: the markup is translated again and
//   onLanguageChange()'s listeners redraw what they wrote (app.js: the open conversation's
//   chrome, the list; search.js, keys.js, models.js their own parts).
// Server text (titles, messages, the API's error messages) is never translated.

import en from "./i18n/en.js";
import zhCN from "./i18n/zh-CN.js";

export const CATALOGUES = { "en": en, "zh-CN": zhCN };
// Each language by its own name: the same in every language, so not in the catalogues.
export const LANGUAGES = [["en", "English"], ["zh-CN", "中文（简体）"]];

const STORE = "rolechat.language";

function supported(tag) {
  const lower = String(tag || "").toLowerCase();
  if (lower.startsWith("zh")) return "zh-CN";
  if (lower === "en" || lower.startsWith("en-")) return "en";
  return null;
}

// The browser's choice: the first of navigator.languages the page speaks.
export function browserLanguage() {
  const tags = (navigator.languages && navigator.languages.length) ? navigator.languages
    : [navigator.language];
  for (const tag of tags) {
    const found = supported(tag);
    if (found) return found;
  }
  return "en";
}

function stored() {
  try {
    const lang = window.localStorage.getItem(STORE);
    return lang && CATALOGUES[lang] ? lang : null;
  } catch (_) { return null; }
}

let current = stored() || browserLanguage();
const listeners = [];

export function language() { return current; }

export function t(key, vars) {
  let text = CATALOGUES[current][key];
  if (text === undefined) text = en[key];
  if (text === undefined) return key;
  if (!vars) return text;
  return text.replace(/\{(\w+)\}/g, (whole, name) =>
    (vars[name] === undefined || vars[name] === null ? whole : String(vars[name])));
}

let plurals = null;
export function tn(key, n, vars) {
  if (!plurals || plurals.lang !== current) {
    plurals = { lang: current, rules: new Intl.PluralRules(current) };
  }
  const form = plurals.rules.select(n) === "one" ? ".one" : ".other";
  return t(key + form, Object.assign({ n: n }, vars || {}));
}

const ATTRIBUTES = [["i18nTitle", "title"], ["i18nAriaLabel", "aria-label"],
                    ["i18nPlaceholder", "placeholder"]];

export function translatePage(root = document) {
  document.documentElement.lang = current;
  for (const node of root.querySelectorAll("[data-i18n]")) {
    const text = t(node.dataset.i18n);
    if (node.textContent !== text) node.textContent = text;
  }
  for (const [data, attribute] of ATTRIBUTES) {
    const selector = "[data-" + data.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase()) + "]";
    for (const node of root.querySelectorAll(selector)) {
      node.setAttribute(attribute, t(node.dataset[data]));
    }
  }
}

// `redraw()` is called after each switch of language, once the markup is translated.
export function onLanguageChange(redraw) { listeners.push(redraw); }

export function setLanguage(lang) {
  const next = CATALOGUES[lang] ? lang : "en";
  try { window.localStorage.setItem(STORE, next); } catch (_) { /* for this page only */ }
  if (next === current) return;
  current = next;
  translatePage();
  for (const redraw of listeners) redraw();
}

// The sidebar's select (#language): shows the current language, switches on change.
export function wireLanguage(select) {
  select.replaceChildren(...LANGUAGES.map(([lang, name]) => {
    const option = document.createElement("option");
    option.value = lang;
    option.lang = lang;
    option.textContent = name;
    return option;
  }));
  select.value = current;
  select.addEventListener("change", () => setLanguage(select.value));
  onLanguageChange(() => { select.value = current; });
}
