'use strict';
// Connecting: handshake, refused connections (unknown key, origin, per-app quota).
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({
  apps: [
    { id: 'app1' },
    { id: 'slow', activity_timeout: 45 },
    { id: 'origin', allowed_origins: ['*.allowed.test'] },
    { id: 'quota', max_connections: 2 },
  ],
}, 'connection');

describe('connection', () => {
  it('sends pusher:connection_established with a socket_id and activity_timeout (data is a JSON string)', async () => {
    const { node } = ctx;
    const c = new h.RawClient(node.wsUrl(node.apps.app1.key));
    const f = await c.next(() => true, 3000, 'first frame');
    assert.equal(f.event, 'pusher:connection_established', `first frame: ${f.raw}`);
    assert.equal(f.dataIsString, true, 'data must be a JSON-encoded string');
    assert.match(f.data.socket_id, /^\d+\.\d+$/);
    assert.equal(f.data.activity_timeout, 30);
    assert.equal(f.channel, undefined);
  });

  it('uses the app activity_timeout and gives every connection its own socket_id', async () => {
    const { node } = ctx;
    const a = await h.rawClient(node, node.apps.slow);
    const b = await h.rawClient(node, node.apps.slow);
    assert.equal(a.activityTimeout, 45);
    assert.notEqual(a.socketId, b.socketId);
  });

  it('pusher-js connects and reports a socket_id', async () => {
    const { node } = ctx;
    const client = h.pusherClient(node);
    const socketId = await h.connected(client);
    assert.match(socketId, /^\d+\.\d+$/);
  });

  it('accepts a connection without the protocol parameter (old clients)', async () => {
    const { node } = ctx;
    const c = new h.RawClient(node.wsUrl(node.app.key, 'client=js&version=8.4.0'));
    await c.established();
    await c.ping();
  });

  it('refuses an unknown key with pusher:error 4001 then close code 4001', async () => {
    const { node } = ctx;
    const c = new h.RawClient(node.wsUrl('no-such-key'));
    const f = await c.next('pusher:error');
    assert.equal(f.data.code, 4001);
    assert.equal(typeof f.data.message, 'string');
    const closed = await h.withTimeout(c.closed, 3000, 'close after 4001');
    assert.equal(closed.code, 4001);
    assert.ok(!c.frames.some((x) => x.event === 'pusher:connection_established'));
  });

  it('pusher-js does not get connected with an unknown key', async () => {
    const { node } = ctx;
    const client = h.pusherClient(node, { id: 'x', key: 'no-such-key', secret: 's' });
    const states = [];
    client.connection.bind('state_change', ({ current }) => states.push(current));
    await h.sleep(1500);
    assert.ok(!states.includes('connected'), `states: ${states.join(',')}`);
  });

  it('refuses an origin that is not allowed with 4009', async () => {
    const { node } = ctx;
    const app = node.apps.origin;
    const c = new h.RawClient(node.wsUrl(app.key), { origin: 'http://evil.test' });
    const f = await c.next('pusher:error');
    assert.equal(f.data.code, 4009);
    const closed = await h.withTimeout(c.closed, 3000, 'close after 4009');
    assert.equal(closed.code, 4009);
  });

  it('accepts an origin matching the wildcard', async () => {
    const { node } = ctx;
    const app = node.apps.origin;
    for (const origin of ['http://app.allowed.test', 'https://www.allowed.test:8443']) {
      const c = new h.RawClient(node.wsUrl(app.key), { origin });
      await c.established();
      await c.ping();
    }
  });

  it('an app with allowed_origins ["*"] (default) accepts any origin', async () => {
    const { node } = ctx;
    const c = new h.RawClient(node.wsUrl(node.apps.app1.key), { origin: 'http://anything.example' });
    await c.established();
  });

  it('refuses the connection over the app quota with 4004 and admits again after one leaves', async () => {
    const { node } = ctx;
    const app = node.apps.quota;
    const a = await h.rawClient(node, app);
    const b = await h.rawClient(node, app);
    const c = new h.RawClient(node.wsUrl(app.key));
    const f = await c.next('pusher:error');
    assert.equal(f.data.code, 4004);
    const closed = await h.withTimeout(c.closed, 3000, 'close after 4004');
    assert.equal(closed.code, 4004);
    // the admitted ones still work
    await a.ping();
    await b.ping();
    // another app is not affected by this app's quota
    await h.rawClient(node, node.apps.app1);
    // after one leaves, a new connection is admitted
    await a.close();
    await h.eventually(async () => {
      const d = new h.RawClient(node.wsUrl(app.key));
      const first = await d.next(() => true, 2000);
      if (first.event === 'pusher:connection_established') return true;
      await d.close();
      return false;
    }, { timeout: 3000, interval: 200, message: 'admission after a slot is freed' });
  });
});
