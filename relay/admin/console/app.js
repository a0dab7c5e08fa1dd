// The relay's web console: the admin API (/api/v1), as a script would call it.
// Everything shown is built with textContent, never innerHTML: addresses,
// Message-IDs and replies come from outside and may hold markup.
"use strict";

const TOKEN_KEY = "relay-admin-token";
const $ = (id) => document.getElementById(id);

function meta(name) {
  const tag = document.querySelector(`meta[name="${name}"]`);
  return tag ? tag.content : "";
}

// el("td", {className: "x"}, "text", otherNode): a node with properties and children.
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z" : "-";
}

// The status line of the view that is showing: each view has its own, so a message
// never outlives its page; a success fades after a few seconds, an error stays.
let current = "signin";
let fading = null;

function say(text, isError) {
  const status = $("status-" + current);
  clearTimeout(fading);
  status.textContent = text;
  status.className = "status" + (isError ? " error" : "");
  if (!isError) {
    fading = setTimeout(() => {
      status.classList.add("faded");
      fading = setTimeout(() => { status.textContent = ""; status.className = "status"; }, 1000);
    }, 5000);
  }
}

// A form's check before it sends: throws the message the status line shows.
function need(ok, message) {
  if (!ok) throw new Error(message);
}

const looksLikeAddress = (text) => /^\S(.*\S)?@[^\s@]+$/.test(text) && text.length <= 320;
const looksLikeDomain = (text) => /^(?!-)[a-z0-9-]{1,63}(\.(?!-)[a-z0-9-]{1,63})+$/i.test(text);

// A button that acts on the second press: the first asks (keyboard-usable, no dialog).
function confirming(label, action) {
  const button = el("button", { type: "button", className: "danger" }, label);
  let armed = false;
  button.addEventListener("click", guarded(async () => {
    if (!armed) {
      armed = true;
      button.textContent = "Really " + label.toLowerCase() + "?";
      setTimeout(() => { armed = false; button.textContent = label; }, 4000);
      return;
    }
    await action();
  }));
  return button;
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + sessionStorage.getItem(TOKEN_KEY) };
  const init = { method, headers, credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch("/api/v1" + path, init);
  const value = await response.json().catch(() => ({}));
  if (!response.ok) {
    const err = value.error || { code: "http_" + response.status, message: response.statusText };
    if (response.status === 401) signOut();
    throw new ApiError(response.status, err.code, err.message);
  }
  return value;
}

const q = encodeURIComponent;

// Run an action; show its error in the status line instead of throwing.
function guarded(action) {
  return async (event) => {
    if (event) event.preventDefault();
    try {
      await action(event);
    } catch (err) {
      say(err.message || String(err), true);
    }
  };
}

// --- views ----------------------------------------------------------------------

const views = ["signin", "overview", "accounts", "tokens", "senders", "limits", "lists", "queue", "events", "log"];

async function show(view) {
  if (view !== "log") dropLink();
  current = view;
  clearTimeout(fading);
  for (const name of views) {
    $("view-" + name).hidden = name !== view;
    $("status-" + name).textContent = "";
  }
  for (const button of document.querySelectorAll("nav button[data-view]")) {
    button.classList.toggle("active", button.dataset.view === view);
  }
  $("nav").hidden = view === "signin";
  const load = {
    overview: loadOverview, accounts: loadAccountsView, tokens: loadAccounts,
    senders: () => loadSenders(false), limits: loadLimits, lists: loadList, queue: loadQueue,
    events: loadEventsView, log: loadLog,
  };
  if (load[view]) await guarded(load[view])();
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  current = "signin";
  for (const name of views) $("view-" + name).hidden = name !== "signin";
  $("nav").hidden = true;
}

async function signIn() {
  const token = $("token-input").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token-input").value = "";
  await api("GET", "/accounts");
  if (!(await openLink())) await show("overview");
  say("Signed in.");
}

// --- tokens ---------------------------------------------------------------------

