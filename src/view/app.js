// grove view: polls the JSON API, draws one canvas chart per metric (all selected runs
// overlaid, EMA smoothing, drag to zoom) and a filterable sample browser. No framework.
"use strict";
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const POLL_MS = 2000;
const MAX_RESPONSES = 300;
const state = { runs: {}, order: [], selected: new Set(), zoom: null, smoothing: 0.6 };

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
const fmt = (v) => (v === null || v === undefined || Number.isNaN(v) ? "–" :
  Math.abs(v) >= 1000 || (Math.abs(v) < 0.001 && v !== 0) ? v.toExponential(3) : (+v.toFixed(4)).toString());

async function getJSON(url) {
  const r = await fetch(url);
  const v = await r.json();
  if (!r.ok) throw new Error(v.error || r.statusText);
  return v;
}

// Tag of a metric as the trackers name it: warm-up metrics are prefixed.
const tagOf = (line, key) => (line.phase && line.phase !== "rl" ? line.phase + "/" + key : key);

function ingestMetrics(run, lines) {
  for (const line of lines) {
    for (const [k, v] of Object.entries(line)) {
      if (k === "step" || k === "phase" || v === null || typeof v !== "number") continue;
      const tag = tagOf(line, k);
      (run.series[tag] = run.series[tag] || []).push([line.step, v]);
    }
  }
}

let polling = false;
async function poll() {
  if (polling) return; // a slow poll must not ingest the same lines twice
  polling = true;
  try {
    const list = await getJSON("/api/runs");
    for (const r of list) {
      if (!state.runs[r.name]) {
        state.runs[r.name] = { name: r.name, series: {}, samples: [], mFrom: 0, sFrom: 0,
          color: COLORS[state.order.length % COLORS.length] };
        state.order.push(r.name);
        state.selected.add(r.name);
      }
      const run = state.runs[r.name];
      if (r.metrics_lines > run.mFrom) {
        const m = await getJSON(`/api/metrics?run=${encodeURIComponent(r.name)}&from=${run.mFrom}`);
        ingestMetrics(run, m.lines);
        run.mFrom = m.next;
      }
      if (r.samples_lines > run.sFrom) {
        const s = await getJSON(`/api/samples?run=${encodeURIComponent(r.name)}&from=${run.sFrom}`);
        run.samples.push(...s.lines);
        run.sFrom = s.next;
      }
    }
    $("status").textContent = `${list.length} run(s) · updated ${new Date().toLocaleTimeString()} · refreshes every ${POLL_MS / 1000} s`;
    $("status").classList.remove("error");
    render();
  } catch (e) {
    $("status").textContent = "error: " + e.message;
    $("status").classList.add("error");
  } finally {
    polling = false;
  }
}

function renderRuns() {
  const box = $("runs");
  const have = [...box.querySelectorAll("input")].map((i) => i.value).join();
  if (have === state.order.join()) return;
  box.innerHTML = state.order.map((n) => `<label><input type="checkbox" value="${esc(n)}" ${state.selected.has(n) ? "checked" : ""}>
    <span class="swatch" style="background:${state.runs[n].color}"></span>${esc(n)}</label>`).join("");
  box.querySelectorAll("input").forEach((i) => i.addEventListener("change", () => {
    i.checked ? state.selected.add(i.value) : state.selected.delete(i.value);
    render();
  }));
  const sel = $("f-run");
  const cur = sel.value;
  sel.innerHTML = `<option value="">all</option>` + state.order.map((n) => `<option>${esc(n)}</option>`).join("");
  sel.value = cur;
}

function allTags() {
  const tags = new Set();
  for (const n of state.order) Object.keys(state.runs[n].series).forEach((t) => tags.add(t));
  // Space- or comma-separated terms: a metric shows when its name contains any of them.
  const terms = $("metric-filter").value.split(/[\s,]+/).filter((t) => t);
  return [...tags].filter((t) => !terms.length || terms.some((f) => t.includes(f))).sort();
}

// TensorBoard's smoothing: an exponential moving average, debiased at the start.
function smooth(points, w) {
  if (w <= 0) return points;
  let last = 0, n = 0;
  return points.map(([x, y]) => {
    last = last * w + (1 - w) * y;
    n += 1;
    return [x, last / (1 - Math.pow(w, n))];
  });
}

