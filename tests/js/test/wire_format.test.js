'use strict';
// Exact wire format of the server's frames: key order event, data, channel; data a JSON string.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({ apps: [{ id: 'app1' }] }, 'wire_format');

const keys = (f) => Object.keys(f.msg);

describe('wire format', () => {
  it('server frames keep Reverb key order and carry data as a JSON-encoded string', async () => {
    const { node } = ctx;
    const app = node.app;
    const pres = h.uniq('presence-wf-');
    const cache = h.uniq('cache-wf-');
    const a = await h.rawClient(node);
    assert.deepEqual(keys(a.establishedFrame), ['event', 'data']);
    await a.subscribe(pres, h.rawAuth(app, a.socketId, pres, { user_id: 'a' }));
    await a.subscribe(cache);
    a.send({ event: 'pusher:signin', data: h.rawSignin(app, a.socketId, { id: 'a' }) });
    await a.next('pusher:signin_success');
    a.send({ event: 'pusher:ping', data: {} });
    await a.next('pusher:pong');
    const b = await h.rawClient(node);
    await b.subscribe(pres, h.rawAuth(app, b.socketId, pres, { user_id: 'b' }));
    await a.next('pusher_internal:member_added');
    b.send({ event: 'client-hi', channel: pres, data: { x: 1 } });
    await a.next('client-hi');
    await b.close();
    await a.next('pusher_internal:member_removed');
    await h.sdk(node).trigger(pres, 'Server', { s: 1 });
    await a.next('Server');

    for (const f of a.frames) {
      assert.equal(f.dataIsString, true, `data must be a JSON string: ${f.raw}`);
      const k = keys(f);
      assert.deepEqual(k.slice(0, 2), ['event', 'data'], `key order: ${f.raw}`);
      if (f.channel !== undefined) assert.equal(k[2], 'channel', `key order: ${f.raw}`);
    }
    const seen = new Set(a.frames.map((f) => f.event));
    for (const ev of ['pusher:connection_established', 'pusher_internal:subscription_succeeded', 'pusher:cache_miss',
      'pusher:signin_success', 'pusher:pong', 'pusher_internal:member_added', 'client-hi', 'pusher_internal:member_removed', 'Server']) {
      assert.ok(seen.has(ev), `saw ${ev}`);
    }
  });
});
