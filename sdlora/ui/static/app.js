// sdlora ui: shared helpers, tabs and the Train panel. Every action is one call to the JSON API under /api.
"use strict";

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
};

let sayTimer = null;
function say(text, ok = false) {  // errors stay until closed; good news fades after a few seconds
  $("message-text").textContent = text;
  $("message").classList.toggle("ok", ok);
  $("message").hidden = false;
  clearTimeout(sayTimer);
  if (ok) sayTimer = setTimeout(() => { $("message").hidden = true; }, 6000);
}
$("message-close").onclick = () => { $("message").hidden = true; };

// One call to the API; a server message becomes an Error with that message (shown by the caller).
async function api(method, path, body) {
  const opts = { method, headers: { "X-Sdlora": "1" } };
  if (body instanceof FormData) opts.body = body;
  else if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
  let res;
  try { res = await fetch(path, opts); } catch (e) { throw new Error("the server does not answer (is sdlora ui still running?)"); }
  let data = null;
  try { data = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
  return data;
}
// Run an action with its button disabled; errors go to the message bar.
async function act(button, fn) {
  if (button) button.disabled = true;
  try { return await fn(); } catch (e) { say(e.message); } finally { if (button) button.disabled = false; }
}
const num = (id) => { const v = $(id).value.trim(); return v === "" ? null : Number(v); };
const fmtTime = (s) => s == null ? "" : s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.round(s % 3600 / 60)}m`
  : s >= 60 ? `${Math.floor(s / 60)}m ${Math.round(s % 60)}s` : `${Math.round(s)}s`;

// ── tabs
for (const t of document.querySelectorAll(".tab")) {
  t.onclick = () => {
    for (const o of document.querySelectorAll(".tab")) o.classList.toggle("active", o === t);
    for (const p of document.querySelectorAll(".panel")) p.hidden = p.id !== `panel-${t.dataset.panel}`;
    localStorage.setItem("sdlora.tab", t.id);
    if (t.dataset.panel !== "train" && window.refreshLibrary) window.refreshLibrary();
  };
}

// ── Train
let resolveReady;
window.sdloraReady = new Promise((r) => { resolveReady = r; });  // /api/info (presets, block layouts) has arrived
let job = null;      // the job this page shows (re-attached on reload)
let pollTimer = null;

async function refreshFolders(select) {
  const { folders } = await api("GET", "/api/folders");
  const pick = $("train-folder"), keep = select || pick.value;
  pick.replaceChildren(...folders.map((f) => el("option", { value: f.path }, `${f.path} (${f.images} images)`)));
  if (!folders.length) pick.append(el("option", { value: "" }, "no image folders under the root"));
  if (keep && folders.some((f) => f.path === keep)) pick.value = keep;
}
$("folders-refresh").onclick = () => act($("folders-refresh"), () => refreshFolders());

$("upload-go").onclick = () => act($("upload-go"), async () => {
  const files = $("upload-files").files;
  if (!files.length) throw new Error("choose images (and .txt captions) to upload");
  const form = new FormData();
  form.append("folder", $("upload-folder").value.trim());
  form.append("caption", $("upload-caption").value);
  for (const f of files) form.append("files", f, f.name);
  const r = await api("POST", "/api/upload", form);
  await refreshFolders(r.folder);
  say(`uploaded ${r.images} images (${r.captions} captions) into ${r.folder}`, true);
});

$("train-start").onclick = () => act($("train-start"), async () => {
  const body = {
    images: $("train-folder").value, name: $("train-name").value.trim(), trigger: $("train-trigger").value.trim(),
    base: $("train-base").value.trim() || "tiny", rank: num("train-rank"), steps: num("train-steps"),
    seed: num("train-seed") ?? 42, text_encoder: $("train-te").checked, overwrite: $("train-overwrite").checked,
    sample_prompt: $("train-sample-prompt").value.trim(), sample_every: num("train-sample-every"),
    targets: $("train-targets").value || null, unet_lr: num("train-lr"),
  };
  if (!body.images) throw new Error("pick an image folder (or upload one)");
  show(await api("POST", "/api/train", body));
  poll();
});
$("train-stop").onclick = () => act($("train-stop"), async () => {
  if (!job) throw new Error("no training job to stop");
  show(await api("POST", `/api/jobs/${job.id}/stop`));
});
$("train-resume").onclick = () => act($("train-resume"), async () => {
  show(await api("POST", "/api/resume", { run: job.name }));
  poll();
});

function show(state) {
  job = state;
  const pct = state.total ? Math.min(100, 100 * state.step / state.total) : 0;
  $("train-bar").style.width = `${pct}%`;
  $("train-bar").dataset.pct = pct.toFixed(0);
  $("train-job").textContent = `${state.name} · ${state.id}`;
  const steps = state.total ? `step ${state.step} / ${state.total} (${pct.toFixed(0)}%)` : `step ${state.step}`;
  const left = state.eta_s != null ? ` · ${fmtTime(state.eta_s)} left` : "";
  $("train-status").textContent = `${state.status}: ${steps}${left} · ${fmtTime(state.elapsed_s)} elapsed — ${state.message}`;
  $("train-status").dataset.status = state.status;
  $("train-stop").disabled = state.status !== "running";
  $("train-resume").hidden = !state.resumable;
  drawLoss(state.losses);
  const samples = $("samples");
  if (samples.childElementCount !== state.samples.length) {
    samples.replaceChildren(...state.samples.slice(-8).map((p) => el("figure", {},
      el("img", { src: `/api/image?path=${encodeURIComponent(p)}`, alt: p }),
      el("figcaption", {}, p.split("/").pop().replace(".png", "")))));
  }
  busy(state.status === "running" || state.status === "stopping" ? `training ${state.name}` : null);
}

function busy(text) {
  $("device").textContent = text ? `device: ${text}` : "device idle";
  $("device").classList.toggle("busy", !!text);
}

function poll() {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(async () => {
    if (!job) return;
    try {
      const state = await api("GET", `/api/jobs/${job.id}`);
      show(state);
      if (state.status === "running" || state.status === "stopping") poll();
      else if (state.status === "done") { say(`training finished: ${state.adapter}`, true); if (window.refreshLibrary) window.refreshLibrary(); }
      else if (state.status === "failed") say(state.message);
    } catch (e) { say(e.message); poll(); }
  }, 1000);
}

function drawLoss(losses) {
  const c = $("loss-plot"), g = c.getContext("2d"), W = c.width, H = c.height, L = 48, B = 24;
  g.clearRect(0, 0, W, H);
  g.font = "12px system-ui, sans-serif";
  g.fillStyle = "#6b7280";
  if (!losses.length) { g.fillText("the loss appears here as the run logs it", L, H / 2); return; }
  const xs = losses.map((r) => r.step), vals = losses.flatMap((r) => [r.loss, r.val_loss].filter((v) => v != null));
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...vals), y1 = Math.max(...vals, y0 + 1e-6);
  const X = (s) => L + (W - L - 10) * (s - x0) / (x1 - x0), Y = (v) => 10 + (H - B - 10) * (1 - (v - y0) / (y1 - y0));
  g.strokeStyle = "#d9dce3"; g.beginPath(); g.moveTo(L, 10); g.lineTo(L, H - B); g.lineTo(W - 10, H - B); g.stroke();
  g.fillText(y1.toFixed(3), 4, 16); g.fillText(y0.toFixed(3), 4, H - B); g.fillText(`step ${x0}`, L, H - 6);
  g.fillText(`step ${x1}`, W - 70, H - 6);
  const line = (key, color, width) => {
    g.strokeStyle = color; g.lineWidth = width; g.beginPath();
    losses.filter((r) => r[key] != null).forEach((r, i) => (i ? g.lineTo : g.moveTo).call(g, X(r.step), Y(r[key])));
    g.stroke(); g.lineWidth = 1;
  };
  line("loss", "#9db8ef", 1); line("loss_smooth", "#2f6fdf", 2);
  g.fillStyle = "#d9480f";
  for (const r of losses.filter((r) => r.val_loss != null)) { g.beginPath(); g.arc(X(r.step), Y(r.val_loss), 3.5, 0, 7); g.fill(); }
  $("val-legend").hidden = !losses.some((r) => r.val_loss != null);
}

async function start() {
  try {
    const info = await api("GET", "/api/info");
    window.sdloraInfo = info;
    resolveReady(info);
    $("root").textContent = `root: ${info.root} · generation base: ${info.base}`;
    await refreshFolders();
    const { jobs, active } = await api("GET", "/api/jobs");
    const current = jobs.find((j) => j.id === active);
    if (current) { show(current); if (current.status === "running" || current.status === "stopping") poll(); }
    else drawLoss([]);
    $("train-stop").disabled = !current || current.status !== "running";
  } catch (e) { say(e.message); }
  const tab = localStorage.getItem("sdlora.tab");
  if (tab && $(tab)) $(tab).click();
}
window.addEventListener("DOMContentLoaded", start);
