// sdlora ui: the library, the mix (strength sliders and per-block weights), generation, the x/y grid and Files.
"use strict";

let library = [];
let mix = JSON.parse(localStorage.getItem("sdlora.mix") || "[]");  // [{path, strength, te_strength, lbw}]
let generating = false, again = false, waitTimer = null;

const saveMix = () => { localStorage.setItem("sdlora.mix", JSON.stringify(mix)); renderGridTargets(); renderMerge(); };
const label = (path) => path.split("/").pop().replace(/\.safetensors$/, "");

window.refreshLibrary = () => act(null, async () => {
  library = (await api("GET", "/api/library")).loras;
  $("library").replaceChildren(...(library.length ? library.map(libraryItem)
    : [el("p", { class: "muted" }, "No LoRA files under the root yet: train one, or copy .safetensors files there.")]));
  const pick = $("file-pick"), keep = pick.value;
  pick.replaceChildren(...library.map((l) => el("option", { value: l.path }, l.path)));
  if (keep && library.some((l) => l.path === keep)) pick.value = keep;
});
$("library-refresh").onclick = () => window.refreshLibrary();

function libraryItem(l) {
  const facts = [l.trigger_words.length ? `trigger: ${l.trigger_words.join(", ")}` : "no trigger words",
    `${l.architecture} · rank ${l.rank ?? "?"} · ${l.modules} modules`, l.base ? `base: ${l.base}` : ""].filter(Boolean);
  return el("div", { class: "lib", "data-path": l.path },
    l.thumbnail ? el("img", { src: l.thumbnail, alt: "" }) : el("div", { class: "noimg" }),
    el("div", {}, el("div", { class: "name" }, l.title || l.name), ...facts.map((f) => el("div", { class: "meta" }, f)),
      el("div", { class: "meta" }, `in ${l.path.includes("/") ? l.path.slice(0, l.path.lastIndexOf("/") + 1) : "the root"}`),
      el("button", { class: "add", onclick: () => addToMix(l) }, mix.some((m) => m.path === l.path) ? "in the mix" : "Add")));
}

function addToMix(l) {
  if (mix.some((m) => m.path === l.path)) return say(`${l.path} is already in the mix`);
  mix.push({ path: l.path, strength: 1, te_strength: null, lbw: null });
  saveMix(); renderMix(); window.refreshLibrary();
  if (l.trigger_words.length && !$("prompt").value.includes(l.trigger_words[0]))
    $("prompt").value = `${l.trigger_words[0]}, ${$("prompt").value}`;
}

function slider(text, value, onchange, min = -1, max = 2) {
  const out = el("output", {}, Number(value).toFixed(2));
  const input = el("input", { type: "range", min, max, step: 0.05, value, "aria-label": text });
  input.addEventListener("input", () => { out.textContent = Number(input.value).toFixed(2); });
  input.addEventListener("change", () => onchange(Number(input.value)));
  const box = el("div", { class: "slider" }, el("span", {}, text), input, out);
  box.set = (v) => { input.value = v; out.textContent = Number(v).toFixed(2); };  // follow another slider
  return box;
}