// Enough decimals that the ticks of a narrow range (ratios near 1) differ.
function tickLabel(v, range) {
  if (v !== 0 && (Math.abs(v) >= 1e5 || Math.abs(v) < 1e-4)) return v.toExponential(2);
  const digits = Math.min(8, Math.max(0, Math.ceil(-Math.log10(range)) + 2));
  return (+v.toFixed(digits)).toString();
}

function drawChart(canvas, tag) {
  const dpr = window.devicePixelRatio || 1;
  const W = canvas.clientWidth || 300, H = canvas.clientHeight || 150;
  canvas.width = W * dpr; canvas.height = H * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, W, H);
  const lines = [];
  for (const n of state.order) {
    if (!state.selected.has(n)) continue;
    let pts = state.runs[n].series[tag] || [];
    if (state.zoom) pts = pts.filter(([x]) => x >= state.zoom[0] && x <= state.zoom[1]);
    if (pts.length) lines.push({ color: state.runs[n].color, raw: pts, sm: smooth(pts, state.smoothing) });
  }
  const pad = { l: 46, r: 8, t: 6, b: 18 };
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (const l of lines) for (const [x, y] of l.raw) { x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  if (!lines.length) { ctx.fillStyle = "#999"; ctx.fillText("no data", W / 2 - 20, H / 2); return null; }
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const sx = (x) => pad.l + ((x - x0) / (x1 - x0)) * (W - pad.l - pad.r);
  const sy = (y) => H - pad.b - ((y - y0) / (y1 - y0)) * (H - pad.t - pad.b);
  ctx.strokeStyle = "#ccc"; ctx.lineWidth = 1; ctx.fillStyle = "#666"; ctx.font = "10px sans-serif";
  for (let i = 0; i <= 3; i++) {
    const y = y0 + ((y1 - y0) * i) / 3;
    ctx.beginPath(); ctx.moveTo(pad.l, sy(y)); ctx.lineTo(W - pad.r, sy(y)); ctx.stroke();
    ctx.fillText(tickLabel(y, y1 - y0), 2, sy(y) + 3);
  }
  ctx.fillText(String(x0), pad.l, H - 4);
  ctx.fillText(String(x1), W - pad.r - 6 * String(x1).length, H - 4);
  for (const l of lines) {
    const path = (pts, alpha, width) => {
      ctx.globalAlpha = alpha; ctx.strokeStyle = l.color; ctx.lineWidth = width;
      ctx.beginPath();
      pts.forEach(([x, y], i) => (i ? ctx.lineTo(sx(x), sy(y)) : ctx.moveTo(sx(x), sy(y))));
      ctx.stroke();
      if (pts.length === 1) { ctx.fillStyle = l.color; ctx.fillRect(sx(pts[0][0]) - 2, sy(pts[0][1]) - 2, 4, 4); }
    };
    if (state.smoothing > 0) path(l.raw, 0.25, 1);
    path(l.sm, 1, 1.6);
  }
  ctx.globalAlpha = 1;
  return { x0, x1, pad, W };
}

function attachZoom(canvas, getScale) {
  let start = null;
  const stepAt = (ev) => {
    const s = getScale();
    if (!s) return null;
    const r = canvas.getBoundingClientRect();
    const f = (ev.clientX - r.left - s.pad.l) / (r.width - s.pad.l - s.pad.r);
    return s.x0 + Math.min(1, Math.max(0, f)) * (s.x1 - s.x0);
  };
  canvas.addEventListener("mousedown", (ev) => { start = stepAt(ev); });
  canvas.addEventListener("mouseup", (ev) => {
    const end = stepAt(ev);
    if (start !== null && end !== null && Math.abs(end - start) >= 1) {
      state.zoom = [Math.floor(Math.min(start, end)), Math.ceil(Math.max(start, end))];
      render();
    }
    start = null;
  });
  canvas.addEventListener("dblclick", () => { state.zoom = null; render(); });
}

