'use strict';
// Bad input on the WebSocket: malformed frames, unknown events, oversized frames, ping/pong.
// In every case a second, well-behaved pusher-js client keeps receiving events.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({ apps: [{ id: 'app1', max_message_bytes: 1024 }] }, 'malformed');

/** A pusher-js client on a fresh channel; check() proves it still gets events. */
async function watcher(node) {
  const name = h.uniq('watch-');
  const client = h.pusherClient(node);
  const ch = await h.subscribed(client, name);
  let n = 0;
  return {
    async check() {
      n += 1;
      const p = h.waitForEvent(ch, 'Tick', { filter: (d) => d.n === n });
      await h.sdk(node).trigger(name, 'Tick', { n });
      await p;
      assert.equal(client.connection.state, 'connected');
    },
  };
}

/** After bad input the bad socket either still answers pings or was closed with a real close frame. */
async function survivesOrClosesCleanly(c) {
  await h.sleep(200);
  if (c.isOpen) {
    try {
      await c.ping(2000);
      return 'open';
    } catch (e) {
      if (!c.closeInfo) throw e;
    }
  }
  const info = await h.withTimeout(c.closed, 2000, 'close');
  assert.notEqual(info.code, 1006, 'closed without a close frame (abnormal closure)');
  return `closed ${info.code}`;
}

describe('malformed input', () => {

  it('pusher:ping gets {"event":"pusher:pong","data":"{}"}', async () => {
    const { node } = ctx;
    const c = await h.rawClient(node);
    c.send({ event: 'pusher:ping', data: {} });
    const f = await c.next('pusher:pong');
    assert.equal(f.msg.data, '{}', `pong frame: ${f.raw}`);
    // data as a string, as some clients send it
    c.send('{"event":"pusher:ping","data":"{}"}');
    await c.next('pusher:pong');
    // and with no data at all
    c.send('{"event":"pusher:ping"}');
    await c.next('pusher:pong');
  });

  const badFrames = [
    ['text that is not JSON', 'hello{'],
    ['an empty frame', ''],
    ['a JSON array', '[1,2,3]'],
    ['JSON null', 'null'],
    ['a JSON string', '"pusher:ping"'],
    ['JSON without event', '{"data":{"channel":"x"}}'],
    ['a numeric event', '{"event":123,"data":{}}'],
    ['subscribe with numeric data', '{"event":"pusher:subscribe","data":123}'],
    ['subscribe with a numeric channel', '{"event":"pusher:subscribe","data":{"channel":5}}'],
    ['subscribe without channel', '{"event":"pusher:subscribe","data":{}}'],
    ['subscribe with data that is an unparsable string', '{"event":"pusher:subscribe","data":"{oops"}'],
    ['unsubscribe from a channel never joined', '{"event":"pusher:unsubscribe","data":{"channel":"never"}}'],
    ['an unknown pusher: event', '{"event":"pusher:fly_to_the_moon","data":{}}'],
    ['an unknown pusher_internal: event', '{"event":"pusher_internal:subscription_succeeded","channel":"x","data":"{}"}'],
    ['a client event without channel', '{"event":"client-x","data":{}}'],
    ['signin with garbage', '{"event":"pusher:signin","data":{"auth":5,"user_data":[]}}'],
    ['deeply nested JSON', `{"event":"x","data":${'['.repeat(200)}${']'.repeat(200)}}`],
  ];

  for (const [what, text] of badFrames) {
    it(`${what}: the server survives and other clients keep receiving`, async () => {
      const { node } = ctx;
      const w = await watcher(node);
      const c = await h.rawClient(node);
      c.send(text);
      const outcome = await survivesOrClosesCleanly(c);
      assert.ok(outcome, what);
      await w.check();
    });
  }

  it('a binary frame: the server survives and other clients keep receiving', async () => {
    const { node } = ctx;
    const w = await watcher(node);
    const c = await h.rawClient(node);
    c.send(Buffer.from([0, 1, 2, 255]));
    await survivesOrClosesCleanly(c);
    await w.check();
  });

  it('subscribe data given as a JSON string works like an object', async () => {
    const { node } = ctx;
    const name = h.uniq('strdata-');
    const c = await h.rawClient(node);
    c.send(JSON.stringify({ event: 'pusher:subscribe', data: JSON.stringify({ channel: name }) }));
    const f = await c.next('pusher_internal:subscription_succeeded');
    assert.equal(f.channel, name);
    await h.sdk(node).trigger(name, 'Ev', {});
    await c.next('Ev');
  });

  it('a frame over max_message_bytes closes that socket with 1009', async () => {
    const { node } = ctx;
    const w = await watcher(node);
    const c = await h.rawClient(node);
    const name = h.uniq('big-');
    await c.subscribe(name);
    c.send({ event: 'pusher:subscribe', data: { channel: name, pad: 'z'.repeat(2000) } });
    const info = await h.withTimeout(c.closed, 3000, 'close after an oversized frame');
    assert.equal(info.code, 1009, `close code ${info.code} ${info.reason}`);
    await w.check();
  });

  it('a frame just under max_message_bytes is accepted', async () => {
    const { node } = ctx;
    const c = await h.rawClient(node);
    const base = JSON.stringify({ event: 'pusher:ping', data: { pad: '' } });
    c.send(JSON.stringify({ event: 'pusher:ping', data: { pad: 'p'.repeat(1000 - base.length) } }));
    await c.next('pusher:pong');
  });

  it('a flood of garbage from one socket does not disturb another', async () => {
    const { node } = ctx;
    const w = await watcher(node);
    const c = await h.rawClient(node);
    for (let i = 0; i < 200; i++) c.send(i % 2 ? '{"event":' : '{"event":"pusher:nope","data":{}}');
    await survivesOrClosesCleanly(c);
    await w.check();
  });

  it('a socket that disappears without a close frame is cleaned up', async () => {
    const { node } = ctx;
    const w = await watcher(node);
    const name = h.uniq('drop-');
    const c = await h.rawClient(node);
    await c.subscribe(name);
    c.terminate();
    await h.eventually(async () => {
      const r = await h.sdkResult(h.sdk(node).get({ path: `/channels/${name}` }));
      return r.json && r.json.occupied === false;
    }, { timeout: 3000, message: 'channel vacated after TCP drop' });
    await w.check();
  });
});
