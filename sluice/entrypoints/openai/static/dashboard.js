// sluice dashboard: polls /dashboard/stats and draws line charts on plain canvases (no library, no network).
"use strict";
const POLL_MS = 2000;
const COLORS = { blue: "#4ea1ff", orange: "#ffa94d", green: "#51cf66", red: "#ff6b6b", violet: "#b197fc" };
const $ = (id) => document.getElementById(id);

function fmt(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (Math.abs(value) >= 1e6) return (value / 1e6).toFixed(digits) + "M";
  if (Math.abs(value) >= 1e4) return (value / 1e3).toFixed(digits) + "k";
  return Number.isInteger(value) ? String(value) : value.toFixed(digits);
}
function fmtSeconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 1 ? (value * 1000).toFixed(0) + " ms" : value.toFixed(2) + " s";
}
function pct(value) { return value === null || value === undefined ? "–" : (100 * value).toFixed(1) + "%"; }

// One line chart: series = [{label, color, values}], x = epoch seconds; null values leave gaps.
function drawChart(canvas, t, series, opts = {}) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, w, h);
  const pad = { l: 52, r: 10, t: 22, b: 22 };
  const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
  let ymax = opts.ymax || 0;
  for (const s of series) for (const v of s.values) if (v !== null && v > ymax) ymax = v;
  if (!opts.ymax) ymax = ymax > 0 ? niceCeil(ymax * 1.1) : 1;
  const now = t.length ? t[t.length - 1] : Date.now() / 1000;
  const span = Math.max(60, t.length ? now - t[0] : 60);
  const x = (ts) => pad.l + pw * (1 - (now - ts) / span);
  const y = (v) => pad.t + ph * (1 - v / ymax);
  ctx.font = "11px system-ui, 'Liberation Sans', sans-serif";
  ctx.strokeStyle = "#263241"; ctx.fillStyle = "#8b9aab"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = ymax * i / 4, yy = Math.round(y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(w - pad.r, yy); ctx.stroke();
    ctx.textAlign = "right"; ctx.fillText(opts.yfmt ? opts.yfmt(v) : fmt(v, 1), pad.l - 6, yy + 4);
  }
  ctx.textAlign = "center";
  for (let i = 0; i <= 4; i++) {
    const ago = span * i / 4;
    ctx.fillText(i === 0 ? "now" : "-" + fmtAgo(ago), x(now - ago), h - 6);
  }
  for (const s of series) {
    ctx.strokeStyle = s.color; ctx.lineWidth = 2; ctx.beginPath();
    let pen = false;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      if (pen) ctx.lineTo(x(t[i]), y(v)); else { ctx.moveTo(x(t[i]), y(v)); pen = true; }
    });
    ctx.stroke();
  }
  let lx = pad.l;
  ctx.textAlign = "left";
  for (const s of series) {
    ctx.fillStyle = s.color; ctx.fillRect(lx, 6, 10, 10);
    ctx.fillStyle = "#e6edf3"; ctx.fillText(s.label, lx + 14, 15);
    lx += ctx.measureText(s.label).width + 30;
  }
  canvas.dataset.points = String(series.reduce((n, s) => n + s.values.filter((v) => v !== null).length, 0));
}
function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
function fmtAgo(s) { return s >= 60 ? (s / 60).toFixed(s % 60 ? 1 : 0) + " min" : Math.round(s) + " s"; }