async function loadAccounts() {
  const { accounts } = await api("GET", "/accounts");
  const select = $("account-select");
  const chosen = select.value;
  select.replaceChildren(...accounts.map((a) => el("option", { value: a.name }, a.name)));
  if (chosen && accounts.some((a) => a.name === chosen)) select.value = chosen;
  await loadTokens();
}

async function loadTokens() {
  const account = $("account-select").value;
  const body = $("tokens-table").tBodies[0];
  if (!account) {
    body.replaceChildren();
    return;
  }
  const { tokens } = await api("GET", `/accounts/${q(account)}/tokens`);
  body.replaceChildren(
    ...tokens.map((t) => {
      const revoke = el("button", { type: "button", className: "revoke" }, "Revoke");
      revoke.disabled = t.status !== "active";
      revoke.addEventListener(
        "click",
        guarded(async () => {
          await api("DELETE", `/tokens/${q(t.id)}`);
          say(`Revoked ${t.id}.`);
          await loadTokens();
        }),
      );
      const edit = el("button", { type: "button", className: "edit" }, "Rules");
      edit.addEventListener("click", () => editRules(t));
      const row = el("tr", {}, el("td", {}, t.id), el("td", {}, t.name), el("td", {}, t.role),
        el("td", { className: "status" }, t.status), el("td", {}, when(t.created)),
        el("td", {}, when(t.expires)), el("td", { className: "rules" }, rulesText(t)),
        el("td", {}, edit, " ", revoke));
      row.dataset.id = t.id;
      return row;
    }),
  );
}

// A token's rules: each list as the API names it, and the input that edits it.
const RULES = [
  ["senders", "senders", "senders"],
  ["networks", "networks", "networks"],
  ["rates", "rates", "messages"],
  ["rcpt_rates", "rcpt-rates", "recipients"],
];

function words(text) {
  return text.split(/[\s,]+/).filter(Boolean);
}

function rulesText(t) {
  return RULES.filter(([key]) => t[key].length)
    .map(([key, , label]) => `${label}: ${t[key].join(" ")}`)
    .join("; ") || "-";
}

function editRules(t) {
  $("rules-id").textContent = t.id;
  for (const [key, input] of RULES) $("rules-" + input).value = t[key].join(" ");
  $("rules-form").hidden = false;
}

async function saveRules() {
  const id = $("rules-id").textContent;
  const body = {};
  for (const [key, input] of RULES) body[key] = words($("rules-" + input).value);
  await api("PATCH", `/tokens/${q(id)}`, body);
  $("rules-form").hidden = true;
  say(`Saved the rules of ${id}.`);
  await loadTokens();
}

async function createToken() {
  const account = $("account-select").value;
  const body = { name: $("token-name").value };
  const days = $("token-expires").value;
  if (days) body.expires_in_days = Number(days);
  for (const [key, input] of RULES) {
    const values = words($("token-" + input).value);
    if (values.length) body[key] = values;
  }
  const created = await api("POST", `/accounts/${q(account)}/tokens`, body);
  $("new-token").textContent = created.token;
  $("client-host").textContent = meta("relay-smtp-host");
  $("client-port").textContent = meta("relay-smtp-port");
  $("new-token-box").hidden = false;
  say(`Created ${created.id} for ${account}.`);
  await loadTokens();
}

