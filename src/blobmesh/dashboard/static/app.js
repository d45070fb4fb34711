// blobmesh dashboard: one event stream from the node, drawn at most once per animation frame.
"use strict";

const ROW = 24;            // px per target row (virtualised list)
const PAGE = 50;           // members per page of the fleet table
const LOST_AFTER = 5000;   // ms without a message before the page says the node is gone

const $ = (id) => document.getElementById(id);
const state = {
  t: 0, node: null, dists: new Map(), distOrder: [], fleet: [], fleetPage: 0, stream: null,
  selected: null, targets: new Map(), order: [], history: [], summary: null,
  events: [], lastMessage: 0, source: null, dirty: false, lost: false, scrollTop: 0,
};
// what changed since the last draw (a draw touches only that)
const dirty = { node: false, fleet: false, dists: new Set(), distOrder: false, events: false, chart: false };
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

// writes only what differs from what the element shows (no style or layout work otherwise)
function setText(e, text) {
  if (e._shown !== text) { e._shown = text; e.textContent = text; }
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
  // each new stream starts with everything: the node, every distribution, the whole log
  es.addEventListener("open", () => {
    state.events = []; dirty.events = "all";
    state.history = []; es.gotRows = false;
    dirty.distOrder = true;
    setLost(false);
  });
  es.addEventListener("hello", (m) => {
    state.stream = JSON.parse(m.data).stream;
    if (state.fleetPage) tellFleetPage();
  });
  es.addEventListener("view", (m) => {
    const v = JSON.parse(m.data);
    state.t = v.t;
    if (v.node) { state.node = v.node; dirty.node = true; }
    for (const d of v.distributions) { state.dists.set(d.handle, d); dirty.dists.add(d.handle); }
    if (v.order) {
      state.distOrder = v.order;
      const keep = new Set(v.order);
      for (const h of state.dists.keys()) if (!keep.has(h)) state.dists.delete(h);
      dirty.distOrder = true;
    }
    window.__dash.views++;
    touch();
  });
  es.addEventListener("fleet", (m) => {
    state.fleet = JSON.parse(m.data).members;
    dirty.fleet = true;
    touch();
  });
  es.addEventListener("log", (m) => {
    for (const e of JSON.parse(m.data).events) state.events.push(e);
    if (state.events.length > 200) state.events.splice(0, state.events.length - 200);
    dirty.events = dirty.events || true;
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
    let added = false;
    for (const t of d.targets) {
      if (!state.targets.has(t.node)) { state.order.push(t.node); added = true; }
      state.targets.set(t.node, t);
      if (news && t.updated) fresh.push([t.updated, d.t, received]);
    }
    if (added) state.order.sort();
    if (d.targets.length) state.rowsDirty = true;
    state.summary = d.summary;
    if (d.history.length) {
      state.history.push(...d.history);
      if (state.history.length > 240) state.history.splice(0, state.history.length - 240);
      dirty.chart = true;
    }
    window.__dash.dists++;
    touch(fresh);
  });
  es.addEventListener("error", () => {
    setLost(true);
    if (es.readyState === EventSource.CLOSED) setTimeout(() => { if (state.source === es) connect(); }, 1000);
  });
}

// the server asks the members a page shows for their stats: tell it which page this is
function tellFleetPage() {
  if (!state.stream) return;
  fetch(`/dash/v1/streams/${state.stream}`, {
    method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ fleet_page: state.fleetPage }),
  }).catch(() => {});  // a stream that just went away: the next one is told on hello
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
  // the uptime is redrawn with the next view; only a node that sends none needs a frame for it
  if (state.node && Date.now() - state.lastMessage > 1000) drawUptime();
}, 1000);

// --- drawing ------------------------------------------------------------------------------

function draw() {
  if (!state.node) return;
  const started = performance.now();
  if (dirty.node) { drawNode(); drawPins(); } else drawUptime();
  if (dirty.fleet) drawFleet();
  if (dirty.dists.size || dirty.distOrder || dirty.node) drawDists();
  if (dirty.events) drawEvents();
  if (state.selected) drawDetail();
  dirty.node = dirty.fleet = dirty.distOrder = dirty.events = false;
  dirty.dists.clear();
  window.__dash.draws++;
  window.__dash.drawMs = (window.__dash.drawMs || 0) + performance.now() - started;
}

function drawUptime() { setText($("node-uptime"), duration(Date.now() / 1000 - state.node.started_at)); }

function drawNode() {
  const n = state.node;
  setText($("node-id"), short(n.node));
  $("node-id").title = n.node;
  setText($("node-version"), n.version);
  setText($("node-space"), n.space);
  drawUptime();
  if ($("ticket").value !== n.ticket) $("ticket").value = n.ticket;
}

