// blobmesh dashboard: one event stream from the node, drawn at most once per animation frame.
"use strict";

const ROW = 24;            // px per target row (virtualised list)
const PAGE = 50;           // members per page of the fleet table
const LOST_AFTER = 5000;   // ms without a message before the page says the node is gone

const $ = (id) => document.getElementById(id);
const state = {
  view: null, fleet: [], fleetPage: 0, selected: null, targets: new Map(), order: [], history: [], summary: null,
  events: [], lastMessage: 0, source: null, dirty: false, lost: false, scrollTop: 0,
};
// read by the browser tests and the benchmark
// latencies: a target's update reached the node -> painted here; stages split each into
// [waited for the next view, view -> received here, received -> painted] (seconds)
window.__dash = { views: 0, dists: 0, latencies: [], stages: [], draws: 0 };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${Math.round(n)} B` : `${n.toFixed(1)} ${units[i]}`;
}
const rate = (n) => (n === null || n === undefined) ? "—" : (n > 0 ? `${bytes(n)}/s` : "");
function duration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "—";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(sec).padStart(2, "0")}s` : `${sec}s`;
}
const short = (id) => id.length > 16 ? id.slice(0, 14) + "…" : id;
const badge = (text) => el("span", { class: `badge ${text}` }, text);
function bar(frac) {
  const b = el("span", { class: "bar" + (frac >= 1 ? " done" : "") }, el("i"));
  b.firstChild.style.width = `${Math.min(100, 100 * frac).toFixed(1)}%`;
  return b;
}

// --- the event stream ---------------------------------------------------------------------

function connect() {
  if (state.source) state.source.close();
  const url = "/dash/v1/events" + (state.selected ? `?dist=${encodeURIComponent(state.selected)}` : "");
  const es = new EventSource(url);
  state.source = es;
  // each new stream starts with the node's whole recent log
  es.addEventListener("open", () => { state.events = []; setLost(false); });
  es.addEventListener("view", (m) => {
    state.view = JSON.parse(m.data);
    window.__dash.views++;
    touch();
  });
  es.addEventListener("fleet", (m) => {
    state.fleet = JSON.parse(m.data).members;
    touch();
  });
  es.addEventListener("log", (m) => {
    for (const e of JSON.parse(m.data).events) state.events.push(e);
    if (state.events.length > 200) state.events.splice(0, state.events.length - 200);
    touch();
  });
  es.addEventListener("dist", (m) => {
    const d = JSON.parse(m.data);
    if (d.handle !== state.selected) return;
    // the first message of a stream holds every row: only later ones are news
    const received = Date.now() / 1000;
    const news = es.gotRows === true;
    es.gotRows = true;
    const fresh = [];
    for (const t of d.targets) {
      if (!state.targets.has(t.node)) state.order.push(t.node);
      state.targets.set(t.node, t);
      if (news && t.updated) fresh.push([t.updated, d.t, received]);
    }
    if (d.targets.length) { state.order.sort(); state.rowsDirty = true; }
    state.summary = d.summary;
    state.history = d.history;
    window.__dash.dists++;
    touch(fresh);
  });
  es.addEventListener("error", () => {
    setLost(true);
    if (es.readyState === EventSource.CLOSED) setTimeout(() => { if (state.source === es) connect(); }, 1000);
  });
}

let pendingFresh = [];
function touch(fresh) {
  state.lastMessage = Date.now();
  if (state.lost) setLost(false);
  redraw(fresh);
}

function redraw(fresh) {
  if (fresh) pendingFresh.push(...fresh);
  if (state.dirty) return;
  state.dirty = true;
  requestAnimationFrame(() => {
    state.dirty = false;
    draw();
    const drawn = pendingFresh;
    pendingFresh = [];
    // the frame after this one is when the update was painted
    requestAnimationFrame(() => {
      const now = Date.now() / 1000;
      for (const [u, t, r] of drawn) {
        window.__dash.latencies.push(now - u);
        window.__dash.stages.push([t - u, r - t, now - r]);
      }
      if (window.__dash.latencies.length > 5000) {
        window.__dash.latencies.splice(0, 1000);
        window.__dash.stages.splice(0, 1000);
      }
    });
  });
}

function setLost(lost) {
  state.lost = lost;
  $("banner").hidden = !lost;
  const c = $("conn");
  c.textContent = lost ? "disconnected" : "live";
  c.className = "conn " + (lost ? "lost" : "live");
}

setInterval(() => {
  if (state.lastMessage && Date.now() - state.lastMessage > LOST_AFTER && !state.lost) setLost(true);
  if (state.view) drawNode();
}, 1000);

// --- drawing ------------------------------------------------------------------------------

