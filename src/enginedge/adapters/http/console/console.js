// The EnginEdge operator console: plain ES module, no dependencies, no build step.
// The API key lives in sessionStorage and travels only in the X-API-Key header.
// A tenant's key sees its own requests; an operator's key every tenant's, with a tenant
// column, and the dead letters (the server decides; the page only hides what is empty).

const KEY_NAME = "enginedge.apiKey";
const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"]);
const $ = (sel) => document.querySelector(sel);

// ------------------------------------------------------------------ helpers

/** Build an element: h("td", {class: "x"}, "text", child). Text is never parsed as HTML. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const svgNS = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}) {
  const el = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

const fmtTime = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "—");
const fmtDateTime = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
function ago(iso) {
  if (!iso) return "never";
  const secs = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
  if (secs < 60) return `${secs.toFixed(0)} s ago`;
  if (secs < 3600) return `${(secs / 60).toFixed(0)} min ago`;
  return `${(secs / 3600).toFixed(1)} h ago`;
}
const fmtMs = (ms) => (ms === null || ms === undefined ? "—" : ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`);
const badge = (status) => h("span", { class: `badge ${status}`, "data-status": status }, status);
const json = (v) => JSON.stringify(v, null, 2);

// ------------------------------------------------------------------ API

const key = () => sessionStorage.getItem(KEY_NAME);

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { "X-API-Key": key() ?? "", Accept: "application/json", ...(options.headers ?? {}) },
  });
  if (response.status === 401) throw new Unauthorized();
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body?.error?.message ?? `HTTP ${response.status}`;
    throw Object.assign(new Error(message), { code: body?.error?.code, status: response.status });
  }
  return body;
}

/**
 * Read a Server-Sent Events stream with fetch (EventSource cannot send the key in a header).
 * Calls onEvent(type, data) for each event; resolves when the stream ends or is aborted.
 */
async function readEvents(path, signal, onEvent, onOpen) {
  const response = await fetch(path, {
    headers: { "X-API-Key": key() ?? "", Accept: "text/event-stream" },
    signal,
    cache: "no-store",
  });
  if (response.status === 401) throw new Unauthorized();
  if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
  onOpen?.();
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let match;
    while ((match = /\r?\n\r?\n/.exec(buffer))) {
      const block = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      let type = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") type = val;
        else if (field === "data") data.push(val);
      }
      if (data.length) {
        let parsed;
        try { parsed = JSON.parse(data.join("\n")); } catch { parsed = data.join("\n"); }
        onEvent(type, parsed);
      }
    }
  }
}

// ------------------------------------------------------------------ state

const state = {
  requests: [],
  workers: [],
  activity: null,
  deadLetters: [],
  feed: null, // AbortController of the live feed
  detail: null, // {id, controller}
  view: "requests",
  session: null, // {tenant, admin}: who the key is
};

function setLive(ok, text) {
  const live = $("#live");
  live.className = `live ${ok ? "ok" : "down"}`;
  live.textContent = text;
}

// ------------------------------------------------------------------ sign in / out

function showSignin(message = "") {
  stopFeed();
  stopDetail();
  $("#app").hidden = true;
  $("#signin").hidden = false;
  $("#signin-error").textContent = message;
  $("#api-key").focus();
}

async function signIn(event) {
  event.preventDefault();
  const candidate = $("#api-key").value.trim();
  $("#signin-error").textContent = "";
  sessionStorage.setItem(KEY_NAME, candidate);
  try {
    state.session = await api("/api/console/session");
  } catch (err) {
    sessionStorage.removeItem(KEY_NAME);
    $("#signin-error").textContent =
      err instanceof Unauthorized ? "That API key is not valid." : `Cannot reach the service: ${err.message}`;
    return;
  }
  $("#api-key").value = "";
  start();
}

function signOut() {
  sessionStorage.removeItem(KEY_NAME);
  state.session = null;
  showSignin("Signed out.");
}

