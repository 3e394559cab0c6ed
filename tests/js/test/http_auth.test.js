'use strict';
// HTTP API authentication and limits, with hand-signed requests.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({
  apps: [
    { id: 'app1' },
    { id: 'other' },
    { id: 'limits', max_payload_bytes: 1000, max_batch_size: 3, max_channels_per_trigger: 3 },
  ],
}, 'http_auth');

const now = () => Math.floor(Date.now() / 1000);

describe('HTTP API authentication', () => {
  it('a correctly hand-signed POST /events is accepted and delivered (signer sanity check)', async () => {
    const { node } = ctx;
    const name = h.uniq('signed-');
    const c = await h.rawClient(node);
    await c.subscribe(name);
    const res = await h.signedRequest(node, node.app, {
      method: 'POST', path: '/apps/app1/events', body: { name: 'Hand', channels: [name], data: '{"h":1}' },
    });
    assert.equal(res.status, 200, res.text);
    assert.deepEqual((await c.next('Hand')).data, { h: 1 });
  });

  it('a correctly hand-signed GET with extra query params is accepted', async () => {
    const { node } = ctx;
    const res = await h.signedRequest(node, node.app, {
      method: 'GET', path: '/apps/app1/channels', params: { filter_by_prefix: 'presence-', info: 'user_count' },
    });
    assert.equal(res.status, 200, res.text);
    assert.deepEqual(Object.keys(res.json), ['channels']);
  });

  const body = { name: 'X', channels: ['c'], data: '{}' };
  const cases = [
    ['a wrong signature', { signature: '0'.repeat(64) }],
    ['a signature made with another secret', { secret: 'not-the-secret' }],
    ['the key of another app (signed with its secret)', { key: 'other-key', secret: 'other-secret' }],
    ['an unknown key', { key: 'nobody-key' }],
    ['a timestamp 700 s old', { timestamp: now() - 700 }],
    ['a timestamp 700 s in the future', { timestamp: now() + 700 }],
    ['a body_md5 that does not match the body', { bodyMd5: h.md5Hex('something else') }],
    ['no auth_signature', { omit: ['auth_signature'] }],
    ['no auth_key', { omit: ['auth_key'] }],
    ['no auth_timestamp', { omit: ['auth_timestamp'] }],
    ['no body_md5 on a request with a body', { omit: ['body_md5'] }],
  ];
  for (const [what, opts] of cases) {
    it(`401 for ${what}`, async () => {
      const { node } = ctx;
      const res = await h.signedRequest(node, node.app, { method: 'POST', path: '/apps/app1/events', body, ...opts });
      assert.equal(res.status, 401, `${res.status} ${res.text}`);
      assert.ok(res.text.length > 0, 'the 401 carries a message');
    });
  }

  it('401 when the body is changed after signing', async () => {
    const { node } = ctx;
    const signedBody = JSON.stringify(body);
    const res = await h.signedRequest(node, node.app, {
      method: 'POST', path: '/apps/app1/events',
      body: JSON.stringify({ ...body, name: 'Tampered' }),
      bodyMd5: h.md5Hex(signedBody),
    });
    assert.equal(res.status, 401, res.text);
  });

  it('401 for a GET whose query was changed after signing', async () => {
    const { node } = ctx;
    const ts = now();
    const query = `auth_key=${node.app.key}&auth_timestamp=${ts}&auth_version=1.0&filter_by_prefix=a`;
    const sig = h.hmacHex(node.app.secret, `GET\n/apps/app1/channels\n${query}`);
    const tampered = query.replace('filter_by_prefix=a', 'filter_by_prefix=b');
    const res = await fetch(node.url(`/apps/app1/channels?${tampered}&auth_signature=${sig}`));
    assert.equal(res.status, 401, await res.text());
  });

  it('a timestamp 300 s off is still accepted', async () => {
    const { node } = ctx;
    const res = await h.signedRequest(node, node.app, { method: 'GET', path: '/apps/app1/channels', timestamp: now() - 300 });
    assert.equal(res.status, 200, res.text);
  });

  it('404 for an unknown app id', async () => {
    const { node } = ctx;
    const res = await h.signedRequest(node, node.app, { method: 'POST', path: '/apps/no-such-app/events', body });
    assert.equal(res.status, 404, res.text);
    const get = await h.signedRequest(node, node.app, { method: 'GET', path: '/apps/no-such-app/channels' });
    assert.equal(get.status, 404, get.text);
  });

  it('the SDK with a wrong secret gets 401', async () => {
    const { node } = ctx;
    const res = await h.sdkResult(h.sdk(node, { ...node.app, secret: 'wrong' }).trigger('c', 'e', {}));
    assert.equal(res.status, 401, res.text);
  });
});

