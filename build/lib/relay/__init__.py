"""A self-hosted SMTPS submission relay: API-token AUTH, send balances, and one
upstream channel per message (Cloudflare Email Service, Resend, or SMTP)."""