function renderMix() {
  const box = $("mix");
  if (!mix.length) { box.replaceChildren(el("p", { class: "muted" }, "Add LoRAs from the library.")); return; }
  box.replaceChildren(...mix.map((m, i) => {
    const presets = Object.keys((window.sdloraInfo || {}).presets || {});
    const choice = el("select", { "aria-label": "block weights" }, el("option", { value: "" }, "all blocks 1"),
      ...presets.map((p) => el("option", { value: p }, p)), el("option", { value: "custom" }, "custom vector…"));
    const custom = el("input", { placeholder: "17 values: BASE,IN01,IN02,IN04,IN05,IN07,IN08,MID,OUT03…OUT11" });
    const grid = el("div", { class: "blocks" });
    const known = presets.includes(m.lbw);
    choice.value = !m.lbw ? "" : known ? m.lbw : "custom";
    custom.value = m.lbw && !known ? m.lbw : "";
    custom.hidden = choice.value !== "custom";
    const drawBlocks = () => {
      const text = m.lbw ? ((window.sdloraInfo.presets || {})[m.lbw] || m.lbw) : "";
      const vals = text ? text.split(",").map(Number) : [];
      const ids = (window.sdloraInfo.layouts || {})[String(vals.length || 17)] || [];
      grid.replaceChildren(...ids.map((id, k) => {
        const inp = el("input", { value: vals.length ? vals[k] : 1, "aria-label": id });
        inp.addEventListener("change", () => {
          const now = [...grid.querySelectorAll("input")].map((x) => Number(x.value) || 0);
          m.lbw = now.join(","); choice.value = "custom"; custom.value = m.lbw; custom.hidden = false; saveMix(); changed();
        });
        return el("label", {}, id === "M00" ? "MID" : id, inp);
      }));
    };
    choice.addEventListener("change", () => {
      custom.hidden = choice.value !== "custom";
      if (choice.value !== "custom") { m.lbw = choice.value || null; saveMix(); drawBlocks(); changed(); }
    });
    custom.addEventListener("change", () => { m.lbw = custom.value.trim() || null; saveMix(); drawBlocks(); changed(); });
    const details = el("details", {}, el("summary", {}, "per-block weights"), choice, custom, grid);
    drawBlocks();
    // TE follows UNet until it is moved itself (te_strength null = the UNet strength, as on the command line)
    const te = slider("TE", m.te_strength == null ? m.strength : m.te_strength, (v) => { m.te_strength = v; saveMix(); changed(); });
    const unet = slider("UNet", m.strength, (v) => { m.strength = v; if (m.te_strength == null) te.set(v); saveMix(); changed(); });
    return el("div", { class: "entry", "data-path": m.path },
      el("div", { class: "head" }, el("span", {}, label(m.path)),
        el("button", { onclick: () => { mix.splice(i, 1); saveMix(); renderMix(); window.refreshLibrary(); changed(); } }, "remove")),
      unet, te, details);
  }));
}

function request() {
  return {
    mix, prompt: $("prompt").value, negative: $("negative").value, seed: num("seed") ?? 0, steps: num("steps") ?? 20,
    width: num("width"), height: num("height"),
  };
}
const changed = () => { if ($("auto").checked) generate(); };

// Generate; while one runs, a newer request waits and goes next; while training holds the device, it waits too.
async function generate(path = "/api/generate", body = request()) {
  if (generating) { again = true; return; }
  generating = true; clearTimeout(waitTimer);
  $("generate").disabled = true;
  $("result-info").textContent = path === "/api/grid" ? "rendering the grid…" : "generating…";
  try {
    const r = await api("POST", path, body);
    if (r.waiting) {
      $("result-info").textContent = r.message;
      waitTimer = setTimeout(() => generate(path, body), 2000);
      return;
    }
    $("result").src = r.image; $("result").hidden = false;
    $("result").classList.toggle("gridimg", path === "/api/grid");
    const applied = r.applied.map((a) => `${label(a.path)}: UNet ${a.strength.toFixed(2)}, TE ${(a.te_strength ?? a.strength).toFixed(2)}`
      + (a.lbw ? `, lbw ${a.lbw}` : "")).join(" · ") || "no LoRA (the base alone)";
    const how = r.loaded ? (r.loaded.length ? `loaded ${r.loaded.map(label).join(", ")}` : "strengths changed in place, nothing reloaded") : `${r.cells} cells`;
    $("result-info").textContent = `${applied} — ${how}` + (r.generate_ms ? ` · ${(r.generate_ms / 1000).toFixed(1)} s` : "");
    $("result-info").dataset.applied = JSON.stringify(r.applied);
    if (r.warnings && r.warnings.length) say(r.warnings.join("; "));
  } catch (e) { say(e.message); $("result-info").textContent = ""; } finally {
    generating = false; $("generate").disabled = false;
    if (again) { again = false; generate(); }
  }
}
$("generate").onclick = () => generate();