// a section is rebuilt only when what it shows changed
const shown = {};
function changed(section, value) {
  const sig = JSON.stringify(value);
  if (shown[section] === sig) return false;
  shown[section] = sig;
  return true;
}

function draw() {
  if (!state.view) return;
  const started = performance.now();
  const v = state.view;
  drawNode();
  if (changed("fleet", [state.fleet, state.fleetPage])) drawFleet();
  if (changed("dists", [v.distributions, state.selected])) drawDists();
  if (changed("pins", v.node.blobs)) drawPins();
  drawEvents();
  if (state.selected) drawDetail();
  window.__dash.draws++;
  window.__dash.drawMs = (window.__dash.drawMs || 0) + performance.now() - started;
}

function drawNode() {
  const n = state.view.node;
  $("node-id").textContent = short(n.node);
  $("node-id").title = n.node;
  $("node-version").textContent = n.version;
  $("node-space").textContent = n.space;
  $("node-uptime").textContent = duration(Date.now() / 1000 - n.started_at);
  if ($("ticket").value !== n.ticket) $("ticket").value = n.ticket;
}

function drawFleet() {
  const now = state.view.t;
  const body = $("fleet").tBodies[0];
  const pages = Math.max(1, Math.ceil(state.fleet.length / PAGE));
  state.fleetPage = Math.min(state.fleetPage, pages - 1);
  const first = state.fleetPage * PAGE;
  const rows = state.fleet.slice(first, first + PAGE).map((m) => {
    const caps = Object.entries(m.capabilities).map(([k, v]) => `${k}=${v}`).join(", ");
    const heard = m.self ? "this node" : m.last_seen ? `${duration(now - m.last_seen)} ago` : "never";
    return el("tr", { "data-node": m.node, "data-liveness": m.liveness },
      el("td", { title: m.node }, el("code", {}, short(m.node))),
      el("td", { class: "liveness" }, badge(m.liveness)),
      el("td", {}, heard),
      el("td", {}, m.addresses.join(" ")),
      el("td", {}, m.groups.join(", ")),
      el("td", {}, caps),
      el("td", { class: "num" }, m.store_bytes === null ? "—" : `${bytes(m.store_bytes)} (${m.store_blobs})`),
      el("td", { class: "num" }, rate(m.up)),
      el("td", { class: "num" }, rate(m.down)));
  });
  body.replaceChildren(...rows);
  $("fleet-count").textContent = `${state.fleet.length} members`;
  $("fleet-pager").hidden = pages === 1;
  $("fleet-range").textContent = `${first + 1}–${Math.min(first + PAGE, state.fleet.length)} of ${state.fleet.length}`;
  $("fleet-prev").disabled = state.fleetPage === 0;
  $("fleet-next").disabled = state.fleetPage >= pages - 1;
}

// rows stay in place while their values change, so a click never lands on a replaced row
const distRows = new Map();  // handle -> {tr, cells, cancel}

function distRow(handle) {
  const cells = {};
  const td = (name, attrs) => (cells[name] = el("td", attrs || {}));
  const cancel = el("button", { type: "button", class: "cancel" }, "cancel");
  cancel.addEventListener("click", (ev) => { ev.stopPropagation(); cancelDist(handle); });
  const tr = el("tr", { "data-handle": handle },
    el("td", {}, el("code", {}, handle)), td("blob"), td("scope"), td("priority"), td("state"),
    td("done", { class: "num done" }), td("progress"), td("bytes", { class: "num" }),
    td("rate", { class: "num" }), td("eta", { class: "num" }), el("td", {}, cancel));
  tr.addEventListener("click", () => select(handle));
  return { tr, cells, cancel };
}

function drawDists() {
  const body = $("dists").tBodies[0];
  const list = state.view.distributions.slice(0, 200);
  $("dists-empty").hidden = list.length > 0;
  const keep = new Set();
  let prev = null;
  for (const d of list) {
    let r = distRows.get(d.handle);
    if (!r) distRows.set(d.handle, r = distRow(d.handle));
    const frac = d.bytes_total ? d.bytes_done / d.bytes_total : (d.state === "completed" ? 1 : 0);
    const c = r.cells;
    r.tr.dataset.state = d.state;
    r.tr.className = d.handle === state.selected ? "selected" : "";
    c.blob.title = d.blob;
    c.blob.replaceChildren(el("code", {}, short(d.blob)), ` ${bytes(d.size)}`);
    c.scope.textContent = d.scope;
    c.scope.title = d.scope;
    c.priority.textContent = d.priority;
    c.state.replaceChildren(badge(d.state));
    c.done.textContent = `${d.completed}/${d.targets}` + (d.failed ? ` (${d.failed} failed)` : "");
    c.progress.replaceChildren(bar(frac), el("span", { class: "pct" }, ` ${(100 * frac).toFixed(1)} %`));
    c.bytes.textContent = `${bytes(d.bytes_done)} / ${bytes(d.bytes_total)}`;
    c.rate.textContent = rate(d.rate);
    c.eta.textContent = d.state === "active" ? duration(d.eta) : "";
    r.cancel.disabled = d.state !== "active";
    const at = prev ? prev.nextSibling : body.firstChild;
    if (at !== r.tr) body.insertBefore(r.tr, at);
    prev = r.tr;
    keep.add(d.handle);
  }
  for (const [h, r] of distRows) if (!keep.has(h)) { r.tr.remove(); distRows.delete(h); }
  const blobs = $("blob-list");
  const opts = state.view.node.blobs.map((b) => el("option", { value: b.blob }, `${bytes(b.size)} ${b.pins.join(", ")}`));
  if (blobs.childElementCount !== opts.length) blobs.replaceChildren(...opts);
}