function render(stats) {
  const s = stats.series, c = stats.current, tot = stats.totals, eng = stats.engine || {};
  $("model").textContent = eng.model ? `${eng.model} · ${eng.device || ""} · sluice ${eng.version || ""}` : "";
  $("tile-running").textContent = fmt(c.running, 0);
  $("tile-waiting").textContent = fmt(c.waiting, 0);
  const wr = c.waiting_by_reason || {};
  $("tile-waiting-reason").textContent = `capacity ${fmt(wr.capacity || 0, 0)} · deferred ${fmt(wr.deferred || 0, 0)}`;
  $("tile-kv").textContent = pct(c.kv_cache_usage);
  $("tile-kv-bar").style.width = (100 * (c.kv_cache_usage || 0)).toFixed(1) + "%";
  $("tile-hit").textContent = pct(c.prefix_cache_hit_rate);
  const last = (arr) => (arr && arr.length ? arr[arr.length - 1] : null);
  $("tile-gen").textContent = fmt(last(s.generation_tokens_per_s));
  $("tile-prompt").textContent = fmt(last(s.prompt_tokens_per_s));
  $("tile-finished").textContent = fmt(tot.requests_finished, 0);
  $("tile-finished-reason").textContent = Object.entries(tot.finished_by_reason || {})
    .map(([k, v]) => `${k} ${fmt(v, 0)}`).join(" · ");
  $("tile-preempt").textContent = fmt(tot.preemptions, 0);
  const pctSeries = (arr) => arr.map((v) => (v === null ? null : 100 * v));
  drawChart($("chart-requests"), s.t, [
    { label: "running", color: COLORS.blue, values: s.running },
    { label: "waiting", color: COLORS.orange, values: s.waiting }]);
  drawChart($("chart-kv"), s.t, [
    { label: "KV cache used", color: COLORS.violet, values: pctSeries(s.kv_cache_usage) },
    { label: "prefix hit rate", color: COLORS.green, values: pctSeries(s.prefix_cache_hit_rate) }],
    { ymax: 100, yfmt: (v) => v.toFixed(0) + "%" });
  drawChart($("chart-throughput"), s.t, [
    { label: "generation", color: COLORS.blue, values: s.generation_tokens_per_s },
    { label: "prompt", color: COLORS.orange, values: s.prompt_tokens_per_s }]);
  drawChart($("chart-preempt"), s.t, [
    { label: "preemptions/s", color: COLORS.red, values: s.preemptions_per_s },
    { label: "finished/s", color: COLORS.green, values: s.requests_per_s }]);
  for (const key of ["ttft", "itl", "e2e"]) {
    drawChart($("chart-" + key), s.t, [
      { label: "p50", color: COLORS.blue, values: s[key + "_p50"] },
      { label: "p99", color: COLORS.red, values: s[key + "_p99"] }], { yfmt: fmtSeconds });
  }
  $("summary-window").textContent = String(Math.round((stats.summary_window_s || 300) / 60));
  const names = { ttft: "Time to first token", itl: "Inter-token latency", e2e: "End-to-end", queue: "Queue time" };
  $("latency-table").tBodies[0].innerHTML = Object.entries(stats.latency).map(([k, v]) =>
    `<tr><td>${names[k] || k}</td><td>${fmtSeconds(v.p50)}</td><td>${fmtSeconds(v.p90)}</td>` +
    `<td>${fmtSeconds(v.p99)}</td><td>${fmt(v.count, 0)}</td></tr>`).join("");
  const startup = Object.entries(eng.startup_seconds || {}).map(([k, v]) => `${k} ${v.toFixed(2)} s`).join(" · ");
  $("engine-info").innerHTML = `KV cache: ${fmt(eng.num_kv_blocks, 0)} blocks × ${eng.block_size} tokens · ` +
    `max_num_seqs ${eng.max_num_seqs} · max_model_len ${eng.max_model_len}<br>Start-up: ${startup || "–"}`;
}

let failingSince = null;
function setStatus(ok, message) {
  const status = $("status"), banner = $("banner");
  status.dataset.state = ok ? "live" : "down";
  status.textContent = ok ? "live · " + new Date().toLocaleTimeString() : "unreachable";
  banner.hidden = ok;
  if (!ok) banner.textContent = message;
}

async function poll() {
  try {
    const response = await fetch("dashboard/stats",  // relative: works under --root-path behind a proxy
      { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    failingSince = null;
    setStatus(true);
  } catch (err) {
    failingSince = failingSince || new Date();
    setStatus(false, `The server is not answering (since ${failingSince.toLocaleTimeString()}: ${err.message}). ` +
      "The numbers below are the last ones received; retrying every 2 s.");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}
poll();
