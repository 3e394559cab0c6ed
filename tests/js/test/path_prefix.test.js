'use strict';
// A server path prefix in front of /app and /apps; the API signature covers the path without it.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({ apps: [{ id: 'app1' }], pathPrefix: '/ws' }, 'path_prefix');

describe('path prefix', () => {
  it('pusher-js connects under the prefix and receives an event published under the prefix', async () => {
    const { node } = ctx;
    const name = h.uniq('pref-');
    const client = h.pusherClient(node);
    const ch = await h.subscribed(client, name);
    const p = h.waitForEvent(ch, 'Ev');
    const res = await h.signedRequest(node, node.app, {
      method: 'POST', path: '/apps/app1/events', body: { name: 'Ev', channels: [name], data: '{"p":1}' },
    });
    assert.equal(res.status, 200, res.text);
    assert.deepEqual(await p, { p: 1 });
  });

  it('the WebSocket is not served without the prefix', async () => {
    const { node } = ctx;
    const c = new h.RawClient(`ws://127.0.0.1:${node.port}/app/${node.app.key}?protocol=7`);
    const outcome = await Promise.race([
      c.opened.then(() => c.next('pusher:connection_established', 1500).then(() => 'established', () => 'no handshake')),
      c.closed.then(() => 'closed'),
    ]).catch(() => 'refused');
    assert.notEqual(outcome, 'established');
  });
});
