// The urae-serve playground: plain browser JavaScript over the public HTTP API.
// The job event stream is read with fetch() and a stream reader, not EventSource, because
// EventSource cannot send the Authorization header.
"use strict";

const KEY_STORAGE = "urae.apiKey";
const JOBS_STORAGE = "urae.recentJobs";
const MAX_REMEMBERED_JOBS = 24;
const TERMINAL = new Set(["finished", "failed", "canceled"]);
// Speed tiers (jobstore/contract.py TIERS) as the selector names them.
const TIER_LABELS = { quality: "quality", fast: "fast (fp8)", turbo: "turbo (step cache)" };
// Presets from small to large; a refine is offered only at a preset above the image's own.
const PRESET_ORDER = ["1k", "2k", "4k"];
const REFINE_PRESETS = ["2k", "4k"];

const KEY_NEEDED = "This server needs an API key: urae-serve prints it (and a link that carries it) " +
  "when it starts; other servers: one of URAE_API_KEYS.";
const KEY_REFUSED = "The server refused this API key. urae-serve prints a new key each time it starts: " +
  "paste the key (or open the link) from its latest output; other servers: ask for one of URAE_API_KEYS.";

const $ = (id) => document.getElementById(id);
let apiKey = localStorage.getItem(KEY_STORAGE) || "";

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function authHeaders(extra = {}) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra;
}

// A 503 is an error too, except where the caller reads it as an answer (answers503: /ready, "not ready").
async function api(path, options = {}) {
  const { answers503, ...init } = options;
  const response = await fetch(path, { ...init, headers: authHeaders(init.headers || {}) });
  if (response.status === 401) {
    // A key that is present but refused is usually an old one: urae-serve makes a new key each start.
    showKeyForm(apiKey ? KEY_REFUSED : KEY_NEEDED);
    throw new ApiError(401, apiKey ? "the API key was refused: enter the current one above" :
      "an API key is needed: enter it above");
  }
  if (!response.ok && !(answers503 && response.status === 503)) {
    let detail = `${response.status} ${response.statusText}`;
    try {
      detail = (await response.json()).detail || detail;
    } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, detail);
  }
  return response;
}

// -- access and server state ------------------------------------------------------------------------
function showKeyForm(reason) {
  $("key-form").hidden = false;
  $("message").textContent = reason || "";
}

async function refreshServer() {
  const pill = $("server-status");
  try {
    const response = await api("/ready", { answers503: true });
    const body = await response.json();
    if (response.status === 200) {
      pill.textContent = `${body.model} · ${body.live_workers} worker${body.live_workers === 1 ? "" : "s"}`;
      pill.className = "pill ready";
    } else {
      pill.textContent = body.detail || "not ready";
      pill.className = "pill down";
    }
    return true;
  } catch (err) {
    pill.textContent = err.status === 401 ? (apiKey ? "API key refused" : "API key needed") : "server unreachable";
    pill.className = "pill down";
    return false;
  }
}

async function loadAdapters() {
  const list = $("adapter-list");
  try {
    const body = await (await api("/adapters")).json();
    list.textContent = "";
    list.className = "";
    for (const adapter of body.adapters) {
      const row = document.createElement("label");
      row.className = "adapter";
      row.innerHTML = '<input type="checkbox"><span class="name"></span>' +
        '<input type="number" class="weight" min="-4" max="4" step="0.05" value="1" title="weight">';
      row.querySelector(".name").textContent = adapter.name;
      row.querySelector(".name").title = adapter.description || "";
      row.dataset.name = adapter.name;
      list.appendChild(row);
    }
    if (!body.adapters.length) list.textContent = "no adapters registered";
  } catch (err) {
    list.textContent = err.message;
  }
}

// Fields the user has changed keep their values; the server's suggestions fill the others.
const touched = new Set();

