'use strict';
// User authentication (signin), server-to-user messages and terminate_connections.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({ apps: [{ id: 'app1' }] }, 'users');

/** pusher-js client signed in as `id`, its #server-to-user channel subscribed. */
async function signedIn(node, id, extra = {}) {
  const client = h.pusherClient(node, node.app, { userData: { id, user_info: { name: id }, ...extra } });
  await h.connected(client);
  client.signin();
  await h.eventually(() => client.user.user_data && client.user.user_data.id === id, { message: `signin of ${id}` });
  await h.eventually(() => client.user.serverToUserChannel && client.user.serverToUserChannel.subscribed,
    { message: `#server-to-user-${id} subscribed` });
  return client;
}

async function rawSignedIn(node, id) {
  const c = await h.rawClient(node);
  const signin = h.rawSignin(node.app, c.socketId, { id });
  c.send({ event: 'pusher:signin', data: signin });
  const ok = await c.next((f) => f.event === 'pusher:signin_success' || f.event === 'pusher:error', 3000, 'signin answer');
  assert.equal(ok.event, 'pusher:signin_success', ok.raw);
  return { c, signin, ok };
}

describe('users', () => {
  it('pusher:signin answers signin_success with the user_data string', async () => {
    const { node } = ctx;
    const { signin, ok } = await rawSignedIn(node, 'u-raw');
    assert.equal(typeof ok.data.user_data, 'string', ok.raw);
    assert.deepEqual(JSON.parse(ok.data.user_data), JSON.parse(signin.user_data));
  });

  it('pusher-js signin() then sendToUser via the SDK reaches every connection of that user only', async () => {
    const { node } = ctx;
    const tab1 = await signedIn(node, 'alice');
    const tab2 = await signedIn(node, 'alice');
    const bob = await signedIn(node, 'bob');
    const p1 = h.waitForEvent(tab1.user, 'notify');
    const p2 = h.waitForEvent(tab2.user, 'notify');
    const bobSeen = h.collect(bob.user, 'notify');
    await h.sdk(node).sendToUser('alice', 'notify', { text: 'hi alice' });
    assert.deepEqual(await p1, { text: 'hi alice' });
    assert.deepEqual(await p2, { text: 'hi alice' });
    await h.sleep(300);
    assert.equal(bobSeen.items.length, 0, 'bob must not get alice\'s message');
  });

  it('another user cannot subscribe to #server-to-user-{id}', async () => {
    const { node } = ctx;
    const { c: bob } = await rawSignedIn(node, 'bob2');
    const f = await bob.subscribe('#server-to-user-carol');
    assert.equal(f.event, 'pusher:subscription_error', f.raw);
    const own = await bob.subscribe('#server-to-user-bob2');
    assert.equal(own.event, 'pusher_internal:subscription_succeeded', own.raw);
    // an anonymous connection cannot either
    const anon = await h.rawClient(node);
    const g = await anon.subscribe('#server-to-user-carol');
    assert.equal(g.event, 'pusher:subscription_error', g.raw);
    // and neither gets carol's messages
    const carol = await signedIn(node, 'carol');
    const pc = h.waitForEvent(carol.user, 'secret');
    await h.sdk(node).sendToUser('carol', 'secret', { s: 1 });
    await pc;
    await bob.expectNone('secret', 300);
    await anon.expectNone('secret', 0);
  });

  it('a signin with a bad signature does not sign the user in', async () => {
    const { node } = ctx;
    const c = await h.rawClient(node);
    const good = h.rawSignin(node.app, c.socketId, { id: 'mallory' });
    c.send({ event: 'pusher:signin', data: { auth: `${node.app.key}:${'f'.repeat(64)}`, user_data: good.user_data } });
    await c.expectNone('pusher:signin_success', 500);
    if (c.isOpen) {
      const f = await c.subscribe('#server-to-user-mallory');
      assert.equal(f.event, 'pusher:subscription_error', f.raw);
    }
  });

  it('a signin for another socket id is refused', async () => {
    const { node } = ctx;
    const c = await h.rawClient(node);
    c.send({ event: 'pusher:signin', data: h.rawSignin(node.app, '1.2', { id: 'replay' }) });
    await c.expectNone('pusher:signin_success', 500);
  });

  it('terminate_connections closes every socket of that user and leaves others open', async () => {
    const { node } = ctx;
    const dave1 = await signedIn(node, 'dave');
    const { c: dave2 } = await rawSignedIn(node, 'dave');
    const erin = await signedIn(node, 'erin');
    const { c: erinRaw } = await rawSignedIn(node, 'erin');
    const daveDropped = new Promise((resolve) => {
      dave1.connection.bind('state_change', ({ previous }) => { if (previous === 'connected') resolve(); });
    });
    const erinChanges = [];
    erin.connection.bind('state_change', (s) => erinChanges.push(s));
    const erinSocket = erin.connection.socket_id;

    const res = await h.sdkResult(h.sdk(node).terminateUserConnections('dave'));
    assert.equal(res.status, 200, res.text);
    const closed = await h.withTimeout(dave2.closed, 3000, 'raw socket of dave closed');
    assert.ok(closed.code >= 4000 && closed.code < 5000, `close code ${closed.code}`);
    await h.withTimeout(daveDropped, 3000, 'pusher-js socket of dave dropped');

    await h.sleep(500);
    assert.deepEqual(erinChanges, [], 'erin must stay connected');
    assert.equal(erin.connection.socket_id, erinSocket);
    assert.ok(erinRaw.isOpen);
    const pe = h.waitForEvent(erin.user, 'still-here');
    await h.sdk(node).sendToUser('erin', 'still-here', {});
    await pe;
    await erinRaw.ping();
  });

  it('terminate_connections for a user with no connections answers 200', async () => {
    const { node } = ctx;
    const res = await h.sdkResult(h.sdk(node).terminateUserConnections('nobody-here'));
    assert.equal(res.status, 200, res.text);
  });
});
