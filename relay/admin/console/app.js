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

function say(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
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

const views = ["signin", "tokens", "senders", "limits", "log"];

async function show(view) {
  for (const name of views) $("view-" + name).hidden = name !== view;
  for (const button of document.querySelectorAll("nav button[data-view]")) {
    button.classList.toggle("active", button.dataset.view === view);
  }
  $("nav").hidden = view === "signin";
  const load = { tokens: loadAccounts, senders: () => loadSenders(false), limits: loadLimits, log: loadLog };
  if (load[view]) await guarded(load[view])();
}

function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  for (const name of views) $("view-" + name).hidden = name !== "signin";
  $("nav").hidden = true;
}

async function signIn() {
  const token = $("token-input").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token-input").value = "";
  await api("GET", "/accounts");
  say("Signed in.");
  await show("tokens");
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
  const { limits } = await api("GET", "/limits");
  const of = (count, limit) => `${count} / ${limit === -1 ? "unlimited" : limit}`;
  $("limits-table").tBodies[0].replaceChildren(
    ...limits.map((l) => el("tr", {}, el("td", {}, l.scope), el("td", {}, of(l.daily_count, l.daily)),
      el("td", {}, l.daily_resets_at), el("td", {}, of(l.monthly_count, l.monthly)),
      el("td", {}, l.monthly_resets_at))),
  );
}

// --- the delivery log -----------------------------------------------------------

async function loadLog() {
  const params = new URLSearchParams({ limit: "100" });
  for (const [name, id] of [["sender", "log-sender"], ["recipient", "log-recipient"],
    ["message_id", "log-message-id"], ["outcome", "log-outcome"]]) {
    const value = $(id).value.trim();
    if (value) params.set(name, value);
  }
  const { records } = await api("GET", "/log?" + params);
  $("log-detail").hidden = true;
  $("log-table").tBodies[0].replaceChildren(
    ...records.map((r) => {
      const row = el("tr", { className: "clickable" }, el("td", {}, r.time.replace("T", " ").slice(0, 19)),
        el("td", { className: "message-id" }, r.message_id || "-"), el("td", {}, r.sender),
        el("td", {}, r.recipients.map((x) => x.address).join(", ") + kept(r)), el("td", {}, r.channel || "-"),
        el("td", {}, r.outcome), el("td", {}, `${r.reply.code} ${r.reply.enhanced}`));
      row.dataset.messageId = r.message_id;
      row.addEventListener("click", guarded(() => openRecord(r.message_id)));
      return row;
    }),
  );
}

// A refused message's record keeps only its first recipients, and their count.
function kept(r) {
  return r.recipient_count > r.recipients.length ? ` (${r.recipients.length} of ${r.recipient_count} kept)` : "";
}

async function openRecord(messageId) {
  const { records } = await api("GET", `/log/${q(messageId)}`);
  const detail = $("log-detail");
  detail.replaceChildren(el("h3", {}, messageId));
  for (const r of records) {
    const facts = [["time", r.time], ["account", `${r.account} (token ${r.token_id})`], ["client", r.client],
      ["port", r.listener], ["sender", r.sender], ["size", `${r.size} octets`], ["channel", r.channel || "-"],
      ["outcome", r.outcome + (r.replay ? " (replay, not charged)" : "")],
      ["reply", `${r.reply.code} ${r.reply.enhanced} ${r.reply.text}`], ["upstream id", r.upstream_id || "-"],
      ["charged", r.charged], ["forward", `${r.duration} s`],
      ["recipients", `${r.recipient_count}${kept(r)}`]];
    detail.append(
      el("table", {}, el("tbody", {}, ...facts.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))))),
      el("table", { className: "recipients" },
        el("thead", {}, el("tr", {}, el("th", {}, "Recipient"), el("th", {}, "Outcome"), el("th", {}, "Upstream reply"))),
        el("tbody", {}, ...r.recipients.map((x) => el("tr", {}, el("td", {}, x.address), el("td", {}, x.outcome),
          el("td", {}, `${x.code} ${x.enhanced}`))))),
    );
  }
  detail.hidden = false;
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
  if (sessionStorage.getItem(TOKEN_KEY)) show("tokens");
  else signOut();
});
