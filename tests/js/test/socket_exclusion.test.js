'use strict';
// socket_id exclusion (Laravel's toOthers()) through the SDK.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({ apps: [{ id: 'app1' }] }, 'socket_exclusion');

describe('socket_id exclusion', () => {
  it('trigger(..., {socket_id}) skips that socket only', async () => {
    const { node } = ctx;
    const name = h.uniq('excl-');
    const a = h.pusherClient(node);
    const b = h.pusherClient(node);
    const [ca, cb] = await Promise.all([h.subscribed(a, name), h.subscribed(b, name)]);
    const seenA = h.collect(ca, 'Saved');
    const pb = h.waitForEvent(cb, 'Saved');
    await h.sdk(node).trigger(name, 'Saved', { by: 'a' }, { socket_id: a.connection.socket_id });
    assert.deepEqual(await pb, { by: 'a' });
    await h.sleep(400);
    assert.equal(seenA.items.length, 0, 'the excluded socket must not receive the event');
    // the excluded socket still gets the next event
    const pa = h.waitForEvent(ca, 'Next');
    await h.sdk(node).trigger(name, 'Next', {});
    await pa;
  });

  it('Echo socketId() works with the SDK exclusion on a private channel', async () => {
    const { node } = ctx;
    const room = h.uniq('doc');
    const a = await h.echoClient(node);
    const b = await h.echoClient(node);
    const gotA = [];
    const gotB = [];
    await Promise.all([a, b].map((e) => h.withTimeout(new Promise((r) => e.private(room).subscribed(r)), 3000, 'subscribed')));
    a.private(room).listen('.DocumentSaved', (d) => gotA.push(d));
    b.private(room).listen('.DocumentSaved', (d) => gotB.push(d));
    await h.sdk(node).trigger(`private-${room}`, 'DocumentSaved', { v: 2 }, { socket_id: a.socketId() });
    await h.eventually(() => gotB.length === 1, { message: 'B receives' });
    await h.sleep(300);
    assert.equal(gotA.length, 0);
  });

  it('exclusion on a multi-channel trigger applies on every channel', async () => {
    const { node } = ctx;
    const c1 = h.uniq('m1-');
    const c2 = h.uniq('m2-');
    const a = await h.rawClient(node);
    const b = await h.rawClient(node);
    for (const c of [a, b]) { await c.subscribe(c1); await c.subscribe(c2); }
    await h.sdk(node).trigger([c1, c2], 'Multi', { m: 1 }, { socket_id: a.socketId });
    const got = [await b.next((f) => f.event === 'Multi'), await b.next((f) => f.event === 'Multi')];
    assert.deepEqual(got.map((f) => f.channel).sort(), [c1, c2].sort());
    await a.expectNone('Multi', 400);
  });

  it('exclusion in a batch applies per item', async () => {
    const { node } = ctx;
    const name = h.uniq('batch-excl-');
    const a = await h.rawClient(node);
    const b = await h.rawClient(node);
    await a.subscribe(name);
    await b.subscribe(name);
    await h.sdk(node).triggerBatch([
      { channel: name, name: 'One', data: { n: 1 }, socket_id: a.socketId },
      { channel: name, name: 'Two', data: { n: 2 } },
    ]);
    await b.next('One');
    await b.next('Two');
    await a.next('Two');
    await a.expectNone('One', 400);
  });

  it('a socket_id of a socket that does not exist excludes nobody', async () => {
    const { node } = ctx;
    const name = h.uniq('ghost-');
    const a = await h.rawClient(node);
    await a.subscribe(name);
    await h.sdk(node).trigger(name, 'Ev', {}, { socket_id: '999999.999999' });
    await a.next('Ev');
  });
});
