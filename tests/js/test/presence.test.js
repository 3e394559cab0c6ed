'use strict';
// Presence channels through Laravel Echo (here/joining/leaving) and raw frames.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({
  apps: [
    { id: 'app1' },
    { id: 'small', max_presence_members: 2, max_user_info_bytes: 100 },
  ],
}, 'presence');

const byId = (a, b) => String(a.id).localeCompare(String(b.id));

function presenceUser(id, name) {
  return { user: { user_id: id, user_info: { id, name } } };
}

describe('presence', () => {
  it('Echo here() lists the members, joining() and leaving() fire for others', async () => {
    const { node } = ctx;
    const room = h.uniq('room');
    const ann = await h.echoClient(node, node.app, presenceUser(1, 'Ann'));
    const joining = [];
    const leaving = [];
    const annHere = new Promise((resolve) => {
      ann.join(room).here(resolve).joining((u) => joining.push(u)).leaving((u) => leaving.push(u));
    });
    assert.deepEqual(await h.withTimeout(annHere, 3000, 'Ann here()'), [{ id: 1, name: 'Ann' }]);

    const bob = await h.echoClient(node, node.app, presenceUser(2, 'Bob'));
    const bobHere = new Promise((resolve) => bob.join(room).here(resolve));
    const members = await h.withTimeout(bobHere, 3000, 'Bob here()');
    assert.deepEqual([...members].sort(byId), [{ id: 1, name: 'Ann' }, { id: 2, name: 'Bob' }]);
    await h.eventually(() => joining.length === 1, { message: 'Ann sees Bob joining' });
    assert.deepEqual(joining[0], { id: 2, name: 'Bob' });

    bob.leave(room);
    await h.eventually(() => leaving.length === 1, { message: 'Ann sees Bob leaving' });
    assert.deepEqual(leaving[0], { id: 2, name: 'Bob' });
    await h.sleep(300);
    assert.equal(joining.length, 1, 'no extra joining events');
    assert.equal(leaving.length, 1, 'no extra leaving events');
  });

  it('a disconnecting member is announced as leaving', async () => {
    const { node } = ctx;
    const room = h.uniq('room');
    const ann = await h.echoClient(node, node.app, presenceUser('ann', 'Ann'));
    const leaving = [];
    await h.withTimeout(new Promise((r) => ann.join(room).here(r).leaving((u) => leaving.push(u))), 3000, 'here');
    const carl = await h.echoClient(node, node.app, presenceUser('carl', 'Carl'));
    await h.withTimeout(new Promise((r) => carl.join(room).here(r)), 3000, 'carl here');
    carl.disconnect();
    await h.eventually(() => leaving.length === 1, { message: 'leaving after disconnect' });
    assert.deepEqual(leaving[0], { id: 'carl', name: 'Carl' });
  });

  it('one user on two connections is one member: no second member_added, member_removed after both leave', async () => {
    const { node } = ctx;
    const app = node.app;
    const name = h.uniq('presence-tabs-');
    const observer = await h.rawClient(node);
    const so = await observer.subscribe(name, h.rawAuth(app, observer.socketId, name, { user_id: 'obs', user_info: { name: 'O' } }));
    assert.equal(so.event, 'pusher_internal:subscription_succeeded', so.raw);

    const user = { user_id: 'multi', user_info: { name: 'Multi' } };
    const tab1 = h.pusherClient(node, app, { user });
    await h.subscribed(tab1, name);
    const added = await observer.next('pusher_internal:member_added');
    assert.deepEqual(added.data, { user_id: 'multi', user_info: { name: 'Multi' } });

    const tab2 = h.pusherClient(node, app, { user });
    const ch2 = await h.subscribed(tab2, name);
    assert.equal(ch2.members.count, 2, 'two distinct users: obs and multi');
    await observer.expectNone('pusher_internal:member_added', 700);

    // counts over the HTTP API: 3 connections, 2 users
    const info = await h.sdkResult(h.sdk(node).get({ path: `/channels/${name}`, params: { info: 'user_count,subscription_count' } }));
    assert.equal(info.status, 200, info.text);
    assert.equal(info.json.occupied, true);
    assert.equal(info.json.user_count, 2);
    assert.equal(info.json.subscription_count, 3);

    tab1.disconnect();
    await observer.expectNone('pusher_internal:member_removed', 700);
    tab2.unsubscribe(name);
    const removed = await observer.next('pusher_internal:member_removed');
    assert.equal(removed.channel, name);
    assert.deepEqual(removed.data, { user_id: 'multi' });
  });

  it('integer user ids keep their JSON type in member events', async () => {
    const { node } = ctx;
    const app = node.app;
    const name = h.uniq('presence-ints-');
    const observer = await h.rawClient(node);
    await observer.subscribe(name, h.rawAuth(app, observer.socketId, name, { user_id: 1 }));

    const echo = await h.echoClient(node, app, presenceUser(42, 'Answer'));
    const members = await h.withTimeout(new Promise((r) => echo.join(name.slice('presence-'.length)).here(r)), 3000, 'here');
    assert.equal(members.length, 2);

    const added = await observer.next('pusher_internal:member_added');
    assert.strictEqual(added.data.user_id, 42, `member_added frame: ${added.raw}`);
    assert.deepEqual(added.data.user_info, { id: 42, name: 'Answer' });

    const str = await h.rawClient(node);
    await str.subscribe(name, h.rawAuth(app, str.socketId, name, { user_id: '007' }));
    const added2 = await observer.next('pusher_internal:member_added');
    assert.strictEqual(added2.data.user_id, '007', `member_added frame: ${added2.raw}`);

    const late = await h.rawClient(node);
    const sub = await late.subscribe(name, h.rawAuth(app, late.socketId, name, { user_id: 99 }));
    assert.equal(sub.data.presence.count, 4);
    assert.ok('42' in sub.data.presence.hash, sub.raw);
    assert.ok(sub.data.presence.ids.map(String).includes('42'), sub.raw);

    echo.disconnect();
    const removed = await observer.next('pusher_internal:member_removed');
    assert.strictEqual(removed.data.user_id, 42, `member_removed frame: ${removed.raw}`);
  });

  it('the presence member cap refuses a new user but not another tab of a member', async () => {
    const { node } = ctx;
    const app = node.apps.small;
    const name = h.uniq('presence-cap-');
    const join = async (userId) => {
      const c = await h.rawClient(node, app);
      return c.subscribe(name, h.rawAuth(app, c.socketId, name, { user_id: userId }));
    };
    assert.equal((await join('a')).event, 'pusher_internal:subscription_succeeded');
    assert.equal((await join('b')).event, 'pusher_internal:subscription_succeeded');
    const third = await join('c');
    assert.equal(third.event, 'pusher:subscription_error', third.raw);
    const secondTab = await join('a');
    assert.equal(secondTab.event, 'pusher_internal:subscription_succeeded', secondTab.raw);
  });

  it('user_info over max_user_info_bytes is refused', async () => {
    const { node } = ctx;
    const app = node.apps.small;
    const name = h.uniq('presence-big-');
    const c = await h.rawClient(node, app);
    const f = await c.subscribe(name, h.rawAuth(app, c.socketId, name, { user_id: 'big', user_info: { bio: 'x'.repeat(300) } }));
    assert.equal(f.event, 'pusher:subscription_error', f.raw);
    await c.ping();
  });
});
