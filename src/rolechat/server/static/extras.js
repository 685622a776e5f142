// Math and diagrams in replies: LaTeX through KaTeX, ```mermaid blocks through Mermaid. Both
// vendored (vendor/README.md).
// SAFETY:
// - Math is taken out of the text before Markdown sees it (outside code), rendered by KaTeX
//   as MathML only (trust off: \href, \url, \htmlData and the like stay inert text), and put
//   back into the HTML *before* DOMPurify sanitizes the whole reply (markdown.js), whose
//   MathML profile keeps the math and drops anything else.
// - A Mermaid diagram is rendered with securityLevel "strict" (no click handlers, labels
//   escaped) and shown as an <img> of its SVG: an image cannot run scripts or load anything.
//   Mermaid is loaded the first time a reply has a diagram (it is large).

import { t } from "./i18n.js";

const MATH_PATTERN = new RegExp([
  String.raw`\$\$([\s\S]+?)\$\$`,            // $$ display $$
  String.raw`\\\[([\s\S]+?)\\\]`,            // \[ display \]
  String.raw`\\\(([\s\S]+?)\\\)`,            // \( inline \)
  String.raw`(?<![\\$\w])\$(?![\s$])([^$\n]+?)(?<![\s\\])\$(?![\w$])`,  // $inline$, not $5 or $6
].join("|"), "g");
// Code (fenced blocks, inline spans) is never math.
const CODE_PATTERN = /(^|\n)(```|~~~)[\s\S]*?(\n\2[^\n]*|$)|`[^`\n]+`/g;

// `text` with its math replaced by tokens; `math` lists what each token stands for.
export function takeMath(text) {
  const math = [];
  const nonce = Math.random().toString(36).slice(2, 10);
  const swap = (part) => part.replace(MATH_PATTERN, (whole, d1, d2, inline1, inline2) => {
    const tex = d1 ?? d2 ?? inline1 ?? inline2;
    math.push({ tex, display: d1 !== undefined || d2 !== undefined });
    return "KATEX" + nonce + "X" + (math.length - 1) + "X";
  });
  let out = "";
  let last = 0;
  for (const code of text.matchAll(CODE_PATTERN)) {
    out += swap(text.slice(last, code.index)) + code[0];
    last = code.index + code[0].length;
  }
  out += swap(text.slice(last));
  return { text: out, math, token: math.length ? new RegExp("KATEX" + nonce + "X(\\d+)X", "g")
                                                : null };
}

// `html` with the tokens of takeMath() replaced by KaTeX's MathML (or the TeX as text when
// KaTeX is not there).
export function putMath(html, taken, escapeHTML) {
  if (!taken.token) return html;
  return html.replace(taken.token, (_, index) => {
    const { tex, display } = taken.math[Number(index)];
    if (!window.katex) return escapeHTML(display ? "$$" + tex + "$$" : "$" + tex + "$");
    const mathml = window.katex.renderToString(tex, { displayMode: display, output: "mathml",
                                                      throwOnError: false, trust: false,
                                                      strict: "ignore", maxExpand: 200 });
    // The TeX it came from (<annotation>, escaped by KaTeX) is not shown: DOMPurify would keep
    // its text and drop the element.
    return mathml.replace(/<annotation\b[^>]*>[\s\S]*?<\/annotation>/g, "");
  });
}

let mermaidLoading = null;
let diagrams = 0;
const rendered = new Map();  // diagram source -> {url, width} of its <img> (or {error})

function loadMermaid() {
  if (!mermaidLoading) {
    mermaidLoading = new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = "vendor/mermaid/mermaid.min.js";
      script.onload = () => {
        const dark = window.matchMedia("(prefers-color-scheme: dark)").matches;
        window.mermaid.initialize({ startOnLoad: false, securityLevel: "strict",
                                    theme: dark ? "dark" : "default",
                                    htmlLabels: false, flowchart: { htmlLabels: false },
                                    suppressErrorRendering: true });
        resolve(window.mermaid);
      };
      script.onerror = () => reject(new Error(t("diagram.loadFailed")));
      document.head.appendChild(script);
    });
  }
  return mermaidLoading;
}

async function diagramImage(source) {
  if (!rendered.has(source)) {
    const job = loadMermaid().then(async (mermaid) => {
      diagrams += 1;
      const { svg } = await mermaid.render("rolechat-diagram-" + diagrams, source);
      // As well-formed XML (an image's SVG is parsed as XML; Mermaid writes HTML's <br>).
      const parsed = new DOMParser().parseFromString(svg, "text/html").querySelector("svg");
      const box = (parsed.getAttribute("viewBox") || "").split(/[\s,]+/).map(Number);
      const width = box.length === 4 && box[2] > 0 ? Math.ceil(box[2]) : 0;
      parsed.removeAttribute("width");  // "100%": the image's own size is the diagram's
      parsed.removeAttribute("style");
      const xml = new XMLSerializer().serializeToString(parsed);
      return { url: "data:image/svg+xml;charset=utf-8," + encodeURIComponent(xml), width };
    });
    rendered.set(source, job.catch((err) => ({ error: String(err && err.message || err) })));
  }
  return rendered.get(source);
}

// Each ```mermaid block under `root` gets its diagram below it, once rendered; the code stays
// (collapsed) as the diagram's source. `streaming`: the reply is still being written (the
// diagram waits for the end, as a half-written one would only fail).
export function renderDiagrams(root, streaming) {
  if (streaming) return;
  for (const code of root.querySelectorAll("code.language-mermaid")) {
    const block = code.closest(".code-block") || code.parentElement;
    if (block.nextElementSibling && block.nextElementSibling.classList.contains("diagram")) {
      continue;
    }
    const figure = document.createElement("figure");
    figure.className = "diagram";
    figure.dataset.testid = "diagram";
    block.after(figure);
    diagramImage(code.textContent).then((drawn) => {
      if (drawn.error !== undefined) {
        figure.textContent = t("diagram.failed", { error: drawn.error });
        figure.classList.add("failed");
        return;
      }
      const img = document.createElement("img");
      img.src = drawn.url;
      if (drawn.width) img.width = drawn.width;
      img.alt = t("diagram.alt", { source: code.textContent.trim().split("\n")[0].slice(0, 80) });
      figure.replaceChildren(img);
    });
  }
}
