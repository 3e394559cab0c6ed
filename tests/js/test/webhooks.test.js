'use strict';
// Webhooks on a single node: Pusher's format and signature (checked by the official `pusher`
// SDK), occupied/vacated once per edge, event-type and prefix filters, retries after refusals.
const { describe, it, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const h = require('../lib/harness');
const certs = require('../lib/certs');
const { startReceiver, percentiles } = require('../lib/webhook_receiver');

let node;
let receivers = [];
afterEach(async () => {
  await h.cleanupClients();
  if (node) { await node.stop(); node = null; }
  for (const r of receivers) await r.close();
  receivers = [];
});

// Exact edges: these tests check every transition, so no grace period (it has its own tests).
async function nodeWithHooks(hooks, appExtra = {}, nodeOptions = {}) {
  const app = { id: 'app1', key: 'app1-key', secret: 'app1-secret', webhook_grace_ms: 0, ...appExtra };
  const made = [];
  for (const hook of hooks) {
    const r = await startReceiver(app, hook);
    made.push(r);
    receivers.push(r);
  }
  node = await h.startNode({
    apps: [{ ...app, webhooks: hooks.map((hook, i) => ({ url: made[i].url, ...(hook.config || {}) })) }],
    ...nodeOptions,
  });
  return made;
}

describe('webhooks (single node)', () => {
  it('channel_occupied and channel_vacated: once per edge, Pusher format, valid signature', async () => {
    const [r] = await nodeWithHooks([{}]);
    const name = h.uniq('hook-');
    const samples = [];
    for (let round = 0; round < 5; round++) {
      const a = await h.rawClient(node);
      const b = await h.rawClient(node);
      const t0 = Date.now();
      await a.subscribe(name);
      await b.subscribe(name);
      await h.eventually(() => r.events().length === 2 * round + 1, { message: `occupied of round ${round}` });
      samples.push(r.events().at(-1).at - t0);
      a.send({ event: 'pusher:unsubscribe', data: { channel: name } });
      await a.ping();
      const t1 = Date.now();
      b.send({ event: 'pusher:unsubscribe', data: { channel: name } });
      await h.eventually(() => r.events().length === 2 * round + 2, { message: `vacated of round ${round}` });
      samples.push(r.events().at(-1).at - t1);
    }
    await h.sleep(300);
    assert.deepEqual(
      r.events().map((e) => `${e.name} ${e.channel}`),
      Array.from({ length: 10 }, (_, i) => `${i % 2 ? 'channel_vacated' : 'channel_occupied'} ${name}`),
    );
    for (const req of r.requests) {
      assert.equal(req.method, 'POST');
      assert.equal(req.valid, true, 'the pusher SDK accepts the signature');
      assert.equal(req.headers['x-pusher-key'], 'app1-key');
      assert.match(req.headers['content-type'], /^application\/json/);
      assert.match(req.headers['x-belfry-webhook-id'], /^[0-9a-f]{16}$/);
      assert.equal(typeof req.body.time_ms, 'number');
      for (const e of req.body.events) assert.deepEqual(Object.keys(e).sort(), ['channel', 'name']);
    }
    console.log(`# webhook latency single node (ms): ${JSON.stringify(percentiles(samples))}`);
  });

  it('member_added and member_removed: once per user however many tabs, with the user_id', async () => {
    const [r] = await nodeWithHooks([{ config: { event_types: ['member_added', 'member_removed'] } }]);
    const name = h.uniq('presence-hook-');
    const join = async (user) => {
      const c = await h.rawClient(node);
      const res = await c.subscribe(name, h.rawAuth(node.app, c.socketId, name, { user_id: user, user_info: {} }));
      assert.equal(res.event, 'pusher_internal:subscription_succeeded');
      return c;
    };
    const tab1 = await join('u1');
    const tab2 = await join('u1');
    await h.eventually(() => r.events().length === 1, { message: 'member_added u1' });
    const other = await join(42);
    await h.eventually(() => r.events().length === 2, { message: 'member_added 42' });
    tab1.send({ event: 'pusher:unsubscribe', data: { channel: name } });
    await tab1.ping();
    await h.sleep(300);
    assert.equal(r.events().length, 2, 'a second tab leaving is not a member_removed');
    tab2.close();
    await h.eventually(() => r.events().length === 3, { message: 'member_removed u1' });
    other.send({ event: 'pusher:unsubscribe', data: { channel: name } });
    await h.eventually(() => r.events().length === 4, { message: 'member_removed 42' });
    await h.sleep(300);
    assert.deepEqual(
      r.events().map((e) => `${e.name} ${e.channel} ${e.user_id}`),
      [`member_added ${name} u1`, `member_added ${name} 42`, `member_removed ${name} u1`, `member_removed ${name} 42`],
    );
    const ids = r.requests.map((q) => q.headers['x-belfry-webhook-id']);
    assert.equal(new Set(ids).size, ids.length, `batches of look-alike jobs have their own webhook ids: ${ids}`);
    for (const req of r.requests) {
      assert.equal(req.valid, true, 'the pusher SDK accepts the signature');
      for (const e of req.body.events) {
        assert.deepEqual(Object.keys(e).sort(), ['channel', 'name', 'user_id']);
        assert.equal(typeof e.user_id, 'string', 'Pusher sends user_id as a string');
      }
    }
  });

  it('client_event: the event, its data and the sender, with user_id on presence channels only', async () => {
    const [r] = await nodeWithHooks([{ config: { event_types: ['client_event'] } }]);
    const priv = h.uniq('private-hook-');
    const pres = h.uniq('presence-whisper-');
    const sender = await h.rawClient(node);
    const other = await h.rawClient(node);
    for (const c of [sender, other]) {
      assert.equal((await c.subscribe(priv, h.rawAuth(node.app, c.socketId, priv))).event, 'pusher_internal:subscription_succeeded');
      assert.equal((await c.subscribe(pres, h.rawAuth(node.app, c.socketId, pres, { user_id: c === sender ? 5 : 'six' }))).event, 'pusher_internal:subscription_succeeded');
    }
    sender.send({ event: 'client-typing', channel: priv, data: { who: 'ada' } });
    await other.next('client-typing');
    sender.send({ event: 'client-moved', channel: pres, data: { x: 1 } });
    await other.next('client-moved');
    await h.eventually(() => r.events().length === 2, { message: 'two client_event webhooks' });
    await h.sleep(300);
    const [typing, moved] = r.events();
    assert.deepEqual(
      { name: typing.name, channel: typing.channel, event: typing.event, data: JSON.parse(typing.data), socket_id: typing.socket_id },
      { name: 'client_event', channel: priv, event: 'client-typing', data: { who: 'ada' }, socket_id: sender.socketId },
    );
    assert.equal(typing.user_id, undefined, 'no user_id outside presence channels');
    assert.deepEqual(
      { name: moved.name, channel: moved.channel, event: moved.event, data: JSON.parse(moved.data), socket_id: moved.socket_id, user_id: moved.user_id },
      { name: 'client_event', channel: pres, event: 'client-moved', data: { x: 1 }, socket_id: sender.socketId, user_id: '5' },
    );
    assert.ok(r.requests.every((q) => q.valid), 'the pusher SDK accepts the signature');
  });

  it('cache_miss: a subscriber to an empty cache channel, none once an event is cached', async () => {
    const [r] = await nodeWithHooks([{ config: { event_types: ['cache_miss'] } }]);
    const name = h.uniq('cache-hook-');
    const first = await h.rawClient(node);
    await first.subscribe(name);
    await first.next('pusher:cache_miss');
    await h.eventually(() => r.events().length === 1, { message: 'cache_miss webhook' });
    await h.sdk(node).trigger(name, 'Price', { v: 1 });
    await first.next('Price');
    const late = await h.rawClient(node);
    await late.subscribe(name);
    await late.next('Price');
    await h.sleep(400);
    assert.deepEqual(r.events().map((e) => ({ name: e.name, channel: e.channel })), [{ name: 'cache_miss', channel: name }]);
    assert.ok(r.requests.every((q) => q.valid), 'the pusher SDK accepts the signature');
  });

  it('event_types and channel_prefixes pick what each URL gets', async () => {
    const [onlyVacated, onlyPresence] = await nodeWithHooks([
      { config: { event_types: ['channel_vacated'] } },
      { config: { channel_prefixes: ['presence-'] } },
    ]);
    const name = h.uniq('news-');
    const c = await h.rawClient(node);
    await c.subscribe(name);
    c.send({ event: 'pusher:unsubscribe', data: { channel: name } });
    await h.eventually(() => onlyVacated.events().length === 1, { message: 'vacated' });
    await h.sleep(300);
    assert.deepEqual(onlyVacated.events().map((e) => e.name), ['channel_vacated']);
    assert.equal(onlyPresence.requests.length, 0, 'a public channel is not a presence- channel');
  });

  it('a receiver that answers 500 three times, then 200, gets the batch once retries succeed', async () => {
    const [r] = await nodeWithHooks([{ respond: (n) => (n < 3 ? 500 : 200) }]);
    const name = h.uniq('retry-');
    const c = await h.rawClient(node);
    await c.subscribe(name);
    await h.eventually(() => r.accepted().length === 1, { timeout: 20000, message: 'delivered after three refusals' });
    assert.equal(r.requests.length, 4);
    assert.deepEqual(r.requests.map((q) => q.status), [500, 500, 500, 200]);
    // The same batch each time, with its own time and signature, and one id to deduplicate by.
    assert.equal(new Set(r.requests.map((q) => q.headers['x-belfry-webhook-id'])).size, 1);
    assert.equal(new Set(r.requests.map((q) => q.headers['x-pusher-signature'])).size, 4);
    assert.ok(r.requests.every((q) => q.valid));
    assert.deepEqual(r.requests.map((q) => q.body.events), Array(4).fill([{ name: 'channel_occupied', channel: name }]));
  });

  it('https:// URLs: the receiver\'s certificate is verified against SSL_CERT_FILE', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'belfry-hook-tls-'));
    const ca = certs.makeCa(dir);
    const tls = certs.makeServerCert(dir);
    const [r] = await nodeWithHooks([{ tls }], {}, { env: { SSL_CERT_FILE: ca } });
    assert.match(r.url, /^https:/);
    const name = h.uniq('tls-hook-');
    const c = await h.rawClient(node);
    await c.subscribe(name);
    await h.eventually(() => r.events().length === 1, { message: 'channel_occupied over https' });
    assert.deepEqual(r.events().map((e) => e.name), ['channel_occupied']);
    assert.ok(r.requests.every((q) => q.valid), 'the pusher SDK accepts the signature');
    await node.stop();
    await r.close();
    receivers = [];

    // A receiver whose certificate the node does not trust gets nothing, and the sockets do not wait.
    const other = certs.makeCa(dir, 'other');
    const [untrusted] = await nodeWithHooks([{ tls }], {}, { env: { SSL_CERT_FILE: other } });
    const d = await h.rawClient(node);
    assert.equal((await d.subscribe(h.uniq('tls-hook-'))).event, 'pusher_internal:subscription_succeeded');
    await h.eventually(() => /webhook refused/.test(node.output()) && /TLS: /.test(node.output()), { message: 'the TLS failure is logged' });
    assert.equal(untrusted.requests.length, 0, 'no request reaches an untrusted receiver');
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('grace period: a channel or user back within webhook_grace_ms sends neither edge; one that stays away sends it late', async () => {
    const grace = 1000;
    const [r] = await nodeWithHooks([{}], { webhook_grace_ms: grace });
    const name = h.uniq('presence-grace-');
    const join = async () => {
      const c = await h.rawClient(node);
      const res = await c.subscribe(name, h.rawAuth(node.app, c.socketId, name, { user_id: 'u1', user_info: {} }));
      assert.equal(res.event, 'pusher_internal:subscription_succeeded');
      return c;
    };
    let tab = await join();
    await h.eventually(() => r.events().length === 2, { message: 'occupied and member_added' });
    // A page reload, five times over, with jittered gaps well inside the grace period.
    for (let round = 0; round < 5; round++) {
      tab.close();
      await h.sleep(20 + Math.floor(Math.random() * 200));
      tab = await join();
    }
    await h.sleep(grace + 500);
    assert.deepEqual(r.events().map((e) => e.name).sort(), ['channel_occupied', 'member_added'], 'reloads inside the grace period send nothing');
    const left = Date.now();
    tab.close();
    await h.eventually(() => r.events().length === 4, { timeout: grace + 5000, message: 'member_removed and vacated after the grace period' });
    const late = r.events().slice(2);
    assert.deepEqual(late.map((e) => e.name).sort(), ['channel_vacated', 'member_removed']);
    for (const e of late) assert.ok(e.at - left >= grace - 50, `sent after the grace period: ${e.at - left} ms`);
    const { text } = await h.getMetrics(node);
    assert.equal(h.metricValue(text, 'belfry_webhook_debounced_total'), 20, 'five reloads: two pairs of edges each, left out');
  });

  it('grace period: a URL that wants only channel_vacated gets none for a reload, and a shutdown sends what is held', async () => {
    const [r] = await nodeWithHooks([{ config: { event_types: ['channel_vacated'] } }], { webhook_grace_ms: 2000 });
    const name = h.uniq('reload-');
    let c = await h.rawClient(node);
    await c.subscribe(name);
    c.close();
    await h.sleep(100);
    c = await h.rawClient(node);
    await c.subscribe(name);
    await h.sleep(2600);
    assert.equal(r.requests.length, 0, 'the reload was debounced, though this URL never wanted channel_occupied');
    // SIGTERM closes the client; the node sends the held vacated before it exits, grace or not.
    const stopping = Date.now();
    await node.stop(10000);
    node = null;
    assert.deepEqual(r.events().map((e) => `${e.name} ${e.channel}`), [`channel_vacated ${name}`]);
    assert.ok(r.events()[0].at - stopping < 2000 + 1500, 'sent at shutdown');
  });

  it('an app without webhooks and a broken URL do not slow the sockets', async () => {
    // Nothing listens on this port: every POST fails; subscriptions still succeed at once.
    node = await h.startNode({ apps: [{ id: 'app1', webhooks: [{ url: 'http://127.0.0.1:9/hook' }] }] });
    const c = await h.rawClient(node);
    for (let i = 0; i < 20; i++) {
      const sub = await c.subscribe(h.uniq('dead-'));
      assert.equal(sub.event, 'pusher_internal:subscription_succeeded');
    }
  });
});