function unauthorized() {
  sessionStorage.removeItem(KEY_NAME);
  state.session = null;
  showSignin("The API key was refused; sign in again.");
}

// ------------------------------------------------------------------ live feed

function feedPath() {
  const params = new URLSearchParams();
  const status = $("#f-status").value;
  const task = $("#f-task").value.trim();
  const since = $("#f-since").value;
  if (status) params.set("status", status);
  if (task) params.set("taskType", task);
  if (since) params.set("sinceMinutes", since);
  params.set("limit", "100");
  return `/api/console/feed?${params}`;
}

function stopFeed() {
  state.feed?.abort();
  state.feed = null;
}

async function runFeed() {
  stopFeed();
  const controller = new AbortController();
  state.feed = controller;
  let delay = 500;
  while (!controller.signal.aborted) {
    try {
      await readEvents(feedPath(), controller.signal, onFeedEvent, () => {
        delay = 500;
        setLive(true, "live");
      });
    } catch (err) {
      if (err instanceof Unauthorized) return unauthorized();
      if (controller.signal.aborted) return;
    }
    if (controller.signal.aborted) return;
    setLive(false, "reconnecting…");
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 5000);
  }
}

function onFeedEvent(type, data) {
  if (type === "requests") {
    state.requests = data.items;
    renderRequests();
  } else if (type === "workers") {
    state.workers = data.items;
    renderFleet();
  } else if (type === "activity") {
    state.activity = data;
    renderCharts();
  } else if (type === "deadLetters") {
    state.deadLetters = data.items;
    renderDeadLetters();
  } else if (type === "error") {
    setLive(false, `service error: ${data.message}`);
    return;
  }
  setLive(true, "live");
}

// ------------------------------------------------------------------ requests

const isAdmin = () => state.session?.admin === true;

function renderRequests() {
  const body = $("#requests-table tbody");
  body.replaceChildren(
    ...state.requests.map((r) =>
      h("tr", { "data-request-id": r.requestId },
        h("td", { class: "mono" },
          h("a", { href: `#/requests/${r.requestId}`, "aria-label": `Open request ${r.requestId}` },
            r.requestId.slice(0, 8))),
        isAdmin() ? h("td", { class: "tenant", title: r.tenant ?? "" }, r.tenant ?? "—") : null,
        h("td", {}, r.taskType),
        h("td", {}, badge(r.status)),
        h("td", { class: "opt mono" }, r.workerId ? r.workerId.slice(0, 12) : "—"),
        h("td", { class: "opt" }, r.attempts),
        h("td", { title: fmtDateTime(r.createdAt) }, fmtTime(r.createdAt)),
        h("td", { class: "opt" }, fmtMs(r.processingTime)),
      )),
  );
  $("#requests-empty").hidden = state.requests.length > 0;
  const types = new Set(state.requests.map((r) => r.taskType));
  $("#task-types").replaceChildren(...[...types].sort().map((t) => h("option", { value: t })));
  // The detail view follows the request's own stream; refresh it if the feed saw a change.
  if (state.detail) {
    const row = state.requests.find((r) => r.requestId === state.detail.id);
    if (row && row.status !== state.detail.status) loadDetail(state.detail.id, false);
  }
}

// ------------------------------------------------------------------ detail

function stopDetail() {
  state.detail?.controller.abort();
  state.detail = null;
}

function field(label, value) {
  return [h("dt", {}, label), h("dd", {}, value ?? "—")];
}

async function openDetail(id) {
  stopDetail();
  const controller = new AbortController();
  state.detail = { id, controller, status: null };
  $("#d-output").textContent = "";
  $("#d-output-section").hidden = true;
  $("#d-message").textContent = "";
  await loadDetail(id, true);
}