function renderCharts() {
  const tags = allTags();
  const box = $("charts");
  const have = [...box.children].map((c) => c.dataset.tag).join("\n");
  if (have !== tags.join("\n")) {
    box.innerHTML = "";
    for (const tag of tags) {
      const div = document.createElement("div");
      div.className = "chart"; div.dataset.tag = tag;
      div.innerHTML = `<div class="title">${esc(tag)}</div><canvas></canvas>`;
      box.appendChild(div);
      const canvas = div.querySelector("canvas");
      attachZoom(canvas, () => canvas._scale);
    }
  }
  for (const div of box.children) {
    const canvas = div.querySelector("canvas");
    canvas._scale = drawChart(canvas, div.dataset.tag);
  }
  $("zoom").textContent = state.zoom ? `steps ${state.zoom[0]}–${state.zoom[1]} (double-click a chart to reset)` : "";
}

function renderLatest() {
  const runs = state.order.filter((n) => state.selected.has(n));
  let html = `<tr><th>metric</th>${runs.map((n) => `<th>${esc(n)}</th>`).join("")}</tr>`;
  for (const tag of allTags()) {
    html += `<tr data-metric="${esc(tag)}"><td>${esc(tag)}</td>` + runs.map((n) => {
      const s = state.runs[n].series[tag];
      return `<td>${s && s.length ? `${fmt(s[s.length - 1][1])} <small>@${s[s.length - 1][0]}</small>` : "–"}</td>`;
    }).join("") + "</tr>";
  }
  $("latest").innerHTML = html;
}

function num(id) { const v = $(id).value; return v === "" ? null : Number(v); }

function renderSamples() {
  const f = { run: $("f-run").value, s0: num("f-step-min"), s1: num("f-step-max"), r0: num("f-reward-min"),
    r1: num("f-reward-max"), l0: num("f-len-min"), l1: num("f-len-max"), c: $("f-correct").value };
  const inRange = (v, lo, hi) => (lo === null || v >= lo) && (hi === null || v <= hi);
  let html = "", shown = 0, total = 0;
  for (const n of state.order) {
    if (f.run && f.run !== n) continue;
    for (const s of [...state.runs[n].samples].reverse()) {
      if (!inRange(s.step, f.s0, f.s1)) continue;
      const rs = (s.responses || []).filter((r) => inRange(r.reward, f.r0, f.r1) &&
        (r.length === undefined || inRange(r.length, f.l0, f.l1)) &&
        (!f.c || (f.c === "yes") === !!r.correct));
      total += rs.length;
      if (!rs.length || shown >= MAX_RESPONSES) continue;
      shown += rs.length;
      html += `<div class="sample"><div class="head">${esc(n)} · step ${s.step} · policy v${esc(s.policy_version ?? "?")}
        · prompt <span class="prompt">${esc(s.prompt)}</span> · answer <span class="prompt">${esc(s.answer ?? "")}</span></div>
        <div class="response"><b>reward</b><b>verdict</b><b>advantage</b><b>length</b><b>components</b><b>response</b></div>` +
        rs.map((r) => `<div class="response ${r.correct ? "correct" : "wrong"}${r.masked ? " masked" : ""}">
          <span>${fmt(r.reward)}</span><span class="verdict">${r.correct ? "correct" : "wrong"}</span>
          <span>${fmt(r.advantage)}</span><span>${r.length ?? "?"}${r.finished === false ? " ✂" : ""}</span>
          <span class="components">${Object.entries(r.components || {}).map(([k, v]) => `${esc(k)}=${fmt(v)}`).join(" ")}</span>
          <span class="text" title="${r.masked ? "masked out of the loss" : ""}">${esc(r.text)}</span></div>`).join("") + "</div>";
    }
  }
  $("samples").innerHTML = `<p class="hint">${total} response(s) match${shown < total ? `, newest ${shown} shown` : ""}</p>` + html;
}

function render() {
  renderRuns();
  renderCharts();
  renderLatest();
  renderSamples();
}

$("smoothing").addEventListener("input", (e) => {
  state.smoothing = Number(e.target.value);
  $("smoothing-value").textContent = state.smoothing.toFixed(2);
  renderCharts();
});
$("metric-filter").addEventListener("input", () => { renderCharts(); renderLatest(); });
$("sample-filters").addEventListener("input", renderSamples);
// A link can preselect metrics: view/#filter=reward,entropy
const hashFilter = new URLSearchParams(location.hash.slice(1)).get("filter");
if (hashFilter) $("metric-filter").value = hashFilter;
poll();
setInterval(poll, POLL_MS);
