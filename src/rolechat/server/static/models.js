// The model picker. /v1/models lists what the server can serve, the loaded model first; with
// more than one, the header shows a select (labelled "Model") instead of the model's name, and
// the Settings panel shows the same choice. The
// model picked is kept on this device (localStorage) and sent as `model` with every request
// that creates a conversation or writes a reply; the server loads it for the first one, and
// the page says "Loading MODEL…" until that reply comes. A request answered 503
// model_loading (another tab or client switched models) is retried by api.js, which calls
// showLoading() meanwhile.

import { api, onModelLoading } from "./api.js";
import { onLanguageChange, t } from "./i18n.js";
import { el, els, showNotice } from "./page.js";

const CHOICE_STORE = "rolechat.model";

const models = {
  list: [],       // /v1/models' entries
  loaded: null,   // the id of the model loaded now
  chosen: null,   // the id picked here (the loaded one unless another was picked)
  loading: false, // the notice says a model is loading
};

function stored() {
  try { return window.localStorage.getItem(CHOICE_STORE); } catch (_) { return null; }
}

function store(id) {
  try { window.localStorage.setItem(CHOICE_STORE, id); } catch (_) { /* kept for this page */ }
}

function size(bytes) {
  if (typeof bytes !== "number") return null;
  return bytes >= 1e9 ? (bytes / 1e9).toFixed(1) + " GB" : Math.round(bytes / 1e6) + " MB";
}

// What an option's tooltip says of a model: where it is, its size, quantization, context.
function facts(m) {
  return [m.location, size(m.size), m.quantization,
          m.context_length ? t("model.context", { n: m.context_length }) : null]
    .filter(Boolean).join(" · ");
}

function render() {
  const several = models.list.length > 1;
  els.model.textContent = models.loaded || "…";
  const loaded = models.list.find((m) => m.id === models.loaded);
  if (loaded && loaded.context_length) {
    els.model.title = t("model.context", { n: loaded.context_length });
  }
  els.model.hidden = several;
  els.modelBox.hidden = els.settingsModelBox.hidden = !several;
  for (const picker of [els.modelPicker, els.settingsModel]) {
    picker.replaceChildren(...models.list.map((m) => {
      const option = el("option", null, m.loaded ? t("model.loaded", { id: m.id }) : m.id);
      option.value = m.id;
      option.title = facts(m);
      return option;
    }));
    if (models.chosen) picker.value = models.chosen;
  }
}

// Read /v1/models again: the loaded model (another tab may have switched), and the choice
// kept on this device if the server still lists it.
export async function refreshModels() {
  const body = await api("/models");
  models.list = (body && body.data) || [];
  const loaded = models.list.find((m) => m.loaded) || models.list[0];
  models.loaded = loaded ? loaded.id : null;
  const kept = stored();
  models.chosen = models.list.some((m) => m.id === kept) ? kept : models.loaded;
  if (models.loading) {  // the request that waited for the load has its answer
    models.loading = false;
    showNotice("");
  }
  render();
}

// The model to name in a request: the one picked, when the server offers a choice.
export function chosenModel() {
  return models.list.length > 1 ? models.chosen : null;
}

// A request body, naming the model picked (if there is a choice).
export function withModel(body) {
  const chosen = chosenModel();
  if (chosen) body.model = chosen;
  return body;
}

// Before a request that names a model the server has not loaded: say it is loading.
export function announceLoad() {
  const chosen = chosenModel();
  if (chosen && chosen !== models.loaded) showLoading(chosen);
}

export function showLoading(name) {
  models.loading = true;
  showNotice(t("model.loading", { name: name || chosenModel() || t("model.theModel") }));
}

// A request was answered 503 model_loading: say which model the server is loading.
async function serverLoading() {
  let name = null;
  try {
    const status = await api("/status");
    name = status && status.models && status.models.loading && status.models.loading.model;
  } catch (_) { /* the notice names the model picked */ }
  showLoading(name);
}

function pick(picker) {
  models.chosen = picker.value;
  els.modelPicker.value = els.settingsModel.value = models.chosen;  // the two agree
  store(models.chosen);
  showNotice(models.chosen === models.loaded ? ""
    : t("model.nextMessage", { name: models.chosen }));
}

export function wireModels() {
  els.modelPicker.addEventListener("change", () => pick(els.modelPicker));
  els.settingsModel.addEventListener("change", () => pick(els.settingsModel));
  onModelLoading(serverLoading);
  onLanguageChange(render);
}
