// zerostart's dashboard: polls GET /zerostart/status (the page sits at /zerostart/, so the
// relative URL "status" is that route) and redraws the fleet. No framework, no build step.
// Every text from the server goes through textContent: model names and errors are not markup.
"use strict";

const RUNGS = [
  ["hot", "in device memory"],
  ["parked", "worker alive, weights in host RAM"],
  ["image", "a ready image on disk"],
  ["zero", "only the source"],
];
const MOVING = new Set(["starting", "waking", "parking", "stopping"]);
const PHASE_COLORS = {
  spawn: "#8c6bb1", import: "#6a51a3", device_init: "#9e9ac8", fetch: "#e6550d", read: "#3182bd",
  copy: "#6baed6", prepare: "#31a354", warmup: "#74c476", wake: "#fd8d3c", first_token: "#de2d26",
};
const params = new URLSearchParams(location.search);
const INTERVAL_MS = Math.max(0.25, Number(params.get("interval")) || 1) * 1000;
const WINDOW_MS = 60000; // rates are averaged over this much history
const samples = []; // {t, requests, coldStarts}: the fleet's counters at each poll
let polls = 0;

// -- formatting (as zerostart.units.format_size: one decimal, rounded half to even) -----------

function oneDecimal(x) {
  const y = x * 10;
  const f = Math.floor(y);
  const tenths = y - f === 0.5 ? (f % 2 === 0 ? f : f + 1) : Math.round(y);
  return (tenths / 10).toFixed(1);
}

function formatSize(n) {
  if (n === null || n === undefined) return "-";
  for (const [unit, scale] of [["GiB", 1024 ** 3], ["MiB", 1024 ** 2], ["KiB", 1024]]) {
    if (n >= scale) return `${oneDecimal(n / scale)} ${unit}`;
  }
  return `${Math.trunc(n)} B`;
}

function formatSeconds(s) {
  return s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
}

function formatDuration(s) {
  if (s === null) return "forever";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (h) return `${h}h${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m${String(sec).padStart(2, "0")}s`;
  return `${sec}s`;
}

// -- DOM -----------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("data-")) el.setAttribute(k, String(v));
    else if (k === "title") el.title = String(v);
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

// -- the ladder ----------------------------------------------------------------------------

function keptFor(m) {
  const kept = m.workers.filter((w) => w.state === "hot" || w.state === "parked").map((w) => w.kept_for_s);
  if (!kept.length) return "-";
  if (kept.some((k) => k === null)) return "forever";
  return formatDuration(Math.max(...kept));
}

function lastColdStart(c) {
  if (!c) return "none yet";
  const slowest = c.phases.reduce((a, p) => (a === null || p.seconds > a.seconds ? p : a), null);
  return `${c.rung} ${formatSeconds(c.ready_s)}` + (slowest ? ` (${slowest.name} ${formatSeconds(slowest.seconds)})` : "");
}

function modelCard(m) {
  const unavailable = Object.entries(m.unavailable_rungs);
  return h("article", { class: `model ${MOVING.has(m.state) ? "moving" : ""}`, "data-model": m.name,
                         "data-rung": m.rung, "data-state": m.state, "data-memory-bytes": m.memory_bytes },
    h("header", null, h("span", { class: "name" }, m.name),
      MOVING.has(m.state) ? h("span", { class: "state" }, m.state) : null),
    h("dl", null,
      h("dt", null, "memory"), h("dd", { class: "memory" }, formatSize(m.memory_bytes)),
      h("dt", null, "engine"), h("dd", null, `${m.backend} on ${m.device}`),
      h("dt", null, "requests"), h("dd", { class: "requests" }, `${m.in_flight} in flight, ${m.queued} queued`),
      h("dt", null, "kept for"), h("dd", { class: "kept" }, keptFor(m)),
      h("dt", null, "last cold start"), h("dd", { class: "last" }, lastColdStart(m.last_cold_start))),
    unavailable.length ? h("p", { class: "unavailable" }, "cannot rest on ",
      unavailable.map(([rung, why], i) => [i ? ", " : "", h("abbr", { title: why }, rung)])) : null,
    m.last_error ? h("p", { class: "error" }, m.last_error) : null);
}

function drawLadder(status) {
  const columns = RUNGS.map(([rung, what]) => {
    const models = status.models.filter((m) => m.rung === rung);
    return h("div", { class: `rung rung-${rung}`, "data-rung": rung },
      h("h3", null, rung, " ", h("small", null, what)),
      h("div", { class: "cards" }, models.length ? models.map(modelCard) : h("p", { class: "empty" }, "—")));
  });
  document.getElementById("ladder").replaceChildren(...columns);
}

// -- memory --------------------------------------------------------------------------------

function drawMemory(status) {
  const devices = status.devices.map((d) => {
    const moving = Math.max(0, d.reserved_bytes - d.hot_bytes - d.parked_bytes);
    const whole = d.budget_bytes || d.reserved_bytes || 1;
    const parts = [["hot", d.hot_bytes], ["parked", d.parked_bytes], ["moving", moving]];
    const free = d.budget_bytes === null ? null : Math.max(0, d.budget_bytes - d.reserved_bytes);
    const bar = h("div", { class: "bar", role: "img",
                           "aria-label": `${d.device}: ${formatSize(d.reserved_bytes)} held` });
    for (const [kind, bytes] of parts) {
      if (!bytes) continue;
      const seg = h("span", { class: `seg seg-${kind}`, title: `${kind}: ${formatSize(bytes)}` });
      seg.style.width = `${Math.min(100, (100 * bytes) / whole)}%`;
      bar.append(seg);
    }
    return h("div", { class: "device", "data-device": d.device },
      h("h3", null, d.device, " ", h("small", null, d.budget_bytes === null
        ? `${formatSize(d.reserved_bytes)} held, no budget`
        : `${formatSize(d.reserved_bytes)} held of a ${formatSize(d.budget_bytes)} budget`)),
      bar,
      h("ul", { class: "legend" },
        h("li", { class: "hot" }, "hot ", h("b", { class: "hot-bytes" }, formatSize(d.hot_bytes))),
        h("li", { class: "parked" }, "parked ", h("b", { class: "parked-bytes" }, formatSize(d.parked_bytes))),
        moving ? h("li", { class: "moving" }, "climbing or moving down ", h("b", null, formatSize(moving))) : null,
        free === null ? null : h("li", { class: "free" }, "free ", h("b", null, formatSize(free)))));
  });
  if (status.standby) {
    devices.push(h("p", { class: "standby" }, `standby worker: ${status.standby.state} on ${status.standby.device}`));
  }
  document.getElementById("memory").replaceChildren(...devices);
}