// mini's presets are scaled to its 128 px training size, and it draws the world's captions.
function showMiniScale() {
  const labels = { "1k": "1K: mini's base (128²)", "2k": "2K: 2x (256²)", "4k": "4K: 4x (512²)" };
  for (const option of $("preset").options) {
    if (labels[option.value]) option.textContent = labels[option.value];
  }
  $("prompt").placeholder = "two red circles and a blue square in a row on a striped background";
}

// Only the tiers the live workers serve are offered: another would be refused at submission.
function showTiers(tiers) {
  const select = $("tier");
  const chosen = select.value;
  select.textContent = "";
  for (const tier of tiers.length ? tiers : ["quality"]) {
    const option = document.createElement("option");
    option.value = tier;
    option.textContent = TIER_LABELS[tier] || tier;
    select.append(option);
  }
  if (tiers.includes(chosen)) select.value = chosen;
  else select.value = tiers.includes("quality") ? "quality" : select.options[0].value;
  select.disabled = tiers.length <= 1;
  $("tier-note").textContent = tiers.length === 0 ? "no worker is live yet: quality assumed" :
    tiers.length === 1 ? `the live workers serve only the ${tiers[0]} tier` : "";
}

async function applySuggestedSettings() {
  try {
    const { suggested, model, tiers, input_image: limits } = await (await api("/config")).json();
    if (limits) inputLimits = limits;
    if (model === "mini") showMiniScale();
    if (tiers) showTiers(tiers);
    if (!suggested) return;
    const set = (id, value) => {
      if (value !== null && value !== undefined && !touched.has(id)) $(id).value = String(value);
    };
    if (!touched.has("preset")) {
      $("preset").value = suggested.width ? "custom" : (suggested.preset || $("preset").value);
    }
    set("width", suggested.width);
    set("height", suggested.height);
    set("aspect-ratio", suggested.aspect_ratio);
    set("steps", suggested.steps);
    $("preset").title = suggested.reason || "";
    syncSizeFields();
  } catch (_) { /* an older server without /config: keep the page's defaults */ }
}

async function connect() {
  if (await refreshServer()) {
    $("message").textContent = "";
    await applySuggestedSettings();
    await loadAdapters();
    await restoreJobs();
  }
}

// -- the image to start from (image to image) ------------------------------------------------------
// The chosen file as a data URL, sent as `image`; the limits are GET /config's (the server checks too).
let inputImage = null;
let inputLimits = { max_bytes: null, content_types: ["image/png", "image/jpeg", "image/webp"] };