async function copyToken() {
  const text = $("new-token").textContent;
  try {
    await navigator.clipboard.writeText(text);
    say("Copied.");
  } catch {
    const range = document.createRange();
    range.selectNodeContents($("new-token"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    say("Selected: press Ctrl+C to copy.");
  }
}

// --- senders --------------------------------------------------------------------

let senderCursor = null;

async function loadSenders(more) {
  const params = new URLSearchParams({ prefix: $("sender-prefix").value.trim(), limit: "50" });
  if (more && senderCursor) params.set("cursor", senderCursor);
  const { senders, next_cursor } = await api("GET", "/senders?" + params);
  senderCursor = next_cursor;
  $("senders-more").hidden = !next_cursor;
  const rows = senders.map(senderRow);
  if (more) $("senders-table").tBodies[0].append(...rows);
  else $("senders-table").tBodies[0].replaceChildren(...rows);
}

function senderRow(s) {
  const amount = el("input", { type: "number", className: "amount", step: "1" });
  const topup = el("button", { type: "button", className: "topup" }, "Top up");
  const toggle = el("button", { type: "button", className: "toggle" }, s.enabled ? "Disable" : "Enable");
  const row = el("tr", {}, el("td", { className: "address" }, s.address),
    el("td", { className: "balance" }, s.balance),
    el("td", { className: "state" }, s.enabled ? "enabled" : "disabled"),
    el("td", {}, amount, topup), el("td", {}, toggle));
  row.dataset.address = s.address;
  const update = (value) => row.replaceWith(senderRow(value));
  topup.addEventListener(
    "click",
    guarded(async () => {
      const value = Number(amount.value);
      if (!Number.isInteger(value) || value === 0) throw new Error("Top up: a whole number, not 0.");
      update(await api("POST", `/senders/${q(s.address)}/topup`, { amount: value }));
      say(`Topped up ${s.address} by ${value}.`);
    }),
  );
  toggle.addEventListener(
    "click",
    guarded(async () => {
      update(await api("PATCH", `/senders/${q(s.address)}`, { enabled: !s.enabled }));
      say(`${s.enabled ? "Disabled" : "Enabled"} ${s.address}.`);
    }),
  );
  return row;
}

// --- limits ---------------------------------------------------------------------

async function loadLimits() {
  const [{ limits }, { accounts }] = await Promise.all([api("GET", "/limits"), api("GET", "/accounts")]);
  const of = (count, limit) => `${count} / ${limit === -1 ? "unlimited" : limit}`;
  $("limits-table").tBodies[0].replaceChildren(
    ...limits.map((l) => el("tr", {}, el("td", {}, l.scope), el("td", {}, of(l.daily_count, l.daily)),
      el("td", {}, l.daily_resets_at), el("td", {}, of(l.monthly_count, l.monthly)),
      el("td", {}, l.monthly_resets_at))),
  );
  fillAccounts($("limits-account"), accounts, el("option", { value: "" }, "the relay"));
}

function fillAccounts(select, accounts, ...first) {
  const chosen = select.value;
  select.replaceChildren(...first, ...accounts.map((a) => el("option", { value: a.name }, a.name)));
  if (accounts.some((a) => a.name === chosen)) select.value = chosen;
}

async function setLimits() {
  const body = {};
  for (const what of ["daily", "monthly"]) {
    const text = $("limits-" + what).value.trim();
    if (!text) continue;
    const value = Number(text);
    need(Number.isInteger(value) && value >= -1, `${what}: -1 (unlimited), 0 (blocks sending) or more.`);
    body[what] = value;
  }
  need(Object.keys(body).length, "Give a daily and/or a monthly limit.");
  const account = $("limits-account").value;
  if (account) body.account = account;
  await api("PUT", "/limits", body);
  await loadLimits();
  say(`Set the limits of ${account || "the relay"}.`);
}

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

// --- accounts and domains -------------------------------------------------------

let accountNames = [];

async function loadAccountsView() {
  const { accounts } = await api("GET", "/accounts");
  accountNames = accounts.map((a) => a.name);
  $("accounts-table").tBodies[0].replaceChildren(
    ...accounts.map((a) => {
      const pick = el("button", { type: "button", className: "domains" }, "Domains");
      pick.addEventListener("click", guarded(async () => {
        $("domain-account").value = a.name;
        await loadDomains();
      }));
      const toggle = el("button", { type: "button", className: "toggle" }, a.disabled ? "Enable" : "Disable");
      toggle.addEventListener("click", guarded(async () => {
        await api("POST", `/accounts/${q(a.name)}/${a.disabled ? "enable" : "disable"}`);
        await loadAccountsView();
        say(`${a.disabled ? "Enabled" : "Disabled"} the account ${a.name}.`);
      }));
      const remove = el("button", { type: "button", className: "danger delete" }, "Delete");
      remove.addEventListener("click", () => askDelete(a.name));
      const tr = el("tr", {}, el("td", {}, a.name), el("td", {}, when(a.created)),
        el("td", {}, a.queue || "relay's"),
        el("td", { className: "state" }, a.disabled ? `disabled since ${when(a.disabled)}` : "enabled"),
        el("td", { className: "actions" }, pick, " ", toggle, " ", remove));
      tr.dataset.account = a.name;
      return tr;
    }),
  );
  fillAccounts($("domain-account"), accounts);
  await loadDomains();
}

// Deleting asks for the account's name, typed: a second press is too easy for this.
function askDelete(name) {
  $("delete-name").textContent = name;
  $("delete-confirm").value = "";
  $("delete-form").hidden = false;
  $("delete-confirm").focus();
}

async function deleteAccount() {
  const name = $("delete-name").textContent;
  need($("delete-confirm").value.trim() === name, `Type ${name} exactly to delete it.`);
  const gone = await api("DELETE", `/accounts/${q(name)}`);
  $("delete-form").hidden = true;
  await loadAccountsView();
  say(`Deleted the account ${name}: ${gone.tokens.length} token(s), ${gone.domains.length} domain(s),` +
    ` ${gone.webhooks} webhook(s), ${gone.suppressions} suppression(s).`);
}

async function loadDomains() {
  const account = $("domain-account").value;
  const body = $("domains-table").tBodies[0];
  if (!account) return body.replaceChildren();
  const { domains } = await api("GET", `/accounts/${q(account)}/domains`);
  body.replaceChildren(
    ...domains.map((d) => {
      const name = typeof d === "string" ? d : d.domain;
      const others = accountNames.filter((n) => n !== account);
      const target = el("select", { className: "move-to", ariaLabel: `Move ${name} to the account` },
        ...others.map((n) => el("option", { value: n }, n)));
      const move = el("button", { type: "button", className: "move" }, "Move");
      target.disabled = move.disabled = !others.length;
      move.addEventListener("click", guarded(async () => {
        const to = target.value;
        await api("POST", `/domains/${q(name)}/move`, { account: to });
        await loadDomains();
        say(`Moved ${name} from ${account} to ${to}.`);
      }));
      const tr = el("tr", {}, el("td", {}, name), el("td", {}, target, " ", move), el("td", {}, confirming("Remove", async () => {
        await api("DELETE", `/accounts/${q(account)}/domains/${q(name)}`);
        await loadDomains();
        say(`Removed ${name} from ${account}.`);
      })));
      tr.dataset.domain = name;
      return tr;
    }),
  );
}

async function createAccount() {
  const name = $("account-name").value.trim();
  need(name && name.length <= 100, "Account: a name of 1 to 100 characters.");
  await api("POST", "/accounts", { name });
  $("account-name").value = "";
  await loadAccountsView();
  $("domain-account").value = name;
  await loadDomains();
  say(`Created the account ${name}.`);
}

async function addDomain() {
  const account = $("domain-account").value;
  const domain = $("domain-name").value.trim().toLowerCase();
  need(account, "Choose an account first.");
  need(looksLikeDomain(domain), "Domain: a name such as example.com.");
  await api("POST", `/accounts/${q(account)}/domains`, { domain });
  $("domain-name").value = "";
  await loadDomains();
  say(`Added ${domain} to ${account}.`);
}

// --- the verified and no-limit lists --------------------------------------------

async function loadList() {
  const kind = $("list-kind").value;
  const { addresses } = await api("GET", "/" + kind);
  $("list-table").tBodies[0].replaceChildren(
    ...addresses.map((a) => {
      const address = typeof a === "string" ? a : a.address;
      const tr = el("tr", {}, el("td", {}, address), el("td", {}, confirming("Remove", async () => {
        await api("DELETE", `/${kind}/${q(address)}`);
        await loadList();
        say(`Removed ${address}.`);
      })));
      tr.dataset.address = address;
      return tr;
    }),
  );
}

async function addToList() {
  const kind = $("list-kind").value;
  const address = $("list-address").value.trim();
  need(looksLikeAddress(address), "Address: an email address such as someone@example.com.");
  await api("POST", "/" + kind, { address });
  $("list-address").value = "";
  await loadList();
  say(`Added ${address}.`);
}

// --- the queue ------------------------------------------------------------------

function summary(list) {
  const items = list || [];
  return items.length > 1 ? `${items[0]} + ${items.length - 1} more` : items[0] || "-";
}

async function loadQueue() {
  const params = new URLSearchParams();
  for (const name of ["state", "account"]) {
    const value = $("queue-" + name).value;
    if (value) params.set(name, value);
  }
  const [{ messages }, { accounts }] = await Promise.all([api("GET", "/queue?" + params), api("GET", "/accounts")]);
  fillAccounts($("queue-account"), accounts, el("option", { value: "" }, "any"));
  $("queue-table").tBodies[0].replaceChildren(
    ...messages.map((m) => {
      const act = (action) => {
        const button = el("button", { type: "button", className: action }, action[0].toUpperCase() + action.slice(1));
        button.addEventListener("click", guarded(async () => {
          await api("POST", `/queue/${m.id}/${action}`);
          await loadQueue();
          say(`${action}: message ${m.id}.`);
        }));
        return button;
      };
      const cancel = confirming("Cancel", async () => {
        const done = await api("POST", `/queue/${m.id}/cancel`);
        await loadQueue();
        say(`Cancelled message ${m.id}; refunded ${done.refunded}.`);
      });
      const recipients = (m.recipients || []).map((r) => (typeof r === "string" ? r : r.address));
      const tr = el("tr", {}, el("td", {}, m.id), el("td", {}, when(m.created)), el("td", {}, m.account),
        el("td", { className: "clip", title: m.sender }, m.sender), el("td", { title: recipients.join(", ") }, summary(recipients)),
        el("td", { className: "state" }, m.state), el("td", {}, m.tries), el("td", { className: "next" }, when(m.next_try)),
        el("td", {}, m.last_code ? `${m.last_code} ${m.last_text || ""}` : "-"),
        el("td", { className: "actions" }, act("retry"), " ", m.state === "held" ? act("release") : act("hold"), " ", cancel));
      tr.dataset.id = m.id;
      return tr;
    }),
  );
}

// --- suppressions and webhooks ----------------------------------------------------

async function loadEventsView() {
  const { accounts } = await api("GET", "/accounts");
  fillAccounts($("events-account"), accounts);
  await loadEvents();
}

const rowsOf = (value, key) => (Array.isArray(value) ? value : value[key] || []);

async function loadEvents() {
  const account = $("events-account").value;
  if (!account) return;
  const base = `/accounts/${q(account)}`;
  const [suppressions, webhooks] = await Promise.all([api("GET", base + "/suppressions"), api("GET", base + "/webhooks")]);
  $("suppressions-table").tBodies[0].replaceChildren(
    ...rowsOf(suppressions, "suppressions").map((s) => {
      const tr = el("tr", {}, el("td", {}, s.address), el("td", {}, s.reason), el("td", {}, s.source),
        el("td", {}, when(s.created)), el("td", {}, s.expires ? when(s.expires) : "never"),
        el("td", {}, confirming("Remove", async () => {
          await api("DELETE", `${base}/suppressions/${q(s.address)}`);
          await loadEvents();
          say(`Removed ${s.address} from the suppressions.`);
        })));
      tr.dataset.address = s.address;
      return tr;
    }),
  );
  $("webhooks-table").tBodies[0].replaceChildren(
    ...rowsOf(webhooks, "webhooks").map((w) => {
      const test = el("button", { type: "button", className: "test" }, "Send a test");
      test.addEventListener("click", guarded(async () => {
        await api("POST", `${base}/webhooks/${q(w.id)}/test`);
        say(`Queued a test event for ${w.id}; its attempts show under Attempts.`);
      }));
      const history = el("button", { type: "button", className: "attempts" }, "Attempts");
      history.addEventListener("click", guarded(() => toggleAttempts(tr, base, w)));
      const tr = el("tr", {}, el("td", {}, w.id), el("td", { className: "clip", title: w.url }, w.url),
        el("td", {}, w.events.length ? w.events.join(" ") : "all"),
        el("td", {}, w.enabled ? (w.failing_since ? `failing since ${when(w.failing_since)}` : "enabled") : "disabled"),
        el("td", { className: "actions" }, test, " ", history, " ", confirming("Remove", async () => {
          await api("DELETE", `${base}/webhooks/${q(w.id)}`);
          await loadEvents();
          say(`Removed the webhook ${w.id}.`);
        })));
      tr.dataset.id = w.id;
      return tr;
    }),
  );
}

// An endpoint's recent attempts, opened under its row: the answer is the receiver's
// text (its first 1 KiB), shown as text in a <pre>, never as HTML.
async function toggleAttempts(tr, base, w, keep) {
  const next = tr.nextElementSibling;
  if (next && next.classList.contains("detail")) {
    next.remove();
    if (!keep) return;
  }
  const attempts = rowsOf(await api("GET", `${base}/webhooks/${q(w.id)}/attempts?limit=20`), "attempts");
  const refresh = el("button", { type: "button", className: "refresh" }, "Refresh");
  refresh.addEventListener("click", guarded(() => toggleAttempts(tr, base, w, true)));
  const body = attempts.length
    ? el("table", { className: "attempts" },
      el("thead", {}, el("tr", {}, ...["Time", "Event", "Status", "Took", "State", "Answer"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...attempts.map((a) => el("tr", {}, el("td", {}, when(a.created)),
        el("td", { title: a.event_id }, a.type), el("td", { className: "status-code" }, a.status === null ? "no answer" : a.status),
        el("td", {}, `${a.duration_ms} ms`), el("td", {}, a.state),
        el("td", {}, el("pre", { className: "answer" }, String(a.answer || "").slice(0, 1024)))))))
    : el("p", {}, "No attempts yet.");
  const holder = el("tr", { className: "detail" }, el("td", { colSpan: 5 },
    el("div", { className: "scroll" }, el("h3", {}, `Attempts of ${w.id}, newest first`), body), refresh));
  tr.after(holder);
}

async function addSuppression() {
  const account = $("events-account").value;
  const address = $("suppression-address").value.trim();
  need(account, "Choose an account first.");
  need(looksLikeAddress(address), "Address: an email address, or *@domain.");
  await api("POST", `/accounts/${q(account)}/suppressions`, { address });
  $("suppression-address").value = "";
  await loadEvents();
  say(`Suppressed ${address} for ${account}.`);
}

async function addWebhook() {
  const account = $("events-account").value;
  const url = $("webhook-url").value.trim();
  need(account, "Choose an account first.");
  need(/^https:\/\/[^\s/]+/.test(url), "URL: https://... (the endpoint).");
  const body = { url };
  const events = words($("webhook-events").value).filter((e) => e !== "all");
  if (events.length) body.events = events;
  const made = await api("POST", `/accounts/${q(account)}/webhooks`, body);
  $("new-webhook-secret").textContent = made.secret;
  $("new-webhook-box").hidden = false;
  $("webhook-url").value = "";
  await loadEvents();
  say(`Added the webhook ${made.id}; its secret is shown once, above.`);
}

// --- the delivery log -----------------------------------------------------------

const LOG_FILTERS = [["since", "log-since"], ["until", "log-until"], ["account", "log-account"],
  ["channel", "log-channel"], ["outcome", "log-outcome"], ["sender", "log-sender"],
  ["recipient", "log-recipient"], ["message_id", "log-message-id"]];

async function loadLog() {
  const params = new URLSearchParams({ limit: "100" });
  for (const [name, id] of LOG_FILTERS) {
    const value = $(id).value.trim();
    if (value) params.set(name, value);
  }
  const [{ records }, { accounts }] = await Promise.all([api("GET", "/log?" + params), api("GET", "/accounts")]);
  fillAccounts($("log-account"), accounts, el("option", { value: "" }, "any"));
  $("log-table").tBodies[0].replaceChildren(
    ...records.map((r) => {
      const addresses = r.recipients.map((x) => x.address);
      const more = r.recipient_count - 1;
      const rcpt = addresses.length ? (more > 0 ? `${addresses[0]} + ${more} more` : addresses[0]) : "-";
      const copy = el("button", { type: "button", className: "copy", title: "Copy the Message-ID" }, "Copy");
      copy.addEventListener("click", guarded(async (event) => {
        event.stopPropagation();
        await copyText(r.message_id);
      }));
      const row = el("tr", { className: "clickable", tabIndex: 0 },
        el("td", { className: "time" }, r.time.replace("T", " ").slice(0, 19)),
        el("td", { className: "message-id" }, el("div", { className: "idcell" },
          el("span", { className: "clip", title: r.message_id }, r.message_id || "-"), copy)),
        el("td", { className: "clip", title: r.sender }, r.sender),
        el("td", { className: "rcpt", title: addresses.join(", ") + kept(r) }, rcpt),
        el("td", {}, r.channel || "-"), el("td", {}, r.outcome), el("td", {}, `${r.reply.code} ${r.reply.enhanced}`));
      row.dataset.messageId = r.message_id;
      const open = guarded(() => toggleRecord(row, r.message_id));
      row.addEventListener("click", open);
      row.addEventListener("keydown", (event) => { if (event.key === "Enter" && event.target === row) open(event); });
      return row;
    }),
  );
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    say("Copied.");
  } catch {
    say(`Copy it by hand: ${text}`);
  }
}

// A refused message's record keeps only its first recipients, and their count.
function kept(r) {
  return r.recipient_count > r.recipients.length ? ` (${r.recipients.length} of ${r.recipient_count} kept)` : "";
}

// The detail opens in place: a row right under the one clicked, every record and attempt.
async function toggleRecord(row, messageId) {
  const next = row.nextElementSibling;
  if (next && next.classList.contains("detail")) {
    next.remove();
    dropLink();
    return;
  }
  const { records } = await api("GET", `/log/${q(messageId)}`);
  for (const open of $("log-table").querySelectorAll("tr.detail")) open.remove();
  const link = el("a", { href: linkOf(messageId), className: "permalink" }, "Link to this record");
  const copyLink = el("button", { type: "button", className: "copy-link" }, "Copy the link");
  copyLink.addEventListener("click", guarded(() => copyText(location.origin + location.pathname + linkOf(messageId))));
  const detail = el("div", { className: "log-detail" }, el("h3", {}, messageId),
    el("p", {}, link, " ", copyLink, " (the admin token is never in it)"));
  for (const r of records) {
    const facts = [["time", r.time], ["account", `${r.account} (token ${r.token_id})`], ["client", r.client],
      ["port", r.listener], ["sender", r.sender], ["size", `${r.size} octets`], ["channel", r.channel || "-"],
      ["outcome", r.outcome + (r.replay ? " (replay, not charged)" : "")],
      ["reply", `${r.reply.code} ${r.reply.enhanced} ${r.reply.text}`], ["upstream id", r.upstream_id || "-"],
      ["charged", r.charged], ["forward", `${r.duration} s`],
      ["recipients", `${r.recipient_count}${kept(r)}`]];
    detail.append(
      el("table", { className: "facts" }, el("tbody", {}, ...facts.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))))),
      el("table", { className: "attempts" },
        el("thead", {}, el("tr", {}, el("th", {}, "Attempt"), el("th", {}, "Channel"), el("th", {}, "Reply"), el("th", {}, "Seconds"), el("th", {}, "Taken"))),
        el("tbody", {}, ...r.attempts.map((a, i) => el("tr", {}, el("td", {}, i + 1), el("td", {}, a.channel),
          el("td", {}, `${a.reply.code} ${a.reply.enhanced} ${a.reply.text}`), el("td", {}, a.duration), el("td", {}, a.accepted))))),
      el("table", { className: "recipients" },
        el("thead", {}, el("tr", {}, el("th", {}, "Recipient"), el("th", {}, "Outcome"), el("th", {}, "Upstream reply"))),
        el("tbody", {}, ...r.recipients.map((x) => el("tr", {}, el("td", {}, x.address), el("td", {}, x.outcome),
          el("td", {}, `${x.code} ${x.enhanced}`))))),
    );
  }
  const cell = el("td", { colSpan: 7 }, detail);
  const holder = el("tr", { className: "detail" }, cell);
  row.after(holder);
  history.replaceState(null, "", linkOf(messageId));
  holder.scrollIntoView({ block: "nearest" });
}