function drawPins() {
  const rows = [];
  for (const b of state.view.node.blobs) {
    for (const name of b.pins) {
      const un = el("button", { type: "button", class: "unpin" }, "unpin");
      un.addEventListener("click", () => act("DELETE", `/v1/pins/${encodeURIComponent(name)}`));
      rows.push(el("tr", { "data-pin": name }, el("td", {}, name), el("td", { title: b.blob }, el("code", {}, short(b.blob))), el("td", {}, un)));
    }
  }
  $("pins").tBodies[0].replaceChildren(...rows);
}

function drawEvents() {
  const list = $("events");
  const shown = state.events.slice(-100).reverse();
  if (list.dataset.last === String(shown.length ? shown[0].seq : 0)) return;
  list.dataset.last = String(shown.length ? shown[0].seq : 0);
  list.replaceChildren(...shown.map((e) => el("li", { class: e.level },
    `${new Date(e.t * 1000).toLocaleTimeString()} ${e.text}`)));
}

function select(handle) {
  if (state.selected === handle) return;
  state.selected = handle;
  state.targets = new Map(); state.order = []; state.history = []; state.summary = null;
  $("detail").hidden = !handle;
  $("detail-handle").textContent = handle || "";
  $("targets").replaceChildren($("targets-spacer"));
  rowEls = new Map();
  $("targets").scrollTop = 0;
  state.scrollTop = 0;
  connect();
  if (state.view) draw();
}

function drawDetail() {
  const s = state.summary;
  if (s) {
    $("detail-summary").textContent = `${short(s.blob)} ${bytes(s.size)} to ${s.scope} [${s.priority}] · ${s.state} · ` +
      `${s.completed}/${s.targets} completed` + (s.failed ? `, ${s.failed} failed` : "") +
      ` · ${rate(s.rate) || "idle"}` + (s.state === "active" ? ` · ETA ${duration(s.eta)}` : "");
  }
  if (state.rowsDirty) { state.rowsDirty = false; drawTargets(); }
  const h = state.history;
  if (changed("chart", [state.selected, h.length, h.length ? h[h.length - 1] : null])) drawChart();
}

let rowEls = new Map();  // node -> [what it shows, its row element] in the target box

function targetRow() {
  const parts = {
    id: el("code"), badge: el("span", { class: "badge" }), fill: el("i"), pct: el("span"),
    rate: el("span"), peers: el("span", { class: "num" }), reason: el("span"),
  };
  const r = el("div", { class: "trow" }, el("span", {}, parts.id), el("span", { class: "tstate" }, parts.badge),
    el("span", {}, el("span", { class: "bar" }, parts.fill), parts.pct), parts.rate, parts.peers, parts.reason);
  r.parts = parts;
  return r;
}

// fills a row in place (cheaper than building one: a draw touches only what changed)
function fillRow(r, t, i, total) {
  const p = r.parts;
  const frac = t.state === "completed" ? 1 : total ? t.bytes_done / total : 0;
  r.dataset.node = t.node;
  r.dataset.state = t.state;
  r.style.top = `${i * ROW}px`;
  p.id.textContent = short(t.node);
  p.id.parentNode.title = t.node;
  p.badge.textContent = t.state;
  p.badge.className = `badge ${t.state}`;
  p.fill.style.width = `${Math.min(100, 100 * frac).toFixed(1)}%`;
  p.fill.parentNode.className = "bar" + (frac >= 1 ? " done" : "");
  p.pct.textContent = ` ${(100 * frac).toFixed(1)} %`;
  p.rate.textContent = rate(t.rate);
  p.peers.textContent = t.state === "transferring" && t.peers ? String(t.peers) : "";
  p.reason.textContent = t.reason;
  p.reason.title = t.reason;
}

