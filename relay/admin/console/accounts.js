// The relay's web console, accounts and domains, suppressions and webhooks: loaded after app.js, whose helpers
// (el, api, say, guarded, need, ...) it calls. Everything shown is built with
// textContent, never innerHTML.
"use strict";

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
        el("td", {}, queueMode(a)),
        el("td", { className: "state" }, a.disabled ? `disabled since ${when(a.disabled)}` : "enabled"),
        el("td", { className: "actions" }, pick, " ", toggle, " ", remove));
      tr.dataset.account = a.name;
      return tr;
    }),
  );
  fillAccounts($("domain-account"), accounts);
  await loadDomains();
}

// An account's own RELAY_QUEUE (`relay account set NAME --queue MODE|default`): set
// as soon as another is chosen; "default" follows the relay's setting.
const QUEUE_MODES = [["default", "the relay's"], ["off", "off"], ["on-failure", "on-failure"], ["always", "always"]];

function queueMode(a) {
  const select = el("select", { className: "queue-mode", ariaLabel: `Queue mode of ${a.name}` },
    ...QUEUE_MODES.map(([value, label]) => el("option", { value }, label)));
  select.value = a.queue || "default";
  select.addEventListener("change", guarded(async () => {
    const queue = select.value;
    await api("PATCH", `/accounts/${q(a.name)}`, { queue });
    await loadAccountsView();
    say(`The queue mode of ${a.name}: ${queue === "default" ? "the relay's" : queue}.`);
  }));
  return select;
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
      el("thead", {}, el("tr", {}, ...["Time", "Event", "Status", "Took", "State", "Answer", ""].map((h) => el("th", {}, h)))),
      el("tbody", {}, ...attempts.map((a) => {
        const row = el("tr", {}, el("td", {}, when(a.created)),
          el("td", { title: a.event_id }, a.type), el("td", { className: "status-code" }, a.status === null ? "no answer" : a.status),
          el("td", {}, `${a.duration_ms} ms`), el("td", {}, a.state),
          el("td", {}, el("pre", { className: "answer" }, String(a.answer || "").slice(0, 1024))),
          el("td", {}, replayButton(base, a)));
        row.dataset.eventId = a.event_id;
        return row;
      })))
    : el("p", {}, "No attempts yet.");
  const holder = el("tr", { className: "detail" }, el("td", { colSpan: 5 },
    el("div", { className: "scroll" }, el("h3", {}, `Attempts of ${w.id}, newest first`), body), refresh));
  tr.after(holder);
}

// Send one event again (`relay webhook replay`): to each of the account's endpoints
// that had it, from its first try; the new attempts show under Refresh.
function replayButton(base, a) {
  const button = el("button", { type: "button", className: "replay", title: `Send ${a.event_id} again` }, "Replay");
  button.addEventListener("click", guarded(async () => {
    const done = await api("POST", `${base}/events/${q(a.event_id)}/replay`);
    say(`Replayed ${a.type} (${done.event_id}): ${done.queued} delivery(ies) queued.`);
  }));
  return button;
}

async function addSuppression() {
  const account = $("events-account").value;
  const address = $("suppression-address").value.trim();
  need(account, "Choose an account first.");
  need(looksLikeAddress(address), "Address: an email address, or *@domain.");
  const body = { address, reason: $("suppression-reason").value };
  const days = $("suppression-expires").value.trim();
  if (days) {
    const seconds = Math.round(Number(days) * 86400);
    need(Number.isSafeInteger(seconds) && seconds > 0, "Expires in days: more than 0 (blank: never).");
    body.expires_in = seconds;
  }
  await api("POST", `/accounts/${q(account)}/suppressions`, body);
  $("suppression-address").value = "";
  $("suppression-expires").value = "";
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
