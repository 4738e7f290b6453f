// Shared by every studio page: the menu, the API, jobs (command, state, log) and the choices kept
// between pages (data files, run, base model) in localStorage.
const PAGES = [["data", "Data"], ["train", "Train"], ["eval", "Evaluate"], ["chat", "Chat"], ["export", "Export"]];
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

const keep = {
  get: (k, d) => { try { return JSON.parse(localStorage.getItem("studio-" + k)) ?? d; } catch (e) { return d; } },
  set: (k, v) => localStorage.setItem("studio-" + k, JSON.stringify(v)),
};

async function api(path, options = {}) {
  const init = { ...options };
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.headers = { "Content-Type": "application/json" };
    init.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, init);
  const body = await response.json().catch(() => ({ error: response.status + " " + response.statusText }));
  if (!response.ok) { const e = new Error(body.error || response.statusText); e.body = body; throw e; }
  return body;
}

function nav(here) {
  const bar = el("nav", {}, el("span", { class: "brand" }, "qatune studio"),
    PAGES.map(([p, t]) => el("a", { href: "/" + p, class: p === here ? "here" : "", id: "nav-" + p }, t)),
    el("span", { class: "workspace", id: "workspace" }));
  document.body.prepend(bar);
  schema().then(s => { $("workspace").textContent = "workspace: " + s.workspace; }).catch(() => {});
}

let schemaAsked;
function schema() { return (schemaAsked ||= api("/api/schema")); }  // asked once per page

// Offers the embedded models in a model box (a list to pick from); a model folder of the workspace can still be typed.
async function offerModels(input) {
  input.setAttribute("list", "embedded-models");
  const { models } = await schema();
  if (!$("embedded-models")) {
    document.body.append(el("datalist", { id: "embedded-models" },
      models.map(m => el("option", { value: m.name }, `${m.name}: ${m.description}`))));
  }
}

function commandBox(text) {
  const code = el("code", {}, text);
  return el("div", { class: "command" }, code,
    el("button", { type: "button", onclick: () => navigator.clipboard?.writeText(code.textContent) }, "Copy"));
}

// Shows a job (its command, state and log) in `box` until it ends; resolves with the ended job.
async function followJob(job, box) {
  const state = el("span", { class: "state " + job.state }, job.state);
  const log = el("pre", { class: "log" });
  box.replaceChildren(commandBox(job.command), el("div", {}, "job ", job.id, " ", state), log);
  box.dataset.job = job.id;
  let offset = 0;
  for (;;) {
    const now = await api(`/api/jobs/${job.id}?offset=${offset}`);
    offset = now.offset;
    if (now.log) { log.textContent += now.log; log.scrollTop = log.scrollHeight; }
    state.textContent = now.state; state.className = "state " + now.state;
    box.dataset.state = now.state;
    if (now.state !== "running") return now;
    await new Promise(r => setTimeout(r, 700));
  }
}

function showError(box, error) {
  box.replaceChildren(el("div", { class: "error" }, String(error.message || error)));
  box.dataset.state = "error";
}

async function dataFiles() { return (await api("/api/files")).files; }
async function runs() { return (await api("/api/runs")).runs; }

function fillSelect(select, values, chosen) {
  select.replaceChildren(...values.map(v => new Option(v, v, false, v === chosen)));
}

// The base model and run pickers shared by the Evaluate, Chat and Export pages.
async function modelPickers(root) {
  const base = el("input", { type: "text", id: "base", value: keep.get("model", "default"), size: 28 });
  const run = el("select", { id: "run" });
  base.addEventListener("change", () => keep.set("model", base.value));
  offerModels(base);
  run.addEventListener("change", () => keep.set("run", run.value));
  root.append(el("label", {}, "Base model ", base), el("label", {}, "Run ", run),
    el("button", { type: "button", onclick: refresh }, "Refresh"));
  async function refresh() {
    const done = (await runs()).filter(r => r.state === "complete").map(r => r.run);
    fillSelect(run, done, keep.get("run", done[0]));
  }
  await refresh();
  return { base, run };
}