function drawTargets() {
  // no layout reads here (they would force a layout of the whole page every draw): the
  // box's height is ours and its scroll position comes from its scroll events
  const box = $("targets");
  const total = state.summary ? state.summary.size : 0;
  const height = Math.min(360, state.order.length * ROW + 2);
  $("targets-spacer").style.height = `${state.order.length * ROW}px`;
  box.style.height = `${height}px`;
  const first = Math.max(0, Math.floor(state.scrollTop / ROW) - 5);
  const last = Math.min(state.order.length, first + Math.ceil(height / ROW) + 10);
  // rows are absolutely placed and reused: a draw refills only the ones that changed
  const keep = new Map();
  const visible = new Set(state.order.slice(first, last));
  const spare = [];
  for (const [node, entry] of rowEls) if (!visible.has(node)) spare.push(entry[1]);
  for (let i = first; i < last; i++) {
    const t = state.targets.get(state.order[i]);
    const sig = [i, total, t.state, t.bytes_done, t.rate, t.peers, t.reason].join("|");
    const old = rowEls.get(t.node);
    const r = old ? old[1] : spare.pop() || box.appendChild(targetRow());
    if (!old || old[0] !== sig) fillRow(r, t, i, total);
    keep.set(t.node, [sig, r]);
  }
  for (const r of spare) r.remove();
  rowEls = keep;
  $("targets-count").textContent = `${state.order.length} targets` +
    (state.order.length > last - first ? ` (showing ${first + 1}–${last}; scroll for more)` : "");
}

function drawChart() {
  const c = $("chart"), g = c.getContext("2d");
  const w = c.width, h = c.height, pad = 30;
  g.clearRect(0, 0, w, h);
  g.font = "11px sans-serif"; g.fillStyle = "#6b7385"; g.strokeStyle = "#dde1e8";
  const pts = state.history;
  if (pts.length < 2) { g.fillText("throughput over time: waiting for data", pad, h / 2); return; }
  const t0 = pts[0][0], t1 = pts[pts.length - 1][0];
  const max = Math.max(1, ...pts.map((p) => p[1]));
  g.beginPath(); g.moveTo(pad, 5); g.lineTo(pad, h - pad); g.lineTo(w - 5, h - pad); g.stroke();
  g.fillText(rate(max), 2, 12);
  g.fillText(`${duration(t1 - t0)}`, w - 40, h - 10);
  g.strokeStyle = "#2f6fde"; g.lineWidth = 2; g.beginPath();
  pts.forEach(([t, v], i) => {
    const x = pad + (w - pad - 5) * (t - t0) / Math.max(1e-9, t1 - t0);
    const y = h - pad - (h - pad - 5) * v / max;
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke(); g.lineWidth = 1;
}

// --- actions ------------------------------------------------------------------------------

function showError(text) {
  $("error-text").textContent = text;
  $("error").hidden = !text;
}

async function act(method, path, body) {
  showError("");
  try {
    const resp = await fetch(path, {
      method, credentials: "same-origin",
      headers: body ? { "Content-Type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) { showError(`${method} ${path}: ${data.error || resp.status}`); return null; }
    return data;
  } catch (e) {
    showError(`${method} ${path}: ${e}`);
    return null;
  }
}

function cancelDist(handle) { act("DELETE", `/v1/distributions/${encodeURIComponent(handle)}`); }

$("start-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const blob = $("start-blob").value.trim();
  if (!blob.startsWith("bm1")) { showError("a blob id starts with bm1"); return; }
  const d = await act("POST", "/v1/distributions", {
    blob, scope: $("start-scope").value.trim(), priority: $("start-priority").value });
  if (d) select(d.handle);
});
$("pin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const ok = await act("POST", "/v1/pins", { blob: $("pin-blob").value.trim(), name: $("pin-name").value.trim() });
  if (ok) $("pin-name").value = "";
});
$("detail-close").addEventListener("click", () => select(null));
$("fleet-prev").addEventListener("click", () => { state.fleetPage--; redraw(); });
$("fleet-next").addEventListener("click", () => { state.fleetPage++; redraw(); });
$("error-close").addEventListener("click", () => showError(""));
$("targets").addEventListener("scroll", (ev) => {
  state.scrollTop = ev.target.scrollTop;
  if (state.selected) drawTargets();
}, { passive: true });
$("copy-ticket").addEventListener("click", async () => {
  const t = $("ticket");
  try { await navigator.clipboard.writeText(t.value); }
  catch (e) { t.select(); document.execCommand("copy"); }
  $("copy-ticket").textContent = "copied";
  setTimeout(() => { $("copy-ticket").textContent = "copy ticket"; }, 1500);
});

connect();