// fleet rows are kept per member and refilled in place
const fleetRows = new Map();  // node -> {tr, cells}

function fleetRow(node) {
  const cells = {};
  const td = (name, cls) => (cells[name] = el("td", cls ? { class: cls } : {}));
  cells.id = el("code", {}, short(node));
  cells.badge = el("span", { class: "badge" });
  const tr = el("tr", { "data-node": node },
    el("td", { title: node }, cells.id), el("td", { class: "liveness" }, cells.badge), td("heard"),
    td("addresses"), td("groups"), td("caps"), td("store", "num store"), td("up", "num"), td("down", "num"));
  return { tr, cells };
}

function storeText(m, now) {
  if (m.stats === "ok") return m.store_bytes === null ? "—" : `${bytes(m.store_bytes)} (${m.store_blobs})`;
  if (m.stats === "asking") return "…";
  if (m.stats === "unknown") {
    return m.stats_seen ? `unknown (last seen ${duration(now - m.stats_seen)} ago)` : "unknown (never answered)";
  }
  return "—";
}

function drawFleet() {
  const now = state.t;
  const body = $("fleet").tBodies[0];
  const pages = Math.max(1, Math.ceil(state.fleet.length / PAGE));
  state.fleetPage = Math.min(state.fleetPage, pages - 1);
  const first = state.fleetPage * PAGE;
  const keep = new Set();
  let prev = null;
  for (const m of state.fleet.slice(first, first + PAGE)) {
    let r = fleetRows.get(m.node);
    if (!r) fleetRows.set(m.node, r = fleetRow(m.node));
    const c = r.cells;
    if (r.tr.dataset.liveness !== m.liveness) {
      r.tr.dataset.liveness = m.liveness;
      c.badge.className = `badge ${m.liveness}`;
      setText(c.badge, m.liveness);
    }
    setText(c.heard, m.self ? "this node" : m.last_seen ? `${duration(now - m.last_seen)} ago` : "never");
    setText(c.addresses, m.addresses.join(" "));
    setText(c.groups, m.groups.join(", "));
    setText(c.caps, Object.entries(m.capabilities).map(([k, v]) => `${k}=${v}`).join(", "));
    setText(c.store, storeText(m, now));
    if (r.tr.dataset.stats !== String(m.stats)) r.tr.dataset.stats = String(m.stats);
    c.store.title = m.stats === "ok" && !m.self ? `answered ${duration(now - m.stats_seen)} ago` : "";
    setText(c.up, rate(m.up));
    setText(c.down, rate(m.down));
    const at = prev ? prev.nextSibling : body.firstChild;
    if (at !== r.tr) body.insertBefore(r.tr, at);
    prev = r.tr;
    keep.add(m.node);
  }
  for (const [n, r] of fleetRows) if (!keep.has(n)) { r.tr.remove(); fleetRows.delete(n); }
  setText($("fleet-count"), `${state.fleet.length} members`);
  $("fleet-pager").hidden = pages === 1;
  setText($("fleet-range"), `${first + 1}–${Math.min(first + PAGE, state.fleet.length)} of ${state.fleet.length}`);
  $("fleet-prev").disabled = state.fleetPage === 0;
  $("fleet-next").disabled = state.fleetPage >= pages - 1;
}

function turnFleetPage(by) {
  state.fleetPage += by;
  dirty.fleet = true;
  tellFleetPage();
  redraw();
}

// rows stay in place while their values change, so a click never lands on a replaced row
const distRows = new Map();  // handle -> {tr, cells, cancel}

function distRow(handle) {
  const cells = {};
  const td = (name, attrs, ...children) => (cells[name] = el("td", attrs || {}, ...children));
  cells.blobId = el("code"); cells.size = el("span");
  cells.badge = el("span", { class: "badge" });
  cells.fill = el("i"); cells.bar = el("span", { class: "bar" }, cells.fill);
  cells.pct = el("span", { class: "pct" });
  const cancel = el("button", { type: "button", class: "cancel" }, "cancel");
  cancel.addEventListener("click", (ev) => { ev.stopPropagation(); cancelDist(handle); });
  const tr = el("tr", { "data-handle": handle },
    el("td", {}, el("code", {}, handle)), td("blob", {}, cells.blobId, cells.size), td("scope"), td("priority"),
    el("td", {}, cells.badge), td("done", { class: "num done" }), el("td", {}, cells.bar, cells.pct),
    td("bytes", { class: "num" }), td("rate", { class: "num" }), td("eta", { class: "num" }), el("td", {}, cancel));
  tr.addEventListener("click", () => select(handle));
  return { tr, cells, cancel };
}