// A record's shareable link: #log/<Message-ID>. Opened (on load, after sign-in, or
// when the fragment changes), it shows the log filtered to that message with its
// record open. Only the Message-ID is in it, never the token (that stays in the tab).
function linkOf(messageId) {
  return "#log/" + encodeURIComponent(messageId);
}

function dropLink() {
  if (location.hash.startsWith("#log/")) history.replaceState(null, "", location.pathname + location.search);
}

async function openLink() {
  const match = /^#log\/(.+)$/.exec(location.hash);
  if (!match) return false;
  let messageId;
  try {
    messageId = decodeURIComponent(match[1]);
  } catch {
    return false;
  }
  for (const [, id] of LOG_FILTERS) $(id).value = "";
  $("log-message-id").value = messageId;
  await show("log");
  const row = $("log-table").tBodies[0].querySelector("tr.clickable");
  if (!row) {
    say(`No record of ${messageId}.`, true);
    return true;
  }
  await guarded(() => toggleRecord(row, row.dataset.messageId))();
  row.focus();
  return true;
}

// Escape closes what Enter (or a click) opened: the log's record, the delete form.
function onEscape(event) {
  if (event.key !== "Escape") return;
  const open = current === "log" && $("log-table").querySelector("tr.detail");
  if (open) {
    const row = open.previousElementSibling;
    open.remove();
    dropLink();
    if (row) row.focus();
    event.preventDefault();
  } else if (!$("delete-form").hidden) {
    $("delete-form").hidden = true;
    event.preventDefault();
  }
}

