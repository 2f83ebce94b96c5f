"""The HTML page of `migrator serve`: one self-contained document, no external assets.

Every 2 s it fetches /api/status, /api/history, /api/verify and /api/studies and redraws
one card per job: progress bar, counts by state (rows in flight split into transferring
and queued), the selection and the studies complete, partial, pending and failed, rate,
ETA, a per-minute rate chart (inline SVG, the per-second rates of /api/history), the
verification results, the top error reasons and the workers. Text from the ledger is
inserted with textContent only, since error messages come from remote servers.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>migrator</title>
<style>
  :root { --bg:#f4f5f7; --card:#fff; --ink:#1d2430; --mute:#667085; --line:#e3e6ea;
          --sent:#2e9e5b; --pending:#9aa4b2; --in_flight:#3b82f6;
          --transferring:#3b82f6; --queued:#93c5fd; --abandoned:#475569; --failed:#d64545;
          --rejected:#e07b24; --skipped:#b49ad6; --vanished:#8d6e63; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
         background:var(--bg); color:var(--ink); }
  header { display:flex; align-items:baseline; gap:16px; padding:14px 24px;
           background:#1d2430; color:#fff; }
  header h1 { font-size:18px; margin:0; font-weight:600; }
  header .meta { color:#b8c0cc; font-size:13px; }
  header .meta.stale { color:#ffb4a8; }
  main { padding:20px 24px; display:grid; gap:20px; max-width:1200px; }
  .card { background:var(--card); border:1px solid var(--line); border-radius:8px;
          padding:16px 20px; }
  .title { display:flex; justify-content:space-between; align-items:baseline; gap:12px; }
  .title h2 { margin:0; font-size:16px; word-break:break-all; }
  .route { color:var(--mute); font-size:12px; word-break:break-all; }
  .bar { height:14px; background:#eceef1; border-radius:7px; overflow:hidden;
         display:flex; margin:12px 0 6px; }
  .bar span { display:block; height:100%; }
  .figures { display:flex; flex-wrap:wrap; gap:6px 22px; margin:6px 0 10px; }
  .fig .v { font-size:20px; font-weight:600; font-variant-numeric:tabular-nums; }
  .fig .k { color:var(--mute); font-size:12px; }
  .counts { display:flex; flex-wrap:wrap; gap:6px; margin:4px 0 12px; }
  .chip { border:1px solid var(--line); border-radius:12px; padding:1px 10px;
          font-size:12px; font-variant-numeric:tabular-nums; }
  .chip i { display:inline-block; width:8px; height:8px; border-radius:4px;
            margin-right:6px; }
  .chip.zero { opacity:.45; }
  h3 { font-size:12px; text-transform:uppercase; letter-spacing:.04em; color:var(--mute);
       margin:14px 0 6px; font-weight:600; }
  svg.chart { width:100%; height:110px; display:block; border-bottom:1px solid #c9ced6; }
  .axis { display:flex; justify-content:space-between; color:var(--mute); font-size:11px;
          margin-top:2px; }
  table { border-collapse:collapse; width:100%; font-size:13px; }
  td { padding:3px 8px 3px 0; border-top:1px solid var(--line); vertical-align:top; }
  td.n { text-align:right; font-variant-numeric:tabular-nums; width:80px; white-space:nowrap; }
  td.s { width:80px; color:var(--mute); }
  .none { color:var(--mute); font-size:13px; }
  #empty { color:var(--mute); }
</style>
</head>
<body>
<header><h1>migrator</h1><span class="meta" id="updated">loading&hellip;</span></header>
<main id="jobs"><p id="empty">Loading&hellip;</p></main>
<script>
"use strict";
const STATES = ["sent","in_flight","pending","failed","rejected","skipped","vanished"];
// Rows in flight: sent now, leased ahead (waiting in a worker), or held by a gone worker.
const FLIGHT = ["transferring","queued","abandoned"];
const POLL_MS = 2000;
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};
const fmt = n => Number(n).toLocaleString("en-US");
function bytes(n) {
  const u = ["B","KiB","MiB","GiB","TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n.toFixed(0)) + " " + u[i];
}
function duration(s) {
  if (s === null || s === undefined) return "\\u2013";
  s = Math.round(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  const h = Math.floor(s / 3600);
  return h + " h " + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + " min";
}
function figure(key, value, label) {
  const f = el("div", "fig"); f.dataset.key = key;
  f.append(el("div", "v", value), el("div", "k", label));
  return f;
}
function chart(points, rates, peak) {
  // Bars in a stretched SVG; the labels are HTML so that the stretch does not warp them.
  const NS = "http://www.w3.org/2000/svg", W = 600, H = 110;
  const wrap = el("div", "chartwrap");
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`); svg.setAttribute("class", "chart");
  svg.setAttribute("preserveAspectRatio", "none");
  // Per-second rates from the server: the current minute over its elapsed seconds, so
  // the peak is comparable with the rate shown above the chart.
  const top = Math.max(peak, 0.001);
  const bw = W / Math.max(points.length, 1);
  for (const y of [0.25, 0.5, 0.75]) {
    const g = document.createElementNS(NS, "line");
    g.setAttribute("x1", 0); g.setAttribute("x2", W);
    g.setAttribute("y1", H * y); g.setAttribute("y2", H * y);
    g.setAttribute("stroke", "#eceef1"); g.setAttribute("stroke-width", 1);
    svg.append(g);
  }
  rates.forEach((r, i) => {
    const h = H * r / top, rect = document.createElementNS(NS, "rect");
    rect.setAttribute("x", i * bw + 0.5); rect.setAttribute("width", Math.max(bw - 1, 1));
    rect.setAttribute("y", H - h); rect.setAttribute("height", h);
    rect.setAttribute("fill", "var(--sent)");
    const t = document.createElementNS(NS, "title");
    t.textContent = new Date(points[i][0] * 1000).toLocaleTimeString() + ": " +
      r.toFixed(1) + "/s";
    rect.append(t); svg.append(rect);
  });
  const axis = el("div", "axis");
  axis.append(el("span", "", "\u2212" + points.length + " min"),
    el("span", "peak", "peak " + peak.toFixed(1) + "/s"), el("span", "", "now"));
  wrap.append(svg, axis);
  return wrap;
}
function card(job, hist, verified, st) {
  const c = el("section", "card"); c.dataset.job = job.name;
  const title = el("div", "title");
  title.append(el("h2", "", job.name), el("span", "route", job.kind + ": " + job.source +
    " \\u2192 " + job.target));
  c.append(title);
  const bar = el("div", "bar"), total = Math.max(job.total, 1);
  for (const s of ["sent","skipped","rejected","failed","vanished", ...FLIGHT]) {
    const n = (s in job.counts ? job.counts[s] : job[s]) || 0; if (!n) continue;
    const seg = el("span"); seg.style.width = (100 * n / total) + "%";
    seg.style.background = `var(--${s})`; seg.title = s + " " + fmt(n); bar.append(seg);
  }
  c.append(bar);
  const pct = job.total ? (100 * job.done / job.total) : 0;
  const figs = el("div", "figures");
  figs.append(
    figure("progress", pct.toFixed(1) + " %", fmt(job.done) + " of " + fmt(job.total) +
      " done" + (job.listing_done ? "" : " (listing\\u2026)")),
    figure("rate", job.rate.toFixed(1) + "/s", bytes(job.bytes_rate) + "/s, last 5 min"),
    figure("eta", duration(job.eta_seconds), "ETA, " + fmt(job.remaining) + " to go"),
    figure("bytes", bytes(job.bytes_sent), "sent"));
  c.append(figs);
  const counts = el("div", "counts");
  for (const s of STATES) {
    const n = job.counts[s] || 0;
    const chip = el("span", "chip" + (n ? "" : " zero"));
    const dot = el("i"); dot.style.background = `var(--${s})`;
    const v = el("span", "count", fmt(n)); v.dataset.state = s;
    chip.append(dot, s.replace("_", " ") + " ", v); counts.append(chip);
    if (s !== "in_flight") continue;
    for (const f of FLIGHT) {
      const m = job[f] || 0;
      if (f === "abandoned" && !m) continue;
      const sub = el("span", "chip" + (m ? "" : " zero"));
      const d = el("i"); d.style.background = `var(--${f})`;
      const w = el("span", "count", fmt(m)); w.dataset.flight = f;
      sub.append(d, f + " ", w); counts.append(sub);
    }
  }
  c.append(counts);
  if (job.selection && job.selection !== "everything")
    c.append(el("p", "route", "selection: " + job.selection));
  if (st && st.total) {
    // Whole studies on the target, and since when everything is there.
    c.append(el("h3", "", "Studies (" + job.order + " first)"));
    const v = el("div", "counts");
    for (const k of ["complete","partial","pending","failed"]) {
      const chip = el("span", "chip" + (st[k] ? "" : " zero"));
      const n = el("span", "count", fmt(st[k] || 0)); n.dataset.studies = k;
      chip.append(k + " ", n); v.append(chip);
    }
    c.append(v);
    if (st.complete_since)
      c.append(el("p", "route", "everything since " + st.complete_since + " is on the target"));
    else if (st.latest_complete)
      c.append(el("p", "route", "most recent complete study: " + st.latest_complete));
  }
  c.append(el("h3", "", "Rate, instances per second (per minute)"));
  c.append(hist && hist.points.length ? chart(hist.points, hist.rates, hist.peak)
    : el("p", "none", "no history"));
  if (verified) {
    // As `migrator verify` counts them: a row sent again since its check is unverified.
    c.append(el("h3", "", "Verification"));
    const v = el("div", "counts");
    for (const r of ["match","missing","differ","error","unverified"]) {
      const chip = el("span", "chip" + (verified[r] ? "" : " zero"));
      const n = el("span", "count", fmt(verified[r] || 0)); n.dataset.verify = r;
      chip.append(r + " ", n); v.append(chip);
    }
    c.append(v);
  }
  c.append(el("h3", "", "Top error reasons"));
  if (job.top_errors.length) {
    const t = el("table");
    for (const e of job.top_errors) {
      const tr = el("tr");
      tr.append(el("td", "n", fmt(e.count)), el("td", "s", e.state), el("td", "", e.reason));
      t.append(tr);
    }
    c.append(t);
  } else c.append(el("p", "none", "none"));
  if (job.deleted && job.deleted.on_source) {
    // A mirror's instances deleted on its source after they were sent.
    c.append(el("p", "", "Deleted on the source after they were sent: " +
      fmt(job.deleted.on_source) + " (" + fmt(job.deleted.on_target) +
      " deleted on the target too)"));
  }
  if (job.workers.length) {
    c.append(el("h3", "", "Workers"));
    const t = el("table");
    for (const w of job.workers) {
      const tr = el("tr");
      tr.append(el("td", "", w.owner + " (" + w.command + ")"),
        el("td", "n", fmt(w.transferring) + " transferring"),
        el("td", "n", fmt(w.queued) + " queued"),
        el("td", "n", w.concurrency ? "concurrency " + w.concurrency : ""),
        el("td", "n", fmt(w.sent) + " sent"));
      t.append(tr);
    }
    c.append(t);
  }
  return c;
}
let okAt = 0;
async function refresh() {
  try {
    const get = u => fetch(u, {cache: "no-store"}).then(r => {
      if (!r.ok) throw new Error(u + ": HTTP " + r.status); return r.json(); });
    const [status, hist, ver, studies] = await Promise.all(
      [get("/api/status"), get("/api/history?minutes=60"), get("/api/verify"),
       get("/api/studies")]);
    const histories = Object.fromEntries(hist.jobs.map(j => [j.name, j]));
    // Shown once a job was verified (rows sent since then count as unverified).
    const verified = Object.fromEntries(ver.jobs.filter(j => j.pass_started !== null)
      .map(j => [j.name, j.results]));
    const main = document.getElementById("jobs");
    const cards = status.jobs.map(
      j => card(j, histories[j.name], verified[j.name], studies.jobs[j.name]));
    const none = el("p", "", "No jobs yet: this page fills in when the first job starts.");
    none.id = "empty";
    main.replaceChildren(...(cards.length ? cards : [none]));
    okAt = Date.now();
    const u = document.getElementById("updated");
    u.className = "meta"; u.textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  } catch (err) {
    const u = document.getElementById("updated");
    u.className = "meta stale";
    u.textContent = "cannot refresh (" + err.message + ")" +
      (okAt ? "; last update " + new Date(okAt).toLocaleTimeString() : "");
  } finally {
    setTimeout(refresh, POLL_MS);
  }
}
refresh();
</script>
</body>
</html>
"""
