// The relay's web console, its overview page: loaded after app.js, whose helpers
// (el, api, say, guarded, need, ...) it calls. Everything shown is built with
// textContent, never innerHTML.
"use strict";

// --- the overview ---------------------------------------------------------------

// The log's outcomes, bottom of the stack first, and their colours.
const OUTCOMES = [["delivered", "#2e7d32"], ["partial", "#9ccc65"], ["deferred", "#f9a825"], ["refused", "#c62828"]];
let chart = null;

function ms(value) {
  return value === null ? "> 60 s" : value >= 1000 ? `≤ ${value / 1000} s` : `≤ ${value} ms`;
}

function percent(part, whole) {
  return whole ? `${(100 * part / whole).toFixed(1)}%` : "-";
}

async function loadOverview() {
  const o = await api("GET", "/stats/overview?window=" + q($("overview-window").value));
  drawChart(o);
  const total = Object.values(o.totals).reduce((a, b) => a + b, 0);
  const row = (cells, data) => {
    const tr = el("tr", {}, ...cells.map((c) => el("td", {}, c)));
    Object.assign(tr.dataset, data || {});
    return tr;
  };
  $("overview-totals").tBodies[0].replaceChildren(
    ...OUTCOMES.map(([name]) => row([name, o.totals[name] || 0, percent(o.totals[name] || 0, total)], { outcome: name })),
    row(["all", total, ""], { outcome: "all" }),
  );
  const refused = o.refusals.reduce((a, r) => a + r.messages, 0);
  $("overview-refusals").tBodies[0].replaceChildren(
    ...o.refusals.map((r) => row([r.outcome, `${r.code} ${r.enhanced}`, r.messages, percent(r.messages, refused)])),
  );
  $("overview-channels").tBodies[0].replaceChildren(
    ...o.channels.map((c) => row([c.channel, c.messages, `${c.errors} (${percent(c.errors, c.messages)})`,
      ms(c.p50_ms), ms(c.p90_ms), ms(c.p99_ms)], { channel: c.channel })),
  );
  const age = o.queue.oldest_age;
  $("overview-queue").tBodies[0].replaceChildren(
    row(["messages", o.queue.depth], { what: "depth" }),
    ...Object.entries(o.queue.states).map(([state, n]) => row([state, n])),
    row(["oldest", age === null ? "-" : `${age} s`], { what: "oldest" }),
  );
  $("overview-senders").tBodies[0].replaceChildren(...o.top_senders.map((s) => row([s.sender, s.messages])));
  $("overview-low").tBodies[0].replaceChildren(...o.low_balances.map((s) => row([s.address, s.balance])));
}

function drawChart(o) {
  const box = $("overview-chart");
  const times = Array.from({ length: o.buckets }, (_, i) => o.start + i * o.step);
  const raw = OUTCOMES.map(([name]) => o.series[name] || new Array(o.buckets).fill(0));
  // Stacked: each series is the sum of itself and those below it, drawn top first so
  // the lower ones paint over it; the legend shows each outcome's own count.
  const stacked = raw.map((_, k) => times.map((__, i) => raw.slice(0, k + 1).reduce((a, s) => a + s[i], 0)));
  const order = OUTCOMES.map((_, k) => k).reverse();
  const bars = uPlot.paths.bars({ size: [0.9, 40] });
  const options = {
    width: Math.max(300, box.clientWidth),
    height: 260,
    title: `Messages per ${o.step === 60 ? "minute" : "hour"} (UTC)`,
    series: [{}, ...order.map((k) => ({
      label: OUTCOMES[k][0],
      stroke: OUTCOMES[k][1],
      fill: OUTCOMES[k][1],
      paths: bars,
      points: { show: false },
      value: (u, v, si, i) => (i === null || i === undefined ? "-" : raw[k][i]),
    }))],
    axes: [{}, { size: 50 }],
    scales: { x: { time: true } },
  };
  const data = [times, ...order.map((k) => stacked[k])];
  if (chart) chart.destroy();
  box.replaceChildren();
  chart = new uPlot(options, data, box);
}