describe('HTTP API limits and bad bodies', () => {
  it('400 for a body that is not JSON, or misses name/channels', async () => {
    const { node } = ctx;
    for (const b of ['{not json', '[]', JSON.stringify({ channels: ['a'], data: '{}' }), JSON.stringify({ name: 'x', data: '{}' })]) {
      const res = await h.signedRequest(node, node.app, { method: 'POST', path: '/apps/app1/events', body: b });
      assert.equal(res.status, 400, `${b} -> ${res.status} ${res.text}`);
    }
  });

  it('data up to max_payload_bytes is accepted, above it 413', async () => {
    const { node } = ctx;
    const app = node.apps.limits;
    const name = h.uniq('big-');
    const c = await h.rawClient(node, app);
    await c.subscribe(name);
    const ok = await h.sdkResult(h.sdk(node, app).trigger(name, 'Fits', 'x'.repeat(1000)));
    assert.equal(ok.status, 200, ok.text);
    await c.next('Fits');
    const tooBig = await h.sdkResult(h.sdk(node, app).trigger(name, 'TooBig', 'x'.repeat(1001)));
    assert.equal(tooBig.status, 413, tooBig.text);
    await c.expectNone('TooBig', 300);
  });

  it('a batch item over max_payload_bytes gives 413 and nothing of the batch is delivered', async () => {
    const { node } = ctx;
    const app = node.apps.limits;
    const name = h.uniq('bigbatch-');
    const c = await h.rawClient(node, app);
    await c.subscribe(name);
    const res = await h.sdkResult(h.sdk(node, app).triggerBatch([
      { channel: name, name: 'Small', data: 'ok' },
      { channel: name, name: 'Huge', data: 'y'.repeat(5000) },
    ]));
    assert.equal(res.status, 413, res.text);
    await c.expectNone((f) => f.event === 'Small' || f.event === 'Huge', 300);
  });

  it('a batch over max_batch_size is refused with a message and nothing delivered', async () => {
    const { node } = ctx;
    const app = node.apps.limits;
    const name = h.uniq('bigbatch-');
    const c = await h.rawClient(node, app);
    await c.subscribe(name);
    const batch = [1, 2, 3, 4].map((i) => ({ channel: name, name: `B${i}`, data: {} }));
    const res = await h.sdkResult(h.sdk(node, app).triggerBatch(batch));
    assert.ok(res.status === 400 || res.status === 413, `${res.status} ${res.text}`);
    assert.ok(res.text.length > 0, 'carries a message');
    await c.expectNone((f) => /^B\d$/.test(f.event || ''), 300);
    const ok = await h.sdkResult(h.sdk(node, app).triggerBatch(batch.slice(0, 3)));
    assert.equal(ok.status, 200, ok.text);
  });

  it('a trigger to more than max_channels_per_trigger channels is refused with a message', async () => {
    const { node } = ctx;
    const app = node.apps.limits;
    const names = [1, 2, 3, 4].map((i) => h.uniq(`many${i}-`));
    const c = await h.rawClient(node, app);
    await c.subscribe(names[0]);
    const res = await h.sdkResult(h.sdk(node, app).trigger(names, 'Many', {}));
    assert.ok(res.status === 400 || res.status === 413, `${res.status} ${res.text}`);
    assert.ok(res.text.length > 0, 'carries a message');
    await c.expectNone('Many', 300);
    const ok = await h.sdkResult(h.sdk(node, app).trigger(names.slice(0, 3), 'Many', {}));
    assert.equal(ok.status, 200, ok.text);
    await c.next('Many');
  });

  it('an invalid channel name in a trigger is refused with 400', async () => {
    const { node } = ctx;
    const res = await h.signedRequest(node, node.app, {
      method: 'POST', path: '/apps/app1/events', body: { name: 'E', channels: ['bad name'], data: '{}' },
    });
    assert.equal(res.status, 400, res.text);
  });

  it('after all the bad requests, publishing still works', async () => {
    const { node } = ctx;
    const name = h.uniq('after-');
    const c = h.pusherClient(node);
    const ch = await h.subscribed(c, name);
    const p = h.waitForEvent(ch, 'Fine');
    await h.sdk(node).trigger(name, 'Fine', { ok: 1 });
    assert.deepEqual(await p, { ok: 1 });
  });
});
