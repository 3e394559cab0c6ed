'use strict';
// A real HTTP receiver for Belfry's webhooks. Every request is checked with the official
// `pusher` Node SDK (`pusher.webhook(...).isValid()`) against the app's key and secret.
const fs = require('node:fs');
const http = require('node:http');
const https = require('node:https');
const Pusher = require('pusher');

/**
 * Starts a receiver for `app` ({id, key, secret}). options.respond(req#) returns the status
 * to answer (default 200); options.tls ({cert, key} paths) serves https://. Returns { url, requests, events(), accepted(), delivered(), close() }:
 * `requests` holds every request as { status, valid, body, headers, at }; `events()` the events
 * of the accepted (2xx) requests in arrival order; `delivered()` the same with a batch that was
 * delivered again (same X-Belfry-Webhook-Id) counted once, as a deduplicating receiver sees them.
 */
async function startReceiver(app, options = {}) {
  const pusher = new Pusher({ appId: app.id, key: app.key, secret: app.secret });
  const requests = [];
  const handler = (req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const rawBody = Buffer.concat(chunks).toString('utf8');
      const webhook = pusher.webhook({ headers: req.headers, rawBody });
      const status = options.respond ? options.respond(requests.length) : 200;
      let body;
      try { body = JSON.parse(rawBody); } catch { body = null; }
      requests.push({ status, valid: webhook.isValid(), body, headers: req.headers, at: Date.now(), method: req.method });
      res.writeHead(status, { 'content-type': 'text/plain' });
      res.end(status < 300 ? 'ok' : 'no');
    });
  };
  const server = options.tls
    ? https.createServer({ cert: fs.readFileSync(options.tls.cert), key: fs.readFileSync(options.tls.key) }, handler)
    : http.createServer(handler);
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  return {
    url: `${options.tls ? 'https' : 'http'}://127.0.0.1:${port}/pusher/webhook`,
    requests,
    accepted: () => requests.filter((r) => r.status < 300),
    events: () => requests.filter((r) => r.status < 300).flatMap((r) => r.body.events.map((e) => ({ ...e, at: r.at }))),
    delivered: () => {
      const seen = new Set();
      return requests.filter((r) => r.status < 300).filter((r) => {
        const id = r.headers['x-belfry-webhook-id'];
        if (seen.has(id)) return false;
        seen.add(id);
        return true;
      }).flatMap((r) => r.body.events);
    },
    close: () => new Promise((resolve) => { server.closeAllConnections(); server.close(() => resolve()); }),
  };
}

/** p50 and p99 of a list of numbers (nearest rank). */
function percentiles(values) {
  const s = [...values].sort((a, b) => a - b);
  const at = (p) => s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)];
  return { n: s.length, p50: at(50), p99: at(99) };
}

module.exports = { startReceiver, percentiles };