function clearInputImage(note = "") {
  inputImage = null;
  $("input-image").value = "";
  $("input-preview").hidden = true;
  $("input-preview").removeAttribute("src");
  $("clear-image").hidden = true;
  $("strength").disabled = true;
  $("input-note").textContent = note || "fitted to the size above: scaled to cover it, centre-cropped";
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function chooseInputImage() {
  const file = $("input-image").files[0];
  if (!file) return clearInputImage();
  if (!inputLimits.content_types.includes(file.type)) {
    return clearInputImage(`${file.name}: ${file.type || "this type"} is not accepted ` +
                           `(${inputLimits.content_types.join(", ")})`);
  }
  if (inputLimits.max_bytes && file.size > inputLimits.max_bytes) {
    return clearInputImage(`${file.name} is ${file.size.toLocaleString()} bytes, over the server's limit of ` +
                           `${inputLimits.max_bytes.toLocaleString()}`);
  }
  inputImage = await readAsDataUrl(file);
  $("input-preview").src = inputImage;
  $("input-preview").hidden = false;
  $("clear-image").hidden = false;
  $("strength").disabled = false;
  $("input-note").textContent = `${file.name}: fitted to the size above (scaled to cover it, centre-cropped)`;
}

// -- the request ------------------------------------------------------------------------------------
function numberOrNull(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function buildRequest() {
  const body = {
    prompt: $("prompt").value,
    num_images: numberOrNull("num-images") || 1,
    output_format: $("output-format").value,
    priority: $("priority").value,
  };
  if ($("preset").value === "custom") {
    body.width = numberOrNull("width");
    body.height = numberOrNull("height");
  } else {
    body.preset = $("preset").value;
    body.aspect_ratio = $("aspect-ratio").value;
  }
  for (const [field, id] of [["steps", "steps"], ["guidance", "guidance"]]) {
    const value = numberOrNull(id);
    if (value !== null) body[field] = value;
  }
  // Seeds go up to 2^63 - 1, past what a JavaScript number holds exactly (2^53): they travel as the
  // decimal text the user typed, which the API accepts for any integer field.
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = seed;
  body.tier = $("tier").value;
  body.adapters = [...document.querySelectorAll("#adapter-list .adapter")]
    .filter((row) => row.querySelector("input[type=checkbox]").checked)
    .map((row) => ({ name: row.dataset.name, weight: Number(row.querySelector(".weight").value) }));
  if (inputImage) {
    body.image = inputImage;
    const strength = numberOrNull("strength");
    if (strength !== null) body.strength = strength;
  }
  return body;
}

async function submit(event) {
  event.preventDefault();
  const button = $("submit");
  button.disabled = true;
  $("message").textContent = "";
  try {
    const response = await api("/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(buildRequest()),
    });
    showNewJob(await response.json(), $("prompt").value);
  } catch (err) {
    $("message").textContent = err.message;
  } finally {
    button.disabled = false;
  }
}

// The same picture (prompt, seed, adapters) at a larger preset, drawn from one image of a finished job.
async function refine(card, jobId, index, preset, button) {
  button.disabled = true;
  card.querySelector(".error").textContent = "";
  try {
    const response = await api(`/jobs/${jobId}/refine`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ preset, index, tier: $("tier").value }),
    });
    showNewJob(await response.json(), card.querySelector(".prompt-text").title);
  } catch (err) {
    card.querySelector(".error").textContent = err.message;
  } finally {
    button.disabled = false;
  }
}

// The presets larger than an image: its preset row ("2k", or a model's own "2k-mini") names its class.
function refineTargets(result) {
  const rank = PRESET_ORDER.indexOf(String(result.preset || "").split("-")[0]);
  return rank < 0 ? [] : REFINE_PRESETS.filter((preset) => PRESET_ORDER.indexOf(preset) > rank);
}

// -- job cards --------------------------------------------------------------------------------------
function showNewJob(job, prompt) {
  rememberJob(job.id, prompt);
  follow(addCard(job, prompt), job);
}

function addCard(job, prompt) {
  const card = $("job-template").content.firstElementChild.cloneNode(true);
  card.dataset.jobId = job.id;
  card.querySelector(".prompt-text").textContent = prompt || job.id;
  card.querySelector(".prompt-text").title = prompt || "";
  card.querySelector(".cancel").addEventListener("click", () => cancel(card));
  $("gallery").prepend(card);
  $("empty-gallery").hidden = true;
  setStatus(card, job.status);
  if (job.status === "queued" && job.queue_position !== null && job.queue_position !== undefined) {
    card.querySelector(".progress-label").textContent = `waiting in the queue (position ${job.queue_position + 1})`;
  }
  return card;
}

function setStatus(card, status) {
  card.dataset.status = status;
  card.querySelector(".status").textContent = status;
  card.querySelector(".cancel").hidden = TERMINAL.has(status);
  if (status === "started" && card.querySelector(".progress").value === 0) {
    card.querySelector(".progress-label").textContent = "starting";
  }
}

// Overall percentage: the denoising loop is most of the work, the VAE decode the rest.
function percent(progress) {
  const fraction = progress.total ? progress.step / progress.total : 0;
  if (progress.stage === "text_encode") return 2;
  if (progress.stage === "denoise") return Math.round(5 + 85 * fraction);
  if (progress.stage === "decode") return Math.round(90 + 9 * fraction);
  return Math.round(99 * fraction);
}

function setProgress(card, progress) {
  const bar = card.querySelector(".progress");
  bar.value = Math.max(bar.value, percent(progress));
  const label = progress.stage.replace("_", " ");
  card.querySelector(".progress-label").textContent = `${label} ${progress.step}/${progress.total}`;
}