function fillDist(r, d) {
  const frac = d.bytes_total ? d.bytes_done / d.bytes_total : (d.state === "completed" ? 1 : 0);
  const c = r.cells;
  if (r.tr.dataset.state !== d.state) {
    r.tr.dataset.state = d.state;
    c.badge.className = `badge ${d.state}`;
    setText(c.badge, d.state);
    r.cancel.disabled = d.state !== "active";
  }
  c.blob.title = d.blob;
  setText(c.blobId, short(d.blob));
  setText(c.size, ` ${bytes(d.size)}`);
  setText(c.scope, d.scope);
  c.scope.title = d.scope;
  setText(c.priority, d.priority);
  setText(c.done, `${d.completed}/${d.targets}` + (d.failed ? ` (${d.failed} failed)` : ""));
  const width = `${Math.min(100, 100 * frac).toFixed(1)}%`;
  if (c.fill._width !== width) { c.fill._width = width; c.fill.style.width = width; }
  const bar = "bar" + (frac >= 1 ? " done" : "");
  if (c.bar.className !== bar) c.bar.className = bar;
  setText(c.pct, ` ${(100 * frac).toFixed(1)} %`);
  setText(c.bytes, `${bytes(d.bytes_done)} / ${bytes(d.bytes_total)}`);
  setText(c.rate, rate(d.rate));
  setText(c.eta, d.state === "active" ? duration(d.eta) : "");
}

function drawDists() {
  const body = $("dists").tBodies[0];
  const list = state.distOrder.slice(0, 200);
  $("dists-empty").hidden = list.length > 0;
  const keep = new Set();
  let prev = null;
  for (const h of list) {
    const d = state.dists.get(h);
    if (!d) continue;
    let r = distRows.get(h);
    if (!r) distRows.set(h, r = distRow(h));
    if (dirty.dists.has(h) || !r.filled) { fillDist(r, d); r.filled = true; }
    const selected = h === state.selected ? "selected" : "";
    if (r.tr.className !== selected) r.tr.className = selected;
    const at = prev ? prev.nextSibling : body.firstChild;
    if (at !== r.tr) body.insertBefore(r.tr, at);
    prev = r.tr;
    keep.add(h);
  }
  for (const [h, r] of distRows) if (!keep.has(h)) { r.tr.remove(); distRows.delete(h); }
  if (dirty.node) {
    const blobs = $("blob-list");
    const opts = state.node.blobs.map((b) => el("option", { value: b.blob }, `${bytes(b.size)} ${b.pins.join(", ")}`));
    if (blobs.childElementCount !== opts.length) blobs.replaceChildren(...opts);
  }
}

function drawPins() {
  const rows = [];
  for (const b of state.node.blobs) {
    for (const name of b.pins) {
      const un = el("button", { type: "button", class: "unpin" }, "unpin");
      un.addEventListener("click", () => act("DELETE", `/v1/pins/${encodeURIComponent(name)}`));
      rows.push(el("tr", { "data-pin": name }, el("td", {}, name), el("td", { title: b.blob }, el("code", {}, short(b.blob))), el("td", {}, un)));
    }
  }
  const sig = rows.map((r) => r.dataset.pin).join("\n");
  const pins = $("pins").tBodies[0];
  if (pins._sig !== sig) { pins._sig = sig; pins.replaceChildren(...rows); }
}

// the newest 100 events, newest first: new ones are put on top, the oldest dropped
function drawEvents() {
  const list = $("events");
  const item = (e) => el("li", { class: e.level }, `${new Date(e.t * 1000).toLocaleTimeString()} ${e.text}`);
  if (dirty.events === "all") {
    list.replaceChildren(...state.events.slice(-100).reverse().map(item));
  } else {
    const last = Number(list.dataset.last || 0);
    const news = state.events.filter((e) => e.seq > last).slice(-100).reverse();
    if (news.length) list.prepend(...news.map(item));
    while (list.childElementCount > 100) list.lastChild.remove();
  }
  list.dataset.last = String(state.events.length ? state.events[state.events.length - 1].seq : 0);
}

function select(handle) {
  if (state.selected === handle) return;
  state.selected = handle;
  state.targets = new Map(); state.order = []; state.history = []; state.summary = null;
  $("detail").hidden = !handle;
  $("detail-handle").textContent = handle || "";
  $("targets").replaceChildren($("targets-spacer"));
  $("targets")._rows = -1;
  rowEls = new Map();
  $("targets").scrollTop = 0;
  state.scrollTop = 0;
  dirty.chart = true;
  connect();
  if (state.node) draw();
}

