'use strict';
// Server-side keepalive: silent sockets get pusher:ping, then close 4201; answering clients stay.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({ apps: [{ id: 'fast', activity_timeout: 1, pong_timeout: 1 }, { id: 'reverb', activity_timeout: 30, ping_interval: 1, pong_timeout: 1 }] }, 'keepalive');

describe('server keepalive', () => {
  it('announces activity_timeout 1 in connection_established', async () => {
    const { node } = ctx;
    const c = await h.rawClient(node);
    assert.equal(c.activityTimeout, 1);
  });

  it('ping_interval (Reverb\'s REVERB_APP_PING_INTERVAL) pings a silent socket before activity_timeout', async () => {
    const { node } = ctx;
    const c = await h.rawClient(node, node.apps.reverb);
    assert.equal(c.activityTimeout, 30, 'clients are still told the activity timeout');
    const start = Date.now();
    await c.next('pusher:ping', 4000);
    assert.ok(Date.now() - start < 4000, 'pinged after the ping interval, not after 30 s');
  });

  it('a raw socket that never answers gets pusher:ping, then close 4201', async () => {
    const { node } = ctx;
    const c = await h.rawClient(node);
    await c.subscribe(h.uniq('quiet-'));
    const start = Date.now();
    const ping = await c.next('pusher:ping', 4000);
    const info = await h.withTimeout(c.closed, 5000, 'close after unanswered ping');
    assert.equal(info.code, 4201, `close code ${info.code} ${info.reason}`);
    const elapsed = Date.now() - start;
    assert.ok(elapsed >= 1500, `closed too early (${elapsed} ms)`);
    assert.ok(ping.at <= Date.now());
  });

  it('a raw socket that answers pusher:ping with pusher:pong stays open', async () => {
    const { node } = ctx;
    const c = await h.rawClient(node);
    const name = h.uniq('polite-');
    await c.subscribe(name);
    c.ws.on('message', (data) => {
      try {
        if (JSON.parse(data.toString()).event === 'pusher:ping') c.send({ event: 'pusher:pong', data: {} });
      } catch { /* ignore */ }
    });
    await h.sleep(5000);
    assert.ok(c.isOpen, `closed: ${JSON.stringify(c.closeInfo)}`);
    assert.ok(c.frames.some((f) => f.event === 'pusher:ping'), 'the server pinged the silent socket');
    await h.sdk(node).trigger(name, 'StillHere', {});
    await c.next('StillHere');
  });

  it('a pusher-js client (which answers and pings) stays connected', async () => {
    const { node } = ctx;
    const client = h.pusherClient(node);
    const name = h.uniq('js-');
    const ch = await h.subscribed(client, name);
    const socketId = client.connection.socket_id;
    const changes = [];
    client.connection.bind('state_change', (s) => changes.push(`${s.previous}->${s.current}`));
    await h.sleep(5000);
    assert.deepEqual(changes, [], 'no disconnects');
    assert.equal(client.connection.socket_id, socketId);
    const p = h.waitForEvent(ch, 'Alive');
    await h.sdk(node).trigger(name, 'Alive', { ok: 1 });
    assert.deepEqual(await p, { ok: 1 });
  });

  it('a socket that keeps talking (client pings) is never closed', async () => {
    const { node } = ctx;
    const c = await h.rawClient(node);
    for (let i = 0; i < 8; i++) {
      await c.ping();
      await h.sleep(500);
    }
    assert.ok(c.isOpen);
  });
});
