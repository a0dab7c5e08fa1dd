"""The database schema, as the ordered migrations that build it.

`Store.migrate` applies those not applied yet at every start and records the
count in `PRAGMA user_version`. Append only: a released migration never changes.
"""

MIGRATIONS: tuple[str, ...] = (
    # 1: accounts, domains and tokens (the relay core)
    """
    CREATE TABLE accounts (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created INTEGER NOT NULL
    );
    CREATE TABLE domains (
        domain TEXT PRIMARY KEY,            -- one account per domain, ever
        account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        created INTEGER NOT NULL
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        hash TEXT NOT NULL UNIQUE,          -- sha256 of the token, never the token
        name TEXT NOT NULL DEFAULT '',
        role TEXT NOT NULL DEFAULT '',
        created INTEGER NOT NULL,
        expires INTEGER,
        revoked INTEGER
    );
    """,
    # 2: verified addresses (the free Cloudflare channel)
    """
    CREATE TABLE verified (address TEXT PRIMARY KEY, created INTEGER NOT NULL);
    """,
    # 3: balances, the no-limit list, send limits and pending charges
    """
    CREATE TABLE senders (
        address TEXT PRIMARY KEY,
        balance INTEGER NOT NULL CHECK (balance >= 0),
        enabled INTEGER NOT NULL DEFAULT 1,
        created INTEGER NOT NULL,
        updated INTEGER NOT NULL
    );
    CREATE TABLE nolimit (address TEXT PRIMARY KEY, created INTEGER NOT NULL);
    CREATE TABLE limits (
        scope TEXT PRIMARY KEY,             -- '*' for the relay, else an account id
        daily INTEGER NOT NULL DEFAULT -1,
        monthly INTEGER NOT NULL DEFAULT -1
    );
    CREATE TABLE counters (
        scope TEXT NOT NULL,
        period TEXT NOT NULL,               -- 'd:2026-11-21' or 'm:2026-11' (UTC)
        count INTEGER NOT NULL CHECK (count >= 0),
        PRIMARY KEY (scope, period)
    );
    CREATE TABLE pending (
        id INTEGER PRIMARY KEY,
        sender TEXT NOT NULL,
        unit INTEGER NOT NULL,              -- balance units per recipient: 0 or 1
        count INTEGER NOT NULL,             -- recipients reserved
        scopes TEXT NOT NULL,               -- comma list of limit scopes counted
        day TEXT NOT NULL,
        month TEXT NOT NULL,
        created INTEGER NOT NULL
    );
    """,
    # 4: messages an idempotent upstream (Resend) took, by idempotency key, so a
    #    client's retry after a lost reply is not charged a second time
    """
    CREATE TABLE delivered_keys (key TEXT PRIMARY KEY, created INTEGER NOT NULL);
    """,
    # 5: which live relay process owns each pending charge, so a sweep refunds only
    #    the charges of dead processes (a live one is still settling its own)
    """
    CREATE TABLE processes (
        id TEXT PRIMARY KEY,                -- pid and a random instance id
        pid INTEGER NOT NULL,
        heartbeat INTEGER NOT NULL          -- refreshed while the process lives
    );
    ALTER TABLE pending ADD COLUMN owner TEXT;  -- a processes id, or NULL: none
    """,
    # 6: the delivery log (relay.store.deliveries): one row per mail transaction that
    #    reached the end of DATA, its recipients in a side table so a query by
    #    recipient is an index lookup; rows go after RELAY_LOG_RETENTION_DAYS
    """
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY,
        created INTEGER NOT NULL,           -- unix seconds (UTC)
        message_id TEXT NOT NULL,
        account TEXT NOT NULL,              -- the account's name
        token_id TEXT NOT NULL,             -- the token's id, never the token
        sender TEXT NOT NULL,               -- the envelope sender, normalized
        size INTEGER NOT NULL,              -- octets of the message
        channel TEXT NOT NULL,              -- '' when refused before a channel was chosen
        rule INTEGER,                       -- the channel table's row
        outcome TEXT NOT NULL,              -- delivered, partial, refused, deferred
        reply_code INTEGER NOT NULL,        -- the reply the client got
        reply_enhanced TEXT NOT NULL,
        reply_text TEXT NOT NULL,
        upstream_id TEXT NOT NULL,
        charged INTEGER NOT NULL,           -- balance units kept
        duration_ms INTEGER NOT NULL,       -- the forward
        client TEXT NOT NULL,               -- the client's address
        replay INTEGER NOT NULL             -- an idempotent retry the upstream took before
    );
    CREATE INDEX deliveries_created ON deliveries (created);
    CREATE INDEX deliveries_message_id ON deliveries (message_id);
    CREATE INDEX deliveries_sender ON deliveries (sender, id);
    CREATE TABLE delivery_recipients (
        delivery_id INTEGER NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
        recipient TEXT NOT NULL,            -- normalized
        outcome TEXT NOT NULL,              -- delivered, refused, deferred
        code INTEGER NOT NULL,              -- the upstream's (or the relay's) reply code
        enhanced TEXT NOT NULL,
        PRIMARY KEY (delivery_id, recipient)
    ) WITHOUT ROWID;
    CREATE INDEX delivery_recipients_recipient ON delivery_recipients (recipient, delivery_id);
    """,
    # 7: failed AUTH attempts by client address, for the cross-session throttle
    """
    CREATE TABLE auth_failures (address TEXT NOT NULL, created INTEGER NOT NULL);
    CREATE INDEX auth_failures_by_address ON auth_failures (address, created);
    """,
    # 8: the admin API (relay.store.admins, relay.store.audit): operators' bearer tokens, kept
    #    apart from sending tokens, and the audit log of every change an operator made
    """
    CREATE TABLE admin_tokens (
        id TEXT PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,          -- sha256 of the token, never the token
        name TEXT NOT NULL DEFAULT '',
        created INTEGER NOT NULL,
        expires INTEGER,
        revoked INTEGER
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        created INTEGER NOT NULL,           -- unix seconds (UTC)
        actor TEXT NOT NULL,                -- an admin token's id, or 'cli'
        address TEXT NOT NULL,              -- the client's address ('local' for the CLI)
        action TEXT NOT NULL,               -- e.g. 'sender.topup'
        target TEXT NOT NULL,               -- what it acted on: an account, an address, an id
        detail TEXT NOT NULL                -- JSON: the change's arguments (never a secret)
    );
    CREATE INDEX audit_created ON audit (created);
    """,
    # 9: refused messages by token (relay.store.refusals), so one token cannot fill the
    #    disk with them; a record's recipient count, when it keeps only the first few
    """
    CREATE TABLE refusals (token_id TEXT NOT NULL, created INTEGER NOT NULL);
    CREATE INDEX refusals_by_token ON refusals (token_id, created);
    ALTER TABLE deliveries ADD COLUMN recipient_count INTEGER;  -- NULL: its recipient rows
    """,
    # 10: every channel tried for a message when one failed over to the next
    #     (relay.delivery.chain): JSON, NULL when one channel was tried
    """
    ALTER TABLE deliveries ADD COLUMN attempts TEXT;
    """,
    # 11: the durable queue (relay.store.queue): a message the relay answered 250
    #     for and delivers in the background, with its envelope, its content and
    #     its reservation (the pending row, owned by the queue while it waits)
    """
    CREATE TABLE queue (
        id INTEGER PRIMARY KEY,
        created INTEGER NOT NULL,           -- unix seconds: when the 250 was sent
        message_id TEXT NOT NULL,
        account TEXT NOT NULL,
        account_id INTEGER NOT NULL,
        token_id TEXT NOT NULL,
        client TEXT NOT NULL,
        sender TEXT NOT NULL,               -- normalized (the balance's address)
        envelope_from TEXT NOT NULL,        -- as the client wrote it
        recipients TEXT NOT NULL,           -- JSON: [[as written, normalized], ...]
        done TEXT NOT NULL,                 -- JSON: {as written: [code, enhanced, text]}
        content BLOB NOT NULL,              -- the message as prepared
        size INTEGER NOT NULL,              -- octets the client sent
        idempotency_key TEXT NOT NULL,
        routes TEXT NOT NULL,               -- JSON: [[channel, charges, rule], ...]
        reservation_id INTEGER NOT NULL,
        reservation_created INTEGER,
        state TEXT NOT NULL,                -- queued, held
        attempts TEXT NOT NULL,             -- JSON: every attempt so far
        tries INTEGER NOT NULL,
        next_try INTEGER NOT NULL,          -- unix seconds
        last_code INTEGER,
        last_text TEXT NOT NULL,
        lease_owner TEXT,                   -- a processes id while an attempt runs
        lease_until INTEGER
    );
    CREATE INDEX queue_due ON queue (state, next_try);
    """,
    # 12: what each token may do (relay.tokenrules): its senders, networks and rates as
    #    one JSON column; its counts per rate window, one row per token and unit,
    #    started over when a new window begins; and which token a charge counted in,
    #    so its settle gives back what was not delivered
    """
    ALTER TABLE tokens ADD COLUMN rules TEXT NOT NULL DEFAULT '';  -- '' when none
    CREATE TABLE token_rates (
        token_id TEXT NOT NULL,
        unit TEXT NOT NULL,                 -- minute, hour, day
        start INTEGER NOT NULL,             -- unix seconds the counted window began (UTC)
        messages INTEGER NOT NULL CHECK (messages >= 0),
        recipients INTEGER NOT NULL CHECK (recipients >= 0),
        PRIMARY KEY (token_id, unit)
    );
    ALTER TABLE pending ADD COLUMN token TEXT;  -- a token counted in token_rates, or NULL
    """,
    # 13: the port a message came in on: 'smtps' (implicit TLS) or 'submission'
    #     (STARTTLS); every record before it came in on the implicit-TLS port
    """
    ALTER TABLE deliveries ADD COLUMN listener TEXT NOT NULL DEFAULT 'smtps';
    """,
    # 14: an account's own RELAY_QUEUE (relay.store.accounts): off, on-failure or
    #     always; NULL: the relay's setting. Read with MAIL FROM's check.
    """
    ALTER TABLE accounts ADD COLUMN queue TEXT;
    """,
    # 15: each account's suppression list (relay.store.suppressions), and its webhooks
    #     (relay.store.outbox): endpoints, the outbox of events written in the same
    #     transaction as the record they describe, and each attempt to send one
    """
    CREATE TABLE suppressions (
        account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        address TEXT NOT NULL,              -- lower-cased, '*@domain' for a whole domain
        reason TEXT NOT NULL,               -- hard-bounce, complaint, manual, provider
        source TEXT NOT NULL,               -- who or what added it (never a secret)
        created INTEGER NOT NULL,
        expires INTEGER,                    -- NULL: until removed
        PRIMARY KEY (account_id, address)
    ) WITHOUT ROWID;
    CREATE TABLE webhook_endpoints (
        id TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        url TEXT NOT NULL,
        secret TEXT NOT NULL,               -- whsec_...: the relay signs with it, shown once
        events TEXT NOT NULL,               -- comma-separated event types, '' for every type
        created INTEGER NOT NULL,
        enabled INTEGER NOT NULL DEFAULT 1,
        failing_since INTEGER               -- the first failed attempt since the last success
    );
    CREATE INDEX webhook_endpoints_account ON webhook_endpoints (account_id);
    CREATE TABLE webhook_outbox (
        id INTEGER PRIMARY KEY,
        event_id TEXT NOT NULL,             -- the webhook-id: the same on every retry
        endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints(id) ON DELETE CASCADE,
        type TEXT NOT NULL,
        payload TEXT NOT NULL,              -- the JSON body, exactly as signed
        created INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt INTEGER NOT NULL,
        state TEXT NOT NULL                 -- pending, delivered, failed
    );
    CREATE INDEX webhook_outbox_due ON webhook_outbox (state, next_attempt);
    CREATE INDEX webhook_outbox_endpoint ON webhook_outbox (endpoint_id, id);
    CREATE TABLE webhook_attempts (
        id INTEGER PRIMARY KEY,
        outbox_id INTEGER NOT NULL REFERENCES webhook_outbox(id) ON DELETE CASCADE,
        endpoint_id TEXT NOT NULL,
        created INTEGER NOT NULL,
        status INTEGER,                     -- the HTTP status, NULL: no answer
        duration_ms INTEGER NOT NULL,
        answer TEXT NOT NULL                -- the first 1 KiB of the answer, or why none came
    );
    CREATE INDEX webhook_attempts_endpoint ON webhook_attempts (endpoint_id, id);
    CREATE INDEX webhook_attempts_outbox ON webhook_attempts (outbox_id);
    """,
    # 16: what a provider said of a message after it took it (Resend's email.delivered,
    #     email.bounced, ...: relay.events.provider), on the message's delivery record,
    #     found by the provider's id for it
    """
    ALTER TABLE deliveries ADD COLUMN provider_events TEXT;  -- JSON list, NULL: none
    CREATE INDEX deliveries_upstream_id ON deliveries (upstream_id) WHERE upstream_id <> '';
    """,
    # 17: an account disabled by its admin (relay.store.accounts): the time it was
    #     disabled, NULL while enabled; and the delivery log's filters by account and
    #     by channel, newest first, each a range of its own index (relay.store.browse),
    #     so a filter that matches little reads little
    """
    ALTER TABLE accounts ADD COLUMN disabled INTEGER;
    CREATE INDEX deliveries_account ON deliveries (account, id);
    CREATE INDEX deliveries_channel ON deliveries (channel, id);
    """,
    # 18: an unlimited send-limit window's count kept per relay process, summed on
    #     read, so relays on several hosts (PostgreSQL) never wait for each other's
    #     commit to count a message (relay.store.limits)
    """
    CREATE TABLE relay_counters (
        scope TEXT NOT NULL,
        period TEXT NOT NULL,
        relay TEXT NOT NULL,                -- the relay process that counted
        count INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (scope, period, relay)
    ) WITHOUT ROWID;
    """,
    # 19: the delivery queue keeps the listener a message came in on (its final record
    #     names it), and each Resend batch from before its request is sent until every
    #     member ended (relay.store.queue): after a crash the same batch, with the same
    #     key and the same body, is what is sent again, never a batch formed anew; and
    #     its totals, kept as messages come and go (a count of the queue per message
    #     read every message's content)
    """
    ALTER TABLE queue ADD COLUMN listener TEXT NOT NULL DEFAULT 'smtps';
    ALTER TABLE queue ADD COLUMN batch_key TEXT;  -- the Resend batch it went out in, if unsettled
    CREATE INDEX queue_batch ON queue (batch_key) WHERE batch_key IS NOT NULL;
    CREATE TABLE queue_batches (
        key TEXT PRIMARY KEY,               -- the request's Idempotency-Key
        created INTEGER NOT NULL,
        domain TEXT NOT NULL,               -- the senders' domain: which API token sends it
        members TEXT NOT NULL,              -- JSON: the queue ids, in the body's order
        body TEXT NOT NULL                  -- the request body, exactly as sent
    );
    CREATE TABLE queue_totals (             -- one row, made by the first enqueue from a count
        one INTEGER NOT NULL UNIQUE CHECK (one = 1),
        messages INTEGER NOT NULL,
        bytes INTEGER NOT NULL              -- octets of content
    );
    """,
)