// A job's timings: durations in seconds (a stage's name), wall-clock times (*_at, seconds since the
// epoch), byte counts (*_bytes) and flags (*_hit, 0 or 1).
function formatTiming(key, value) {
  const number = Number(value);
  if (key.endsWith("_at")) return new Date(number * 1000).toLocaleTimeString();
  if (key.endsWith("_bytes")) return formatBytes(number);
  if (key.endsWith("_hit")) return String(value);
  return `${number.toFixed(2)} s`;
}

function formatBytes(bytes) {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let size = Math.abs(bytes);
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  const text = unit === 0 ? String(size) : size.toFixed(1);
  return `${bytes < 0 ? "-" : ""}${text} ${units[unit]}`;
}

// A live preview (event: preview): a small JPEG of the latents as the image forms.
function setPreview(card, preview) {
  if (card.querySelector(".results img")) return; // the final image is already shown
  const img = card.querySelector(".preview");
  img.src = preview.image;
  img.width = preview.width;
  img.height = preview.height;
  img.title = `preview after step ${preview.step} of ${preview.total}`;
  img.dataset.step = String(preview.step);
  img.hidden = false;
}

async function cancel(card) {
  const button = card.querySelector(".cancel");
  button.disabled = true;
  try {
    await api(`/jobs/${card.dataset.jobId}`, { method: "DELETE" });
    card.querySelector(".progress-label").textContent = "canceling…";
  } catch (err) {
    card.querySelector(".error").textContent = err.message;
    button.disabled = false;
  }
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trim());
  }
  return data.length ? { name, data: JSON.parse(data.join("\n")) } : null;
}

async function follow(card, job) {
  if (!TERMINAL.has(job.status)) {
    try {
      const response = await api(`/jobs/${job.id}/events`, { headers: { Accept: "text/event-stream" } });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (!event) continue;
          if (event.name === "progress") setProgress(card, event.data);
          else if (event.name === "preview") setPreview(card, event.data);
          else if (event.name === "status") setStatus(card, event.data.status);
        }
      }
    } catch (err) {
      card.querySelector(".error").textContent = `event stream lost (${err.message}); showing the last state`;
    }
  }
  // The stream ends after the terminal status; the job record has the result and the timings.
  try {
    const final = await (await api(`/jobs/${job.id}`)).json();
    await showResult(card, final);
  } catch (err) {
    card.querySelector(".error").textContent = err.message;
  }
}

