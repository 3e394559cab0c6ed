'use strict';
// belfry-node started from a Laravel app's own .env (--env-file), as a fresh Laravel 11 app
// with Reverb installed writes it: the path prefix, client events, warnings, cluster mode
// from REVERB_SCALING_ENABLED + REDIS_*, and Laravel's Redis broadcaster prefix.
const { describe, it, after, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const h = require('../lib/harness');
const { startReceiver } = require('../lib/webhook_receiver');

const APP = { id: '527364', key: 'p7wrd1yjsfqhmuxm1bbd', secret: 'kcmfqsx5xnuc0aoxtgyq' };

/** The shape of a fresh Laravel 11 `.env` after `php artisan install:broadcasting`. */
function laravelEnv({ port, extra = '' }) {
  return `APP_NAME="Acme Shop"
APP_ENV=local
APP_KEY=base64:2fl+Ktvkfl+Fuz4Qp/A75G2RTiWVA/ZoKZvp6fiiM10=
APP_DEBUG=true
APP_TIMEZONE=UTC
APP_URL=http://localhost

APP_LOCALE=en
APP_FALLBACK_LOCALE=en
APP_FAKER_LOCALE=en_US

APP_MAINTENANCE_DRIVER=file
# APP_MAINTENANCE_STORE=database

BCRYPT_ROUNDS=12

LOG_CHANNEL=stack
LOG_STACK=single
LOG_DEPRECATIONS_CHANNEL=null
LOG_LEVEL=debug

DB_CONNECTION=sqlite
# DB_HOST=127.0.0.1
# DB_PORT=3306

SESSION_DRIVER=database
SESSION_LIFETIME=120
SESSION_ENCRYPT=false
SESSION_PATH=/
SESSION_DOMAIN=null

BROADCAST_CONNECTION=reverb
FILESYSTEM_DISK=local
QUEUE_CONNECTION=database

CACHE_STORE=database
CACHE_PREFIX=

MEMCACHED_HOST=127.0.0.1

REDIS_CLIENT=phpredis
REDIS_HOST=127.0.0.1
REDIS_PASSWORD=null
REDIS_PORT=6379

MAIL_MAILER=log
MAIL_FROM_ADDRESS="hello@example.com"
MAIL_FROM_NAME="\${APP_NAME}"

VITE_APP_NAME="\${APP_NAME}"

REVERB_APP_ID=${APP.id}
REVERB_APP_KEY=${APP.key}
REVERB_APP_SECRET=${APP.secret}
REVERB_HOST="localhost"
REVERB_PORT=${port}
REVERB_SCHEME=http
REVERB_SERVER_PORT=${port}

VITE_REVERB_APP_KEY="\${REVERB_APP_KEY}"
VITE_REVERB_HOST="\${REVERB_HOST}"
VITE_REVERB_PORT="\${REVERB_PORT}"
VITE_REVERB_SCHEME="\${REVERB_SCHEME}"
${extra}`;
}

/** The test runner's environment without anything that would configure the node. */
function hermeticEnv(extra) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (/^(BELFRY_|REVERB_|REDIS_|APP_NAME$|BROADCAST_)/.test(k)) continue;
    env[k] = v;
  }
  return { RUST_LOG: 'info', ...env, ...extra };
}

const children = [];
const dirs = [];

function writeEnvFile(text) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'belfry-laravel-'));
  dirs.push(dir);
  const file = path.join(dir, '.env');
  fs.writeFileSync(file, text);
  return file;
}

function spawnTracked(bin, args, env) {
  const child = spawn(bin, args, { env: hermeticEnv(env), stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d) => { out += d; });
  child.stderr.on('data', (d) => { out += d; });
  children.push(child);
  return { child, output: () => out };
}

/** belfry-node with only `--env-file`; `env` is the process environment on top. */
async function startFromEnv(file, { port, pathPrefix = '', env = {} }) {
  const metricsPort = await h.freePort();
  const proc = spawnTracked(h.NODE_BIN, ['--env-file', file], { BELFRY_METRICS_PORT: String(metricsPort), ...env });
  const node = {
    ...proc,
    port,
    metricsPort,
    pathPrefix,
    app: APP,
    url: (p) => `http://${h.HOST}:${port}${p}`,
    wsUrl: (key, query = 'protocol=7&client=js&version=8.4.0&flash=false') => `ws://${h.HOST}:${port}${pathPrefix}/app/${key}?${query}`,
    metricsUrl: (p = '/metrics') => `http://${h.HOST}:${metricsPort}${p}`,
  };
  await h.eventually(async () => {
    assert.equal(proc.child.exitCode, null, `belfry-node exited:\n${proc.output()}`);
    const res = await fetch(node.url(`${pathPrefix}/up`));
    await res.text();
    return res.status === 200;
  }, { timeout: 15000, message: `belfry-node on ${port} from ${file}` });
  return node;
}

