// The relay's web console, the delivery log and its shareable links, the queue, the audit log: loaded after app.js, whose helpers
// (el, api, say, guarded, need, ...) it calls. Everything shown is built with
// textContent, never innerHTML.
"use strict";

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
  queueListed = { messages, filtered: [...params].length > 0 };
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
      const details = el("button", { type: "button", className: "details" }, "Details");
      details.addEventListener("click", guarded(() => toggleQueued(tr, m.id)));
      const tr = el("tr", {}, el("td", {}, m.id), el("td", {}, when(m.created)), el("td", {}, m.account),
        el("td", { className: "clip", title: m.sender }, m.sender), el("td", { title: recipients.join(", ") }, summary(recipients)),
        el("td", { className: "state" }, m.state), el("td", {}, m.tries), el("td", { className: "next" }, when(m.next_try)),
        el("td", {}, m.last_code ? `${m.last_code} ${m.last_text || ""}` : "-"),
        el("td", { className: "actions" }, details, " ", act("retry"), " ", m.state === "held" ? act("release") : act("hold"), " ", cancel));
      tr.dataset.id = m.id;
      return tr;
    }),
  );
}

// One queued message as `relay queue show` prints it, opened under its row: each
// recipient done (its reply) or waiting, and every attempt so far.
async function toggleQueued(tr, id) {
  const next = tr.nextElementSibling;
  if (next && next.classList.contains("detail")) return next.remove();
  const m = await api("GET", `/queue/${q(id)}`);
  const done = m.done || {};
  const pairs = [["Message-ID", m.message_id || "-"], ["Size", `${m.size} bytes`],
    ["State", m.state + (m.lease_owner ? " (an attempt runs)" : "")], ["Next try", when(m.next_try)]];
  const holder = el("tr", { className: "detail" }, el("td", { colSpan: 10 }, el("div", { className: "scroll" },
    el("table", { className: "settings" }, ...pairs.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))),
    el("h3", {}, "Recipients"),
    el("table", { className: "recipients" }, el("tbody", {}, ...m.recipients.map((r) => el("tr", {}, el("td", {}, r),
      el("td", {}, r in done ? done[r].slice(0, 2).join(" ") : "waiting"))))),
    el("h3", {}, "Attempts"),
    m.attempts.length
      ? el("table", { className: "attempts" }, el("tbody", {}, ...m.attempts.map((a, n) => el("tr", {},
        el("td", {}, `${n + 1}.`), el("td", {}, a[0]), el("td", {}, `${a[1]} ${a[2]} ${a[3]}`),
        el("td", {}, `${Number(a[4]).toFixed(3)} s`)))))
      : el("p", {}, "None yet."))));
  tr.after(holder);
}

// Retry, hold or release every listed message. Unfiltered, the list is the whole
// queue: one call, the API's `all` form (as `relay queue ACTION --all`). Filtered,
// each listed message it applies to, one call each, so nothing unlisted changes.
let queueListed = { messages: [], filtered: false };

async function queueAll(action) {
  const { messages, filtered } = queueListed;
  need(messages.length, "No message listed.");
  let changed = 0;
  if (!filtered) {
    changed = (await api("POST", `/queue/all/${action}`)).changed;
  } else {
    const wanted = { retry: () => true, hold: (m) => m.state !== "held", release: (m) => m.state === "held" };
    for (const m of messages.filter(wanted[action])) {
      try {
        changed += (await api("POST", `/queue/${m.id}/${action}`)).changed;
      } catch (err) {
        if (!(err instanceof ApiError && err.status === 404)) throw err; // done meanwhile
      }
    }
  }
  await loadQueue();
  say(`${action}: ${changed} message(s) changed.`);
}

// --- the audit log --------------------------------------------------------------

// Newest first, 100 a page; More asks for the page after the last one shown (the
// API's cursor), so entries made meanwhile never shift what is listed.
let auditCursor = null;

async function loadAudit(more) {
  const params = new URLSearchParams({ limit: "100" });
  if (more && auditCursor !== null) params.set("cursor", auditCursor);
  const { records, next_cursor } = await api("GET", "/audit?" + params);
  auditCursor = next_cursor;
  $("audit-more").hidden = next_cursor === null || next_cursor === undefined;
  const rows = records.map((r) => {
    const detail = r.detail && Object.keys(r.detail).length ? JSON.stringify(r.detail) : "";
    const tr = el("tr", {}, el("td", { className: "time" }, when(r.created)), el("td", {}, r.actor),
      el("td", {}, r.address), el("td", { className: "action" }, r.action), el("td", { className: "target" }, r.target),
      el("td", { className: "detail-text" }, detail));
    tr.dataset.id = r.id;
    return tr;
  });
  if (more) $("audit-table").tBodies[0].append(...rows);
  else $("audit-table").tBodies[0].replaceChildren(...rows);
}