async function showResult(card, job) {
  setStatus(card, job.status);
  if (job.progress) setProgress(card, job.progress);
  if (job.status === "finished") {
    card.querySelector(".progress").value = 100;
    card.querySelector(".progress-label").textContent = "done";
  } else if (!TERMINAL.has(job.status)) {
    return follow(card, job);
  }
  if (job.error) card.querySelector(".error").textContent = job.error;
  const result = job.result || {};
  const meta = card.querySelector(".meta");
  meta.textContent = "";
  // seed_str: the seed exactly (a JSON number past 2^53 arrives rounded in JavaScript).
  const seed = result.seed_str ?? (result.seed === undefined ? null : String(result.seed));
  const rows = [
    ["size", result.width ? `${result.width}×${result.height}` : null],
    ["preset", result.preset],
    ["seed", seed],
    ["steps", result.steps],
    ["tier", result.tier],
    ["adapters", (result.adapters || []).map((a) => `${a.name ?? a[0]}:${a.weight ?? a[1]}`).join(", ") || null],
    ["time", Object.keys(job.timings || {}).length
      ? Object.entries(job.timings).map(([k, v]) => `${k} ${formatTiming(k, v)}`).join(", ") : null],
    ["job", job.id],
  ];
  for (const [term, value] of rows) {
    if (value === null || value === undefined || value === "") continue;
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = String(value);
    if (term === "seed") {
      const reuse = document.createElement("button");
      reuse.type = "button";
      reuse.className = "reuse-seed";
      reuse.textContent = "use";
      reuse.title = "put this seed in the form";
      reuse.addEventListener("click", () => { $("seed").value = value; });
      dd.append(" ", reuse);
    }
    meta.append(dt, dd);
  }
  const results = card.querySelector(".results");
  results.textContent = "";
  // The final image replaces the preview; a canceled or failed job keeps its last preview.
  if ((result.images || []).length) card.querySelector(".preview").hidden = true;
  for (const image of result.images || []) {
    // Image URLs need the Authorization header too, so they are fetched and shown as blob URLs.
    const response = await api(image.url);
    const url = URL.createObjectURL(await response.blob());
    const img = document.createElement("img");
    img.alt = `image ${image.index} of job ${job.id}`;
    img.src = url;
    const link = document.createElement("a");
    link.className = "download";
    link.href = url;
    link.download = `${job.id}-${image.index}.${image.key.split(".").pop()}`;
    link.textContent = `Download ${image.width}×${image.height} ${image.content_type.split("/")[1].toUpperCase()}`;
    results.append(img, link);
    const refineRow = document.createElement("div");
    refineRow.className = "refine";
    for (const preset of refineTargets(result)) {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.preset = preset;
      button.textContent = `Refine at ${preset.toUpperCase()}`;
      button.title = `this picture again at ${preset.toUpperCase()}: the same prompt, seed and adapters, drawn from it`;
      button.addEventListener("click", () => refine(card, job.id, image.index, preset, button));
      refineRow.append(button);
    }
    if (refineRow.childElementCount) results.append(refineRow);
  }
}

// -- the gallery survives a reload --------------------------------------------------------------------
function rememberJob(id, prompt) {
  const jobs = JSON.parse(localStorage.getItem(JOBS_STORAGE) || "[]").filter((j) => j.id !== id);
  jobs.unshift({ id, prompt });
  localStorage.setItem(JOBS_STORAGE, JSON.stringify(jobs.slice(0, MAX_REMEMBERED_JOBS)));
}

async function restoreJobs() {
  const jobs = JSON.parse(localStorage.getItem(JOBS_STORAGE) || "[]");
  const kept = [];
  for (const { id, prompt } of jobs.slice().reverse()) {
    if (document.querySelector(`.job[data-job-id="${id}"]`)) continue;
    try {
      const job = await (await api(`/jobs/${id}`)).json();
      kept.unshift({ id, prompt });
      showResult(addCard(job, prompt), job);
    } catch (_) { /* expired or from another server */ }
  }
  localStorage.setItem(JOBS_STORAGE, JSON.stringify(kept));
}

// -- wiring -----------------------------------------------------------------------------------------
function syncSizeFields() {
  const custom = $("preset").value === "custom";
  for (const el of document.querySelectorAll(".custom-size")) el.hidden = !custom;
  $("aspect-field").hidden = custom;
}

function init() {
  // urae-serve prints a link with the key in the fragment: the fragment never reaches the server.
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("key")) {
    apiKey = fragment.get("key");
    localStorage.setItem(KEY_STORAGE, apiKey);
    history.replaceState(null, "", location.pathname + location.search);
  }
  $("api-key").value = apiKey;
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    apiKey = $("api-key").value.trim();
    localStorage.setItem(KEY_STORAGE, apiKey);
    $("key-form").hidden = true;
    connect();
  });
  $("generate-form").addEventListener("submit", submit);
  for (const id of ["preset", "aspect-ratio", "width", "height", "steps"]) {
    $(id).addEventListener("input", () => touched.add(id));
    $(id).addEventListener("change", () => touched.add(id));
  }
  $("preset").addEventListener("change", syncSizeFields);
  $("input-image").addEventListener("change", () => {
    chooseInputImage().catch((err) => clearInputImage(`the file could not be read: ${err.message}`));
  });
  $("clear-image").addEventListener("click", () => clearInputImage());
  $("random-seed").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * 2 ** 32);
  });
  syncSizeFields();
  connect();
  setInterval(refreshServer, 15000);
}

init();