async function loadDetail(id, follow) {
  let r;
  try {
    r = await api(`/api/requests/${encodeURIComponent(id)}`);
  } catch (err) {
    if (err instanceof Unauthorized) return unauthorized();
    $("#h-detail").textContent = "Request not found";
    $("#d-message").textContent = err.message;
    return;
  }
  if (!state.detail || state.detail.id !== id) return;
  state.detail.status = r.status;
  $("#h-detail").textContent = `Request ${r.requestId}`;
  $("#d-status").replaceWith(Object.assign(badge(r.status), { id: "d-status" }));
  $("#d-cancel").hidden = TERMINAL.has(r.status);
  $("#d-fields").replaceChildren(
    ...(isAdmin() ? field("Tenant", r.tenant) : []),
    ...field("Task type", r.taskType),
    ...field("Worker type", r.workerType),
    ...field("Worker", r.workerId),
    ...field("Attempts", `${r.attempts} of ${r.maxAttempts}`),
    ...field("Priority", r.priority),
    ...(r.queuePosition != null ? field("Place in queue", r.queuePosition) : []),
    ...field("Correlation id", r.correlationId),
    ...field("Created", fmtDateTime(r.createdAt)),
    ...field("Dispatched", fmtDateTime(r.dispatchedAt)),
    ...field("Started", fmtDateTime(r.startedAt)),
    ...field("Finished", fmtDateTime(r.finishedAt)),
    ...field("Deadline", fmtDateTime(r.deadline)),
    ...field("Processing time", fmtMs(r.processingTime)),
  );
  $("#d-payload").textContent = json(r.payload);
  $("#d-metadata").textContent = json(r.metadata);
  $("#d-result-section").hidden = r.result === null;
  $("#d-result").textContent = r.result === null ? "" : json(r.result);
  $("#d-error-section").hidden = !r.error;
  $("#d-error").textContent = r.error ?? "";
  if (follow && !TERMINAL.has(r.status)) followDetail(id, state.detail.controller);
}

async function followDetail(id, controller) {
  const output = $("#d-output");
  let lastSeq = { attempt: 0, seq: -1 };
  const onEvent = (type, data) => {
    if (type === "progress") {
      if (data.attempt !== lastSeq.attempt) {
        output.textContent = "";
        lastSeq = { attempt: data.attempt, seq: -1 };
      }
      if (data.seq <= lastSeq.seq) return;
      lastSeq.seq = data.seq;
      const chunk = data.chunk;
      output.textContent += typeof chunk?.text === "string" ? chunk.text : `${JSON.stringify(chunk)}\n`;
      $("#d-output-section").hidden = false;
    } else if (type === "status") {
      loadDetail(id, false);
    }
  };
  try {
    await readEvents(`/api/requests/${encodeURIComponent(id)}/events`, controller.signal, onEvent);
  } catch (err) {
    if (err instanceof Unauthorized) unauthorized();
  }
}