afterEach(() => h.cleanupClients());
after(async () => {
  await h.cleanupClients();
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

describe('a Laravel .env starts belfry-node', () => {
  it('serves under REVERB_SERVER_PATH, honours Reverb app options and names what it cannot honour', async () => {
    const port = await h.freePort();
    const file = writeEnvFile(laravelEnv({
      port,
      extra: 'REVERB_SERVER_PATH=/ws\nREVERB_APP_ACCEPT_CLIENT_EVENTS_FROM=all\nREVERB_SCALING_CHANNEL=reverb\nREVERB_PULSE_INGEST_INTERVAL=15\n',
    }));
    const node = await startFromEnv(file, { port, pathPrefix: '/ws' });
    assert.match(node.output(), /REVERB_SCALING_CHANNEL has no meaning/);
    assert.match(node.output(), /REVERB_PULSE_INGEST_INTERVAL is not honoured/);
    assert.match(node.output(), /embedded bus/, 'REVERB_SCALING_ENABLED is unset: one node');

    const name = h.uniq('orders-');
    const a = h.pusherClient(node);
    const b = h.pusherClient(node);
    const chA = await h.subscribed(a, name);
    const chB = await h.subscribed(b, name);

    // The server-side SDK's request signed with the .env's secret, under the path.
    const got = h.waitForEvent(chA, 'OrderShipped');
    const res = await h.signedRequest(node, APP, {
      method: 'POST', path: `/apps/${APP.id}/events`, body: { name: 'OrderShipped', channels: [name], data: '{"id":7}' },
    });
    assert.equal(res.status, 200, res.text);
    assert.deepEqual(await got, { id: 7 });

    // REVERB_APP_ACCEPT_CLIENT_EVENTS_FROM=all: whispers on a public channel reach the others.
    const whisper = h.waitForEvent(chA, 'client-typing');
    assert.equal(chB.trigger('client-typing', { who: 'b' }), true);
    assert.deepEqual(await whisper, { who: 'b' });

    const bare = await fetch(node.url(`/apps/${APP.id}/channels`));
    await bare.text();
    assert.equal(bare.status, 404, 'the API is served only under the path');
  });

  it('the process environment wins over the file', async () => {
    const port = await h.freePort();
    const file = writeEnvFile(laravelEnv({ port: 1 }));
    const node = await startFromEnv(file, { port, env: { REVERB_SERVER_PORT: String(port), REVERB_APP_SECRET: 'from-the-process' } });
    const app = { ...APP, secret: 'from-the-process' };
    const ok = await h.sdkResult(h.sdk(node, app).trigger('c', 'E', {}));
    assert.equal(ok.status, 200, ok.text);
    const stale = await h.sdkResult(h.sdk(node, APP).trigger('c', 'E', {}));
    assert.equal(stale.status, 401, 'the file secret was overridden');
  });

  it('REVERB_SCALING_ENABLED=true with REDIS_* runs a cluster, and warns until a coordinator leads', async () => {
    const redis = await h.startRedis();
    try {
      const portA = await h.freePort();
      const portB = await h.freePort();
      const file = writeEnvFile(laravelEnv({ port: portA, extra: 'REVERB_SCALING_ENABLED=true\n' })
        .replace('REDIS_PORT=6379', `REDIS_PORT=${redis.port}`));
      const nodeA = await startFromEnv(file, { port: portA });
      const nodeB = await startFromEnv(file, { port: portB, env: { REVERB_SERVER_PORT: String(portB) } });
      assert.match(nodeA.output(), /Redis bus/);

      const name = h.uniq('cluster-');
      const client = h.pusherClient(nodeA);
      const ch = await h.subscribed(client, name);
      const got = h.waitForEvent(ch, 'Ev');
      const res = await h.sdkResult(h.sdk(nodeB).trigger(name, 'Ev', { via: 'B' }));
      assert.equal(res.status, 200, res.text);
      assert.deepEqual(await got, { via: 'B' }, 'published on node B, delivered on node A');

      const leaderPresent = async (node) => h.metricValue((await h.getMetrics(node)).text, 'belfry_coordinator_leader_present');
      await h.eventually(async () => /no belfry-coordinator leads this cluster/.test(nodeA.output()),
        { timeout: 10000, message: 'a warning without a coordinator' });
      assert.equal(await leaderPresent(nodeA), 0);

      // The coordinator finds the same Redis from the same file.
      const coordMetrics = await h.freePort();
      spawnTracked(h.COORDINATOR_BIN, ['run', '--env-file', file, '--host', h.HOST, '--metrics-port', String(coordMetrics)], {});
      await h.eventually(async () => (await leaderPresent(nodeA)) === 1, { timeout: 15000, message: 'gauge 1 once a coordinator leads' });
    } finally {
      await redis.stop();
    }
  });

  it('BROADCAST_CONNECTION=redis: what Laravel PUBLISHes under its default prefix reaches clients', async () => {
    const redis = await h.startRedis();
    try {
      const port = await h.freePort();
      const file = writeEnvFile(laravelEnv({ port })
        .replace('BROADCAST_CONNECTION=reverb', 'BROADCAST_CONNECTION=redis')
        .replace('REDIS_PORT=6379', `REDIS_PORT=${redis.port}`));
      const node = await startFromEnv(file, { port });
      const name = h.uniq('laravel-');
      const client = h.pusherClient(node);
      const ch = await h.subscribed(client, name);
      const got = h.waitForEvent(ch, 'App\\Events\\OrderShipped');
      // Str::slug("Acme Shop") . "-database-" is Laravel's default Redis prefix.
      const payload = JSON.stringify({ event: 'App\\Events\\OrderShipped', data: { id: 9 }, socket: null });
      await h.eventually(async () => (await h.redisCommand(redis.port, 'PUBLISH', `acme-shop-database-${name}`, payload)) >= 1,
        { timeout: 5000, message: 'the node subscribed to the Laravel channel' });
      assert.deepEqual(await got, { id: 9 });
    } finally {
      await redis.stop();
    }
  });

  it('BELFRY_WEBHOOK_URL gives the .env app webhooks, on the nodes and the coordinator alike (docker-compose)', async () => {
    const redis = await h.startRedis();
    const receiver = await startReceiver(APP);
    try {
      const port = await h.freePort();
      const file = writeEnvFile(laravelEnv({ port, extra: 'REVERB_SCALING_ENABLED=true\n' })
        .replace('REDIS_PORT=6379', `REDIS_PORT=${redis.port}`));
      // As docker-compose passes them: the same variables to every process, empty ones unset.
      const hooks = { BELFRY_WEBHOOK_URL: receiver.url, BELFRY_WEBHOOK_EVENT_TYPES: 'channel_occupied,channel_vacated', BELFRY_WEBHOOK_GRACE_MS: '0' };
      const node = await startFromEnv(file, { port, env: hooks });
      const coordMetrics = await h.freePort();
      spawnTracked(h.COORDINATOR_BIN, ['run', '--env-file', file, '--host', h.HOST, '--metrics-port', String(coordMetrics)], hooks);

      const name = h.uniq('env-hook-');
      const client = await h.rawClient(node);
      await client.subscribe(name);
      await h.eventually(() => receiver.delivered().some((e) => e.channel === name), { timeout: 15000, message: 'channel_occupied through the coordinator' });
      client.send({ event: 'pusher:unsubscribe', data: { channel: name } });
      await h.eventually(() => receiver.delivered().filter((e) => e.channel === name).length === 2, { timeout: 10000, message: 'channel_vacated at once (grace 0)' });
      const cache = h.uniq('cache-env-');
      await client.subscribe(cache);
      await h.sleep(600);
      assert.deepEqual(receiver.delivered().filter((e) => e.channel === name).map((e) => e.name), ['channel_occupied', 'channel_vacated']);
      assert.ok(!receiver.delivered().some((e) => e.name === 'cache_miss'), 'BELFRY_WEBHOOK_EVENT_TYPES leaves cache_miss out');
      assert.ok(receiver.requests.length > 0 && receiver.requests.every((r) => r.valid), 'signed with the .env secret');
    } finally {
      await receiver.close();
      await redis.stop();
    }
  });
});