// --- wiring ---------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", guarded(signIn));
  $("sign-out").addEventListener("click", () => {
    signOut();
    say("Signed out.");
  });
  for (const button of document.querySelectorAll("nav button[data-view]")) {
    button.addEventListener("click", () => show(button.dataset.view));
  }
  $("account-select").addEventListener("change", guarded(loadTokens));
  $("token-form").addEventListener("submit", guarded(createToken));
  $("copy-token").addEventListener("click", guarded(copyToken));
  $("rules-form").addEventListener("submit", guarded(saveRules));
  $("rules-cancel").addEventListener("click", () => { $("rules-form").hidden = true; });
  $("sender-form").addEventListener("submit", guarded(() => loadSenders(false)));
  $("senders-more").addEventListener("click", guarded(() => loadSenders(true)));
  $("log-form").addEventListener("submit", guarded(loadLog));
  $("limits-form").addEventListener("submit", guarded(setLimits));
  $("overview-form").addEventListener("submit", guarded(loadOverview));
  $("overview-window").addEventListener("change", guarded(loadOverview));
  $("account-form").addEventListener("submit", guarded(createAccount));
  $("domain-form").addEventListener("submit", guarded(addDomain));
  $("domain-account").addEventListener("change", guarded(loadDomains));
  $("list-form").addEventListener("submit", guarded(addToList));
  $("list-kind").addEventListener("change", guarded(loadList));
  $("queue-form").addEventListener("submit", guarded(loadQueue));
  $("events-account").addEventListener("change", guarded(loadEvents));
  $("suppression-form").addEventListener("submit", guarded(addSuppression));
  $("webhook-form").addEventListener("submit", guarded(addWebhook));
  $("delete-form").addEventListener("submit", guarded(deleteAccount));
  $("delete-cancel").addEventListener("click", () => { $("delete-form").hidden = true; });
  document.addEventListener("keydown", onEscape);
  window.addEventListener("hashchange", () => {
    if (sessionStorage.getItem(TOKEN_KEY)) guarded(openLink)();
  });
  if (sessionStorage.getItem(TOKEN_KEY)) guarded(async () => (await openLink()) || show("overview"))();
  else signOut();
});