function renderGridTargets() {
  for (const id of ["grid-x-index", "grid-y-index"]) {
    const keep = $(id).value;
    $(id).replaceChildren(...mix.map((m, i) => el("option", { value: i }, label(m.path))));
    if (keep && Number(keep) < mix.length) $(id).value = keep;
  }
}
const axis = (p) => {
  const kind = $(`grid-${p}-kind`).value;
  if (!kind) return null;
  const sep = kind === "lbw" ? ";" : ",";
  return { kind, index: Number($(`grid-${p}-index`).value || 0), values: $(`grid-${p}-values`).value.split(sep).map((v) => v.trim()).filter(Boolean) };
};
$("grid-go").onclick = () => {
  if (!mix.length) return say("add a LoRA to the mix first: the grid varies its strengths or blocks");
  generate("/api/grid", { ...request(), x: axis("x"), y: axis("y") });
};

// ── Files
function renderMerge() {
  $("merge-list").replaceChildren(...(mix.length ? mix.map((m) => el("div", { class: "meta" },
    `${m.path}: ${m.strength}` + (m.te_strength != null ? ` / TE ${m.te_strength}` : "") + (m.lbw ? ` · lbw ${m.lbw}` : "")))
    : [el("p", { class: "muted" }, "The mix is empty.")]));
}
const picked = () => { const p = $("file-pick").value; if (!p) throw new Error("pick a LoRA file first"); return p; };
$("file-inspect").onclick = () => act($("file-inspect"), async () => {
  const r = await api("GET", `/api/inspect?path=${encodeURIComponent(picked())}`);
  $("file-report").textContent = r.text;
  $("meta-trigger").value = r.report.trigger_words.join(", ");
  $("meta-title").value = r.report.title || "";
  $("meta-description").value = r.report.description || "";
});
$("meta-save").onclick = () => act($("meta-save"), async () => {
  const set = { trigger_phrase: $("meta-trigger").value, title: $("meta-title").value, description: $("meta-description").value };
  const r = await api("POST", "/api/meta", { path: picked(), set });
  say(r.changed.length ? `updated ${r.changed.join(", ")} (AutoV2 ${r.sha256.slice(0, 10)})` : "metadata unchanged", true);
  window.refreshLibrary();
});
$("resize-go").onclick = () => act($("resize-go"), async () => {
  const r = await api("POST", "/api/resize", { path: picked(), rank: num("resize-rank"), energy: num("resize-energy") });
  say(`wrote ${r.output}: ${r.report}`, true); window.refreshLibrary();
});
$("convert-go").onclick = () => act($("convert-go"), async () => {
  const r = await api("POST", "/api/convert", { path: picked(), to: $("convert-to").value });
  say(`wrote ${r.output}`, true); window.refreshLibrary();
});
$("merge-go").onclick = () => act($("merge-go"), async () => {
  if (!mix.length) throw new Error("put the LoRAs to merge in the mix first");
  const r = await api("POST", "/api/merge", { loras: mix, output: $("merge-output").value.trim(), rank: num("merge-rank"),
    overwrite: $("merge-overwrite").checked });
  say(`merged into ${r.output} (${r.modules} modules)` + (r.report ? `: ${r.report}` : ""), true); window.refreshLibrary();
});

window.addEventListener("DOMContentLoaded", async () => {
  await window.sdloraReady;
  try {
    const { last } = await api("GET", "/api/studio");
    if (last) {
      $("result").src = last.image; $("result").hidden = false;
      $("prompt").value = last.settings.prompt;
      $("result-info").textContent = "the last image of this server";
      if (!mix.length) mix = last.applied.map((a) => ({ path: a.path, strength: a.strength, te_strength: a.te_strength, lbw: a.lbw }));
    }
  } catch (e) { say(e.message); }
  renderMix(); saveMix();
  window.refreshLibrary();
});
