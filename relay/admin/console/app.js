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

const views = ["signin", "overview", "accounts", "tokens", "senders", "limits", "lists", "queue", "events", "log", "audit"];

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
    events: loadEventsView, log: loadLog, audit: () => loadAudit(false),
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
  const role = $("token-role").value.trim();
  if (role) body.role = role;
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
  const amount = el("input", { type: "number", className: "amount", step: "1", ariaLabel: `Top up ${s.address} by` });
  const topup = el("button", { type: "button", className: "topup" }, "Top up");
  const exact = el("input", { type: "number", className: "amount exact", min: "0", step: "1", ariaLabel: `New balance of ${s.address}` });
  const set = el("button", { type: "button", className: "set" }, "Set");
  const toggle = el("button", { type: "button", className: "toggle" }, s.enabled ? "Disable" : "Enable");
  const remove = confirming("Delete", async () => {
    await api("DELETE", `/senders/${q(s.address)}`);
    row.remove();
    say(`Deleted the sender row of ${s.address}; it starts from the default balance again.`);
  });
  remove.classList.add("delete");
  const row = el("tr", {}, el("td", { className: "address" }, s.address),
    el("td", { className: "balance" }, s.balance),
    el("td", { className: "state" }, s.enabled ? "enabled" : "disabled"),
    el("td", {}, amount, topup), el("td", {}, exact, set), el("td", { className: "actions" }, toggle, " ", remove));
  row.dataset.address = s.address;
  const update = (value) => row.replaceWith(senderRow(value));
  set.addEventListener(
    "click",
    guarded(async () => {
      const value = wholeNumber(exact.value);
      need(value !== null, "Set balance: a whole number, 0 or more.");
      update(await api("PATCH", `/senders/${q(s.address)}`, { balance: value }));
      say(`Set the balance of ${s.address} to ${value}.`);
    }),
  );
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

// A whole number of 0 or more typed in a field, or null.
function wholeNumber(text) {
  const value = Number(String(text).trim());
  return String(text).trim() !== "" && Number.isSafeInteger(value) && value >= 0 ? value : null;
}

// A sender row made with its balance (PATCH creates the row when missing).
async function createSender() {
  const address = $("sender-new-address").value.trim();
  const balance = wholeNumber($("sender-new-balance").value);
  need(looksLikeAddress(address), "New sender: an email address such as someone@example.com.");
  need(balance !== null, "Balance: a whole number, 0 or more.");
  const made = await api("PATCH", `/senders/${q(address)}`, { balance });
  $("sender-new-address").value = "";
  $("sender-new-balance").value = "";
  $("senders-table").tBodies[0].querySelector(`tr[data-address="${CSS.escape(made.address)}"]`)?.remove();
  $("senders-table").tBodies[0].prepend(senderRow(made));
  say(`Set the sender ${made.address}: balance ${made.balance}.`);
}

// --- limits ---------------------------------------------------------------------

async function loadLimits() {
  const [{ limits }, { accounts }] = await Promise.all([api("GET", "/limits"), api("GET", "/accounts")]);
  const of = (count, limit) => `${count} / ${limit === -1 ? "unlimited" : limit}`;
  $("limits-table").tBodies[0].replaceChildren(
    ...limits.map((l) => {
      const tr = el("tr", {}, el("td", {}, l.scope), el("td", {}, of(l.daily_count, l.daily)),
        el("td", {}, l.daily_resets_at), el("td", {}, of(l.monthly_count, l.monthly)),
        el("td", {}, l.monthly_resets_at));
      tr.dataset.scope = l.scope;
      // Reset: both windows back to unlimited (-1); the counts stay, as they are
      // what was sent. Offered only where a limit is set.
      const set = l.daily !== -1 || l.monthly !== -1;
      tr.append(el("td", {}, set ? confirming("Reset", async () => {
        const body = { daily: -1, monthly: -1 };
        if (l.scope !== "relay") body.account = l.scope;
        await api("PUT", "/limits", body);
        await loadLimits();
        say(`Reset the limits of ${l.scope === "relay" ? "the relay" : l.scope}: unlimited.`);
      }) : ""));
      return tr;
    }),
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
  $("sender-new-form").addEventListener("submit", guarded(createSender));
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
  $("audit-form").addEventListener("submit", guarded(() => loadAudit(false)));
  $("audit-more").addEventListener("click", guarded(() => loadAudit(true)));
  for (const action of ["retry", "hold", "release"]) {
    $(`queue-${action}-all`).addEventListener("click", guarded(() => queueAll(action)));
  }
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