async function cancelDetail() {
  if (!state.detail) return;
  const id = state.detail.id;
  const button = $("#d-cancel");
  button.disabled = true;
  $("#d-message").textContent = "Cancelling…";
  try {
    await api(`/api/requests/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    $("#d-message").textContent = "Cancelled.";
  } catch (err) {
    if (err instanceof Unauthorized) return unauthorized();
    $("#d-message").textContent = `Not cancelled: ${err.message}`;
  } finally {
    button.disabled = false;
  }
  await loadDetail(id, false);
}

// ------------------------------------------------------------------ fleet

function renderFleet() {
  const byType = new Map();
  for (const w of state.workers) {
    const t = byType.get(w.type) ?? { healthy: 0, total: 0 };
    t.total += 1;
    if (w.status === "HEALTHY") t.healthy += 1;
    byType.set(w.type, t);
  }
  $("#fleet-summary").replaceChildren(
    ...[...byType].map(([type, c]) =>
      h("div", { class: "stat" }, h("strong", {}, type), `: ${c.healthy} of ${c.total} healthy`)),
  );
  $("#fleet-table tbody").replaceChildren(
    ...state.workers.map((w) =>
      h("tr", { "data-worker-id": w.workerId },
        h("td", { class: "mono", title: w.endpoint }, w.workerId),
        h("td", {}, w.type),
        h("td", {}, badge(w.status)),
        h("td", {}, w.capacity),
        h("td", { title: `its last heartbeat: ${w.active} running` },
          h("meter", { min: 0, max: w.capacity, value: w.slotsInUse,
                       "aria-label": `slots in use of ${w.workerId}` }),
          ` ${w.slotsInUse}/${w.capacity}`),
        h("td", { title: fmtDateTime(w.lastHeartbeat), class: "ago", "data-time": w.lastHeartbeat },
          ago(w.lastHeartbeat)),
        h("td", { class: "opt ago", title: fmtDateTime(w.lastHealthCheck), "data-time": w.lastHealthCheck ?? "" },
          ago(w.lastHealthCheck)),
        h("td", { class: "opt wrap" }, w.statusReason ?? ""),
      )),
  );
  $("#fleet-empty").hidden = state.workers.length > 0;
}

// ------------------------------------------------------------------ charts

const W = 300;
const H = 120;
const PAD = { l: 34, r: 6, t: 8, b: 16 };

function frame(svg, max, unit, buckets) {
  const y = (v) => PAD.t + (H - PAD.t - PAD.b) * (1 - v / max);
  svg.append(s("line", { class: "axis", x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b }));
  svg.append(s("line", { class: "axis", x1: PAD.l, y1: PAD.t, x2: PAD.l, y2: H - PAD.b }));
  const top = s("text", { x: 2, y: PAD.t + 8 });
  top.textContent = `${+max.toPrecision(3)}${unit}`;
  const zero = s("text", { x: 2, y: H - PAD.b });
  zero.textContent = "0";
  const first = s("text", { x: PAD.l, y: H - 3 });
  first.textContent = fmtTime(buckets[0]);
  const last = s("text", { x: W - PAD.r, y: H - 3, "text-anchor": "end" });
  last.textContent = "now";
  svg.append(top, zero, first, last);
  return y;
}

function xAt(i, n) {
  return PAD.l + ((W - PAD.l - PAD.r) * (i + 0.5)) / n;
}

function path(values, y, n) {
  let d = "";
  let pen = false;
  values.forEach((v, i) => {
    if (v === null) { pen = false; return; }
    d += `${pen ? "L" : "M"}${xAt(i, n).toFixed(1)},${y(v).toFixed(1)} `;
    pen = true;
  });
  return d.trim();
}

function chart(title, summary, draw) {
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": `${title}: ${summary}` });
  draw(svg);
  return h("div", { class: "chart" }, h("figure", {}, h("figcaption", {}, title), svg));
}

function renderCharts() {
  const a = state.activity;
  const root = $("#charts");
  if (!a) return;
  const n = a.buckets.length;
  const groups = Object.entries(a.series).map(([type, series]) => {
    const total = series.throughput.reduce((x, y) => x + y, 0);
    const per = a.bucketSeconds;
    const lat = [...series.latencyP50, ...series.latencyP95].filter((v) => v !== null);
    const latMax = Math.max(0.001, ...lat);
    const depthMax = Math.max(1, ...series.queueDepth);
    const tpMax = Math.max(1, ...series.throughput);
    const lastDepth = series.queueDepth[n - 1] ?? 0;
    const p95 = series.latencyP95.filter((v) => v !== null).at(-1);
    return h("section", { class: "chart-group", "data-worker-type": type, "aria-label": `Charts for ${type}` },
      h("h3", {}, type),
      h("div", { class: "chart-row" },
        chart(`Throughput (finished per ${per.toFixed(0)} s)`, `${total} finished in the window`, (svg) => {
          const y = frame(svg, tpMax, "", a.buckets);
          const bw = ((W - PAD.l - PAD.r) / n) * 0.8;
          series.throughput.forEach((v, i) => {
            if (v > 0) svg.append(s("rect", { class: "bar", x: xAt(i, n) - bw / 2, y: y(v), width: bw, height: H - PAD.b - y(v) }));
          });
        }),
        chart("Latency (s)", p95 === undefined ? "no request finished" : `latest p95 ${p95.toFixed(2)} s`, (svg) => {
          const y = frame(svg, latMax, " s", a.buckets);
          svg.append(s("path", { class: "p50", d: path(series.latencyP50, y, n) }));
          svg.append(s("path", { class: "p95", d: path(series.latencyP95, y, n) }));
        }),
        chart("Queue depth (waiting for a worker)", `${lastDepth} waiting now`, (svg) => {
          const y = frame(svg, depthMax, "", a.buckets);
          svg.append(s("path", { class: "depth", d: `${path(series.queueDepth, y, n)} L${xAt(n - 1, n)},${y(0)} L${xAt(0, n)},${y(0)} Z` }));
        }),
      ),
      h("p", { class: "legend" }, "Latency: ", h("span", { class: "k50" }, "━ median"), "  ", h("span", { class: "k95" }, "━ 95th percentile")),
    );
  });
  root.replaceChildren(...(groups.length ? groups : [h("p", { class: "muted" }, "No activity yet.")]));
  if (a.truncated) root.append(h("p", { class: "muted" }, "More requests than the console reads: partial."));
}

// ------------------------------------------------------------------ dead letters

function renderDeadLetters() {
  $("#dlq-table tbody").replaceChildren(
    ...state.deadLetters.map((d) =>
      h("tr", { "data-dead-letter": d.id },
        h("td", { title: fmtDateTime(d.failedAt) }, fmtDateTime(d.failedAt)),
        h("td", { class: "mono" }, d.topic),
        h("td", { class: "wrap" }, d.reason),
        h("td", { class: "opt mono" },
          d.requestId ? h("a", { href: `#/requests/${d.requestId}` }, d.requestId.slice(0, 8)) : "—"),
        h("td", {}, h("details", {}, h("summary", {}, "Show"), h("pre", {}, json(d.message)))),
      )),
  );
  $("#dlq-empty").hidden = state.deadLetters.length > 0;
}

