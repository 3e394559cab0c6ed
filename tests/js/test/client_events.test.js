'use strict';
// Client events: Echo whisper on private and presence channels, refusal on public channels,
// per-app client_events policy and the per-connection rate limit.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({
  apps: [
    { id: 'app1' },
    { id: 'all', client_events: 'all' },
    { id: 'none', client_events: 'none' },
    { id: 'rl', client_event_rate: 5 },
  ],
}, 'client_events');

describe('client events', () => {
  it('Echo whisper on a private channel reaches the others, not the sender', async () => {
    const { node } = ctx;
    const chat = h.uniq('chat');
    const a = await h.echoClient(node);
    const b = await h.echoClient(node);
    const c = await h.echoClient(node);
    const subscribedAll = Promise.all([a, b, c].map((e) => h.withTimeout(new Promise((r) => e.private(chat).subscribed(r)), 3000, 'subscribed')));
    const gotB = [];
    const gotC = [];
    const gotA = [];
    a.private(chat).listenForWhisper('typing', (d) => gotA.push(d));
    b.private(chat).listenForWhisper('typing', (d) => gotB.push(d));
    c.private(chat).listenForWhisper('typing', (d) => gotC.push(d));
    await subscribedAll;
    a.private(chat).whisper('typing', { name: 'A', typing: true });
    await h.eventually(() => gotB.length === 1 && gotC.length === 1, { message: 'B and C get the whisper' });
    assert.deepEqual(gotB[0], { name: 'A', typing: true });
    assert.deepEqual(gotC[0], { name: 'A', typing: true });
    await h.sleep(400);
    assert.equal(gotA.length, 0, 'the sender must not get its own whisper');
    assert.equal(gotB.length, 1);
  });

  it('whisper on a presence channel carries the sender user_id and excludes the sender', async () => {
    const { node } = ctx;
    const app = node.app;
    const room = h.uniq('room');
    const name = `presence-${room}`;
    const a = await h.echoClient(node, app, { user: { user_id: 5, user_info: { id: 5 } } });
    const b = await h.echoClient(node, app, { user: { user_id: 6, user_info: { id: 6 } } });
    await Promise.all([a, b].map((e) => h.withTimeout(new Promise((r) => e.join(room).here(r)), 3000, 'here')));
    const raw = await h.rawClient(node);
    await raw.subscribe(name, h.rawAuth(app, raw.socketId, name, { user_id: 7 }));
    const gotA = [];
    const gotB = [];
    a.join(room).listenForWhisper('moved', (d) => gotA.push(d));
    b.join(room).listenForWhisper('moved', (d) => gotB.push(d));
    a.join(room).whisper('moved', { x: 10, y: 20 });
    const f = await raw.next('client-moved');
    assert.equal(f.channel, name);
    assert.strictEqual(f.msg.user_id, 5, `frame: ${f.raw}`);
    assert.deepEqual(f.data, { x: 10, y: 20 });
    await h.eventually(() => gotB.length === 1, { message: 'B gets the whisper' });
    assert.deepEqual(gotB[0], { x: 10, y: 20 });
    await h.sleep(300);
    assert.equal(gotA.length, 0);
  });

  it('client events on a public channel are refused with pusher:error by default (client_events = members)', async () => {
    const { node } = ctx;
    const name = h.uniq('public-');
    const sender = await h.rawClient(node);
    await sender.subscribe(name);
    const listener = h.pusherClient(node);
    const ch = await h.subscribed(listener, name);
    const seen = h.collect(ch, 'client-hi');
    sender.send({ event: 'client-hi', channel: name, data: { a: 1 } });
    const err = await sender.next('pusher:error');
    assert.equal(typeof err.data.message, 'string', err.raw);
    await h.sleep(300);
    assert.equal(seen.items.length, 0, 'a refused client event must not be delivered');
    // both keep working
    await sender.ping();
    const p = h.waitForEvent(ch, 'server');
    await h.sdk(node).trigger(name, 'server', { ok: true });
    assert.deepEqual(await p, { ok: true });
    await sender.next('server');
  });

  it('client events on a channel the sender is not subscribed to are not delivered', async () => {
    const { node } = ctx;
    const app = node.app;
    const name = h.uniq('private-notmine-');
    const member = await h.rawClient(node);
    await member.subscribe(name, h.rawAuth(app, member.socketId, name));
    const outsider = await h.rawClient(node);
    outsider.send({ event: 'client-sneak', channel: name, data: {} });
    await member.expectNone('client-sneak', 500);
    await outsider.ping();
  });

  it('client events must be named client-*: other names from the client are not relayed', async () => {
    const { node } = ctx;
    const app = node.app;
    const name = h.uniq('private-names-');
    const a = await h.rawClient(node);
    const b = await h.rawClient(node);
    await a.subscribe(name, h.rawAuth(app, a.socketId, name));
    await b.subscribe(name, h.rawAuth(app, b.socketId, name));
    a.send({ event: 'App\\Events\\Fake', channel: name, data: {} });
    a.send({ event: 'pusher_internal:member_added', channel: name, data: '{"user_id":"evil"}' });
    await b.expectNone((f) => f.event === 'App\\Events\\Fake' || f.event === 'pusher_internal:member_added', 500);
    await a.ping();
  });

  it('client events on private-encrypted channels are not relayed', async () => {
    const { node } = ctx;
    const app = node.app;
    const name = h.uniq('private-encrypted-ce-');
    const a = await h.rawClient(node);
    const b = await h.rawClient(node);
    await a.subscribe(name, h.rawAuth(app, a.socketId, name));
    await b.subscribe(name, h.rawAuth(app, b.socketId, name));
    a.send({ event: 'client-x', channel: name, data: { plain: 1 } });
    await b.expectNone('client-x', 500);
  });

  it('client_events = "all" relays client events on public channels too', async () => {
    const { node } = ctx;
    const app = node.apps.all;
    const name = h.uniq('open-');
    const a = await h.rawClient(node, app);
    const b = await h.rawClient(node, app);
    await a.subscribe(name);
    await b.subscribe(name);
    a.send({ event: 'client-hey', channel: name, data: { v: 1 } });
    const f = await b.next('client-hey');
    assert.deepEqual(f.data, { v: 1 });
    await a.expectNone('client-hey', 300);
  });

  it('client_events = "none" refuses whispers even on private channels', async () => {
    const { node } = ctx;
    const app = node.apps.none;
    const name = h.uniq('private-quiet-');
    const a = await h.rawClient(node, app);
    const b = await h.rawClient(node, app);
    await a.subscribe(name, h.rawAuth(app, a.socketId, name));
    await b.subscribe(name, h.rawAuth(app, b.socketId, name));
    a.send({ event: 'client-hey', channel: name, data: {} });
    await b.expectNone('client-hey', 500);
    await a.ping();
  });

  it('over client_event_rate per second: pusher:error 4301, the connection stays open and works after', async () => {
    const { node } = ctx;
    const app = node.apps.rl;
    const name = h.uniq('private-burst-');
    const sender = await h.rawClient(node, app);
    const listener = await h.rawClient(node, app);
    await sender.subscribe(name, h.rawAuth(app, sender.socketId, name));
    await listener.subscribe(name, h.rawAuth(app, listener.socketId, name));
    for (let i = 0; i < 20; i++) sender.send({ event: 'client-burst', channel: name, data: { i } });
    const err = await sender.next('pusher:error');
    assert.equal(err.data.code, 4301, err.raw);
    await h.sleep(500);
    const delivered = listener.frames.filter((f) => f.event === 'client-burst').length;
    assert.ok(delivered >= 1, 'events under the limit are delivered');
    assert.ok(delivered <= 10, `events over the limit must be dropped (delivered ${delivered} of 20 at a limit of 5/s)`);
    assert.ok(sender.isOpen, 'rate limiting must not close the connection');
    await sender.ping();
    await h.sleep(1200);
    sender.send({ event: 'client-after', channel: name, data: { ok: true } });
    const after = await listener.next('client-after');
    assert.deepEqual(after.data, { ok: true });
    await h.sdk(node, app).trigger(name, 'server-event', { s: 1 });
    await sender.next('server-event');
  });

  it('Echo whisper works end to end under the default rate limit (10 in one second are fine)', async () => {
    const { node } = ctx;
    const chat = h.uniq('steady');
    const a = await h.echoClient(node);
    const b = await h.echoClient(node);
    const got = [];
    await Promise.all([a, b].map((e) => h.withTimeout(new Promise((r) => e.private(chat).subscribed(r)), 3000, 'subscribed')));
    b.private(chat).listenForWhisper('tick', (d) => got.push(d.i));
    for (let i = 0; i < 8; i++) a.private(chat).whisper('tick', { i });
    await h.eventually(() => got.length === 8, { message: '8 whispers' });
    assert.deepEqual(got, [0, 1, 2, 3, 4, 5, 6, 7], 'in order');
  });
});