// -- rates ---------------------------------------------------------------------------------

function remember(status) {
  const now = performance.now();
  samples.push({ t: now, requests: status.models.reduce((a, m) => a + m.requests, 0),
                 coldStarts: status.models.reduce((a, m) => a + m.cold_starts, 0) });
  while (samples.length > 2 && now - samples[1].t > WINDOW_MS) samples.shift();
}

function rateSeries(key, per) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const dt = (samples[i].t - samples[i - 1].t) / 1000;
    out.push(dt > 0 ? (Math.max(0, samples[i][key] - samples[i - 1][key]) / dt) * per : 0);
  }
  return out;
}

function sparkline(series) {
  const w = 240, hgt = 40, top = Math.max(...series, 1e-9);
  const el = svg("svg", { class: "spark", viewBox: `0 0 ${w} ${hgt}`, preserveAspectRatio: "none" });
  if (series.length > 1) {
    const pts = series.map((v, i) => `${(i / (series.length - 1)) * w},${hgt - 2 - (v / top) * (hgt - 4)}`);
    el.append(svg("polyline", { points: pts.join(" ") }));
  }
  return el;
}

function drawRates() {
  const first = samples[0], last = samples[samples.length - 1];
  const span = (last.t - first.t) / 1000;
  const rate = (key, per) => (span > 0 ? ((last[key] - first[key]) / span) * per : null);
  const box = (id, value, unit, series, total) => h("div", { class: "rate", id },
    h("span", { class: "value" }, value === null ? "…" : value.toFixed(value >= 10 ? 0 : 2)),
    h("span", { class: "unit" }, unit), sparkline(series),
    h("span", { class: "total" }, `${total} since the gateway started`));
  document.getElementById("rates").replaceChildren(
    box("rate-requests", rate("requests", 1), "requests / s", rateSeries("requests", 1), last.requests),
    box("rate-coldstarts", rate("coldStarts", 60), "cold starts / min", rateSeries("coldStarts", 60),
        last.coldStarts));
}

// -- cold starts ---------------------------------------------------------------------------

function waterfall(c) {
  // the axis: from the climb's beginning to its last phase's end (total_s starts at its first phase)
  const total = Math.max(c.ready_s, ...c.phases.map((p) => p.end_s), 1e-6);
  const rows = c.phases.map((p) => {
    const span = h("span", { class: "span", title: `${p.name}: ${formatSeconds(p.seconds)} from ${formatSeconds(p.start_s)}` });
    span.style.left = `${(100 * p.start_s) / total}%`;
    span.style.width = `max(2px, ${(100 * p.seconds) / total}%)`;
    span.style.background = PHASE_COLORS[p.name] || "#888";
    return h("div", { class: "phase", "data-phase": p.name },
      h("span", { class: "label" }, p.name), h("div", { class: "track" }, span),
      h("span", { class: "secs" }, formatSeconds(p.seconds)));
  });
  const at = new Date(c.at_unix * 1000).toLocaleTimeString();
  return h("div", { class: "coldstart", "data-model": c.model, "data-rung": c.rung },
    h("h3", null, h("b", null, c.model), ` from ${c.rung}, ready after ${formatSeconds(c.ready_s)}`,
      h("small", null, ` at ${at}${c.ahead ? ", climbed ahead of any request" : ""}`)),
    rows);
}

function drawColdStarts(status) {
  const recent = status.recent_cold_starts.slice(0, 6);
  document.getElementById("coldstarts").replaceChildren(
    ...(recent.length ? recent.map(waterfall) : [h("p", { class: "empty" }, "no cold start yet")]));
}

// -- the loop ------------------------------------------------------------------------------

function problem(text) {
  const p = document.getElementById("problem");
  p.hidden = !text;
  p.textContent = text || "";
}

async function poll() {
  try {
    const r = await fetch("status", { cache: "no-store", credentials: "same-origin" });
    if (!r.ok) {
      let why = `HTTP ${r.status}`;
      try { why += `: ${(await r.json()).error.message}`; } catch (e) { /* not JSON */ }
      throw new Error(why);
    }
    const status = await r.json();
    remember(status);
    drawLadder(status);
    drawMemory(status);
    drawRates();
    drawColdStarts(status);
    document.getElementById("about").textContent =
      `${status.version} · up ${formatDuration(status.uptime_s)} · ${status.models.length} models`;
    const live = document.getElementById("live");
    live.textContent = `live · ${new Date().toLocaleTimeString()} · every ${INTERVAL_MS / 1000} s`;
    live.classList.remove("stale");
    problem(null);
    polls += 1;
    document.body.dataset.polls = String(polls); // (what a test waits on)
  } catch (e) {
    document.getElementById("live").classList.add("stale");
    problem(`cannot read /zerostart/status: ${e.message}`);
  } finally {
    setTimeout(poll, INTERVAL_MS);
  }
}

poll();