// ------------------------------------------------------------------ routing

function route() {
  const hash = location.hash || "#/requests";
  const [, view, id] = hash.match(/^#\/([a-z-]+)(?:\/([^/]+))?/) ?? [null, "requests", null];
  const name = view === "requests" && id ? "detail" : view;
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== `view-${name}`;
  }
  if (!document.getElementById(`view-${name}`)) {
    $("#view-requests").hidden = false;
  }
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.view === (name === "detail" ? "requests" : name)) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (name === "detail") openDetail(decodeURIComponent(id));
  else stopDetail();
  state.view = name;
}

function showSession() {
  const s = state.session;
  $("#whoami").textContent = s ? `${s.tenant}${s.admin ? " (operator)" : ""}` : "";
  $("#th-tenant").hidden = !isAdmin();
  // Dead letters hold any tenant's messages: operators only (a tenant's list is empty).
  $("#nav-dead-letters").hidden = !isAdmin();
}

async function start() {
  if (!state.session) {
    try {
      state.session = await api("/api/console/session");
    } catch (err) {
      if (err instanceof Unauthorized) return unauthorized();
      // The service is unreachable: the feed says so and retries.
    }
  }
  $("#signin").hidden = true;
  $("#app").hidden = false;
  showSession();
  route();
  runFeed();
}

function init() {
  $("#signin-form").addEventListener("submit", signIn);
  $("#signout").addEventListener("click", signOut);
  $("#d-cancel").addEventListener("click", cancelDetail);
  let debounce;
  $("#filters").addEventListener("input", () => {
    clearTimeout(debounce);
    debounce = setTimeout(runFeed, 250);
  });
  $("#filters").addEventListener("submit", (e) => e.preventDefault());
  window.addEventListener("hashchange", route);
  // Relative times ("3 s ago") move on between feed events.
  setInterval(() => {
    for (const cell of document.querySelectorAll("td.ago")) cell.textContent = ago(cell.dataset.time || null);
  }, 1000);
  if (key()) start();
  else showSignin();
}

init();
