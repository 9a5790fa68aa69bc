// The review page: one item at a time, saved on the server before the next is shown.
// Every text from the server is written with textContent: an answer is text, never markup.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const annotator = (params.get("annotator") || "").trim();
// a server started with --api-key: the key comes once in the address (&key=), is kept for this tab
// and taken out of the address bar (and so out of the history and of shared screenshots)
if (params.has("key")) {
  sessionStorage.setItem("prefalign-review-key", params.get("key"));
  params.delete("key");
  history.replaceState(null, "", `${location.pathname}?${params.toString()}`);
}
const key = sessionStorage.getItem("prefalign-review-key");
const LABELS = {a: "A is better", b: "B is better", tie: "tie", both_bad: "both are bad"};
const KEYS = {a: "a", b: "b", t: "tie", x: "both_bad"};
let current = null;
let busy = false;

async function api(path, body) {
  const headers = key ? {"Authorization": `Bearer ${key}`} : {};
  const init = body === undefined ? {headers} : {
    method: "POST", headers: {...headers, "Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail || response.status);
    throw new Error(detail);
  }
  return data;
}

function status(text) {
  $("status").textContent = text;
}

function show(state) {
  current = state.item;
  const p = state.progress;
  $("progress").textContent = `${p.done} of ${p.total} · items complete ${p.items_complete} of ${p.items}` +
    (p.per_item > 1 ? ` (${p.per_item} annotators each)` : "");
  $("work").hidden = !current;
  $("done").hidden = Boolean(current);
  document.body.dataset.item = current ? String(current.id) : "none";
  document.body.dataset.done = String(p.done);
  if (current) {
    $("prompt").textContent = current.prompt;
    $("answer-a").textContent = current.a;
    $("answer-b").textContent = current.b;
    $("comment").value = "";
    $("better").value = "";
  }
  if ($("summary").open) loadSummary();
}

async function busyWhile(work) {
  if (busy) return;
  busy = true;
  document.querySelectorAll("button").forEach((b) => { b.disabled = true; });
  try {
    await work();
  } catch (e) {
    status(`Not saved: ${e.message}`);
    // the server's state is the truth (another tab may have judged this item): show what it holds now
    api(`/api/next?annotator=${encodeURIComponent(annotator)}`).then(show).catch(() => {});
  } finally {
    busy = false;
    document.querySelectorAll("button").forEach((b) => { b.disabled = false; });
  }
}

function judge(verdict) {
  if (!current) return Promise.resolve();
  return busyWhile(async () => {
    const r = await api("/api/judge", {annotator, item: current.id, verdict,
                                       comment: $("comment").value, better: $("better").value});
    status(`Saved (${LABELS[verdict]}): A was “${r.saved.a_name}”, B was “${r.saved.b_name}”.`);
    show(r);
  });
}

function undo() {
  return busyWhile(async () => {
    const r = await api("/api/undo", {annotator});
    show(r);
    if (!r.undone) {
      status("Nothing to undo.");
      return;
    }
    $("comment").value = r.undone.comment;
    $("better").value = r.undone.better;
    status(`Undone: your judgement (${LABELS[r.undone.verdict]}) is removed; judge this item again.`);
  });
}

function cell(value) {
  if (value === null || value === undefined) return "–";
  if (Array.isArray(value) && value.length && value[0].annotators) {  // Cohen's kappa of each two annotators
    return value.map((p) => `${p.annotators.join(" & ")}: ${cell(p.kappa)} (${p.items} items)`).join("; ");
  }
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(3);
  if (Array.isArray(value) && value.every((v) => typeof v === "number")) return `[${value.map(cell).join(", ")}]`;
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

async function loadSummary() {
  const s = await api("/api/summary");
  const table = $("summary-table");
  table.replaceChildren();
  for (const [key, value] of Object.entries(s)) {
    const row = table.insertRow();
    row.insertCell().textContent = key;
    row.insertCell().textContent = cell(value);
  }
}

function start() {
  if (!annotator) {
    $("login").hidden = false;
    $("login").addEventListener("submit", (e) => {
      e.preventDefault();
      params.set("annotator", $("name").value.trim());
      location.search = params.toString();
    });
    return;
  }
  $("who").textContent = `annotator: ${annotator}`;
  document.querySelectorAll("[data-verdict]").forEach((b) => b.addEventListener("click", () => judge(b.dataset.verdict)));
  document.querySelectorAll(".undo").forEach((b) => b.addEventListener("click", undo));
  $("summary").addEventListener("toggle", () => { if ($("summary").open) loadSummary().catch((e) => status(e.message)); });
  document.addEventListener("keydown", (e) => {
    // typing a comment or an answer is not a judgement
    if (e.ctrlKey || e.metaKey || e.altKey || ["INPUT", "TEXTAREA"].includes(e.target.tagName)) return;
    const key = e.key.toLowerCase();
    if (key in KEYS) judge(KEYS[key]);
    else if (key === "u") undo();
    else return;
    e.preventDefault();
  });
  api(`/api/next?annotator=${encodeURIComponent(annotator)}`).then(show).catch((e) => status(e.message));
}

start();