function drawDetail() {
  const s = state.summary;
  if (s) {
    setText($("detail-summary"), `${short(s.blob)} ${bytes(s.size)} to ${s.scope} [${s.priority}] · ${s.state} · ` +
      `${s.completed}/${s.targets} completed` + (s.failed ? `, ${s.failed} failed` : "") +
      ` · ${rate(s.rate) || "idle"}` + (s.state === "active" ? ` · ETA ${duration(s.eta)}` : ""));
  }
  if (state.rowsDirty) { state.rowsDirty = false; drawTargets(); }
  if (dirty.chart) { dirty.chart = false; drawChart(); }
}

let rowEls = new Map();  // node -> [what it shows, its row element] in the target box

function targetRow() {
  const parts = {
    id: el("code"), badge: el("span", { class: "badge" }), fill: el("i"), pct: el("span"),
    rate: el("span"), sources: el("span", { class: "sources" }), reason: el("span"),
  };
  const r = el("div", { class: "trow" }, el("span", {}, parts.id), el("span", { class: "tstate" }, parts.badge),
    el("span", {}, el("span", { class: "bar" }, parts.fill), parts.pct), parts.rate, parts.sources, parts.reason);
  r.parts = parts;
  return r;
}

// fills a row in place (cheaper than building one: a draw touches only what changed)
function fillRow(r, t, i, total) {
  const p = r.parts;
  const frac = t.state === "completed" ? 1 : total ? t.bytes_done / total : 0;
  const sources = t.state === "transferring" ? (t.sources || []) : [];
  const rates = t.source_rates || [];
  r.dataset.node = t.node;
  r.dataset.state = t.state;
  r.dataset.sources = sources.join(" ");
  r.style.top = `${i * ROW}px`;
  setText(p.id, short(t.node));
  p.id.parentNode.title = t.node;
  setText(p.badge, t.state);
  p.badge.className = `badge ${t.state}`;
  p.fill.style.width = `${Math.min(100, 100 * frac).toFixed(1)}%`;
  p.fill.parentNode.className = "bar" + (frac >= 1 ? " done" : "");
  setText(p.pct, ` ${(100 * frac).toFixed(1)} %`);
  setText(p.rate, rate(t.rate));
  // which peers it receives from (short ids) and how fast (when the target reports it)
  const from = (n, i) => n.slice(0, 9) + (i < rates.length ? ` ${rate(rates[i]) || "0"}` : "");
  setText(p.sources, sources.map(from).join(", ") ||
    (t.state === "transferring" && t.peers ? `${t.peers} connected` : ""));
  p.sources.title = sources.map((n, i) => n + (i < rates.length ? ` ${rate(rates[i]) || "0 B/s"}` : "")).join("\n");
  setText(p.reason, t.reason);
  p.reason.title = t.reason;
}

function drawTargets() {
  // no layout reads here (they would force a layout of the whole page every draw): the
  // box's height is ours and its scroll position comes from its scroll events
  const box = $("targets");
  const total = state.summary ? state.summary.size : 0;
  const height = Math.min(360, state.order.length * ROW + 2);
  if (box._rows !== state.order.length) {
    box._rows = state.order.length;
    $("targets-spacer").style.height = `${state.order.length * ROW}px`;
    box.style.height = `${height}px`;
  }
  const first = Math.max(0, Math.floor(state.scrollTop / ROW) - 5);
  const last = Math.min(state.order.length, first + Math.ceil(height / ROW) + 10);
  // rows are absolutely placed and reused: a draw refills only the ones that changed
  const keep = new Map();
  const visible = new Set(state.order.slice(first, last));
  const spare = [];
  for (const [node, entry] of rowEls) if (!visible.has(node)) spare.push(entry[1]);
  for (let i = first; i < last; i++) {
    const t = state.targets.get(state.order[i]);
    const sig = [i, total, t.state, t.bytes_done, t.rate, t.peers, t.reason, (t.sources || []).join(), (t.source_rates || []).join()].join("|");
    const old = rowEls.get(t.node);
    const r = old ? old[1] : spare.pop() || box.appendChild(targetRow());
    if (!old || old[0] !== sig) fillRow(r, t, i, total);
    keep.set(t.node, [sig, r]);
  }
  for (const r of spare) r.remove();
  rowEls = keep;
  setText($("targets-count"), `${state.order.length} targets` +
    (state.order.length > last - first ? ` (showing ${first + 1}–${last}; scroll for more)` : ""));
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
$("fleet-prev").addEventListener("click", () => turnFleetPage(-1));
$("fleet-next").addEventListener("click", () => turnFleetPage(1));
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
