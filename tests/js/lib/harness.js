'use strict';
// Test harness for the belfry-node end-to-end suite: starts the real binary (and redis-server for
// cluster tests), builds real pusher-js / Laravel Echo / Pusher SDK clients against it, and offers
// raw WebSocket and hand-signed HTTP helpers for the protocol-level tests.

const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const PusherJS = require('pusher-js');
const PusherSDK = require('pusher');
const WebSocket = require('ws');

const REPO_ROOT = path.resolve(__dirname, '..', '..', '..');
const NODE_BIN = process.env.BELFRY_NODE_BIN || path.join(REPO_ROOT, 'target', 'release', 'belfry-node');
const HOST = '127.0.0.1';

// ---------------------------------------------------------------------------------------------
// small utilities

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A free TCP port on 127.0.0.1 (bind to 0, read it, release it). */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, HOST, () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Rejects with `message` after `ms` unless `promise` settles first. */
function withTimeout(promise, ms, message) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timeout after ${ms} ms: ${message}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Polls `fn` until it returns a truthy value (returned) or `ms` passes (throws). */
async function eventually(fn, { timeout = 3000, interval = 50, message = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timeout after ${timeout} ms waiting for ${message}; last: ${last instanceof Error ? last.message : JSON.stringify(last)}`);
    }
    await sleep(interval);
  }
}

function hmacHex(secret, text) {
  return crypto.createHmac('sha256', secret).update(text).digest('hex');
}

function md5Hex(text) {
  return crypto.createHash('md5').update(text).digest('hex');
}

function uniq(prefix = 'c') {
  return `${prefix}${Date.now().toString(36)}${crypto.randomBytes(3).toString('hex')}`;
}

// ---------------------------------------------------------------------------------------------
// TOML config

function tomlValue(v) {
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'number' || typeof v === 'bigint') return String(v);
  if (typeof v === 'boolean') return v ? 'true' : 'false';
  if (Array.isArray(v)) return `[${v.map(tomlValue).join(', ')}]`;
  throw new Error(`cannot encode ${typeof v} as TOML`);
}

function toToml(top, apps) {
  const lines = [];
  for (const [k, v] of Object.entries(top)) {
    if (v === undefined || v === null) continue;
    lines.push(`${k} = ${tomlValue(v)}`);
  }
  for (const app of apps) {
    lines.push('', '[[apps]]');
    const { webhooks, ...scalars } = app;
    for (const [k, v] of Object.entries(scalars)) {
      if (v === undefined || v === null) continue;
      lines.push(`${k} = ${tomlValue(v)}`);
    }
    for (const hook of webhooks || []) {
      lines.push('[[apps.webhooks]]');
      for (const [k, v] of Object.entries(hook)) lines.push(`${k} = ${tomlValue(v)}`);
    }
  }
  return lines.join('\n') + '\n';
}

/** Fills an app definition: key and secret derive from the id unless given. */
function makeApp(def) {
  const app = typeof def === 'string' ? { id: def } : { ...def };
  if (!app.id) throw new Error('app needs an id');
  app.key = app.key || `${app.id}-key`;
  app.secret = app.secret || `${app.id}-secret`;
  return app;
}

// ---------------------------------------------------------------------------------------------
// processes

const liveProcesses = new Set();
function killAllChildren() {
  for (const p of liveProcesses) {
    try { p.kill('SIGKILL'); } catch { /* already gone */ }
  }
}
process.on('exit', killAllChildren);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.once(sig, () => { killAllChildren(); process.exit(130); });
}

function captureOutput(child, limit = 256 * 1024) {
  const out = { text: '' };
  const add = (chunk) => {
    out.text += chunk.toString();
    if (out.text.length > limit) out.text = out.text.slice(-limit);
  };
  if (child.stdout) child.stdout.on('data', add);
  if (child.stderr) child.stderr.on('data', add);
  return out;
}

function waitExit(child, ms) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(false), ms);
    child.once('exit', () => { clearTimeout(t); resolve(true); });
  });
}

async function stopChild(child, graceMs) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  if (!(await waitExit(child, graceMs))) {
    child.kill('SIGKILL');
    await waitExit(child, 5000);
  }
}

/** Environment for a child with every BELFRY_/REVERB_ variable of ours removed (hermetic runs). */
function cleanEnv(extra = {}) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (k.startsWith('BELFRY_') || k.startsWith('REVERB_')) continue;
    env[k] = v;
  }
  if (!env.RUST_LOG) env.RUST_LOG = 'info';
  return { ...env, ...extra };
}

/**
 * Starts belfry-node with a generated TOML config.
 * options: apps (array of app defs or ids), node (extra top-level settings), redisUrl, args, env,
 *          pathPrefix, metrics (default true), readyTimeout, fdLimit (RLIMIT_NOFILE for the node),
 *          tls (true when node sets tls_cert/tls_key: https:// and wss:// URLs).
 * Returns { port, metricsPort, apps: {id: app}, app (first), url(), wsUrl(), output(), stop(), kill() }.
 */
async function startNode(options = {}) {
  if (!fs.existsSync(NODE_BIN)) {
    throw new Error(`belfry-node binary not found at ${NODE_BIN}; build it (cargo build --release -p belfry-node) or set BELFRY_NODE_BIN`);
  }
  const apps = (options.apps || ['app1']).map(makeApp);
  const port = options.port || await freePort();
  const metricsPort = options.metrics === false ? 0 : (options.metricsPort || await freePort());
  const pathPrefix = options.pathPrefix || '';
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'belfry-e2e-'));
  const configFile = path.join(dir, 'belfry.toml');
  const top = {
    host: HOST,
    port,
    metrics_port: metricsPort,
    path_prefix: pathPrefix,
    shutdown_grace_secs: 2,
    // The suites put up to ~1,200 connections on one loopback address, far
    // past what one client address may do in production: lift the per-address
    // limits unless a test sets them (undefined = the server's defaults).
    max_connections_per_ip: 0,
    connections_per_ip_per_minute: 0,
    ...(options.node || {}),
  };
  // The SDK-side encryption key is not server config.
  const serverApps = apps.map(({ encryptionMasterKeyBase64, ...rest }) => rest);
  fs.writeFileSync(configFile, toToml(top, serverApps));

  const args = ['--config', configFile, ...(options.redisUrl ? ['--redis-url', options.redisUrl] : []), ...(options.args || [])];
  // fdLimit: run under a lower RLIMIT_NOFILE (prlimit execs the node, so the pid is the node's).
  const [cmd, cmdArgs] = options.fdLimit
    ? ['prlimit', [`--nofile=${options.fdLimit}`, '--', NODE_BIN, ...args]]
    : [NODE_BIN, args];
  const child = spawn(cmd, cmdArgs, {
    env: cleanEnv({ BELFRY_LOG_FORMAT: 'pretty', ...(options.env || {}) }),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  liveProcesses.add(child);
  child.once('exit', () => liveProcesses.delete(child));
  const out = captureOutput(child);

  const node = {
    child,
    pid: child.pid,
    configFile,
    port,
    metricsPort,
    pathPrefix,
    configFile,
    dir,
    apps: Object.fromEntries(apps.map((a) => [a.id, a])),
    app: apps[0],
    output: () => out.text,
    url: (p) => `${options.tls ? 'https' : 'http'}://${HOST}:${port}${p}`,
    metricsUrl: (p = '/metrics') => `http://${HOST}:${metricsPort}${p}`,
    wsUrl: (key, query = 'protocol=7&client=js&version=8.4.0&flash=false') =>
      `${options.tls ? 'wss' : 'ws'}://${HOST}:${port}${pathPrefix}/app/${key}${query ? `?${query}` : ''}`,
    get alive() { return child.exitCode === null && child.signalCode === null; },
    async stop(graceMs = 4000) {
      await stopChild(child, graceMs);
      fs.rmSync(dir, { recursive: true, force: true });
    },
    async kill() {
      if (node.alive) child.kill('SIGKILL');
      await waitExit(child, 5000);
    },
  };

  const deadline = Date.now() + (options.readyTimeout || 15000);
  for (;;) {
    if (!node.alive) {
      throw new Error(`belfry-node exited early (code ${child.exitCode}, signal ${child.signalCode}). Config:\n${fs.readFileSync(configFile, 'utf8')}\nOutput:\n${out.text}`);
    }
    try {
      // tls: the main port wants the test CA, which fetch cannot be given; the metrics port is plain.
      const res = await fetch(options.tls ? node.metricsUrl('/healthz') : node.url(`${pathPrefix}/up`));
      if (res.status === 200) { await res.text(); break; }
      await res.text();
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) {
      await stopChild(child, 1000);
      throw new Error(`belfry-node did not answer GET /up within the timeout. Output:\n${out.text}`);
    }
    await sleep(50);
  }
  return node;
}

/** Starts a throwaway redis-server on a free port (no persistence). */
async function startRedis(options = {}) {
  const port = options.port || await freePort();
  const redis = {
    port,
    url: `redis://${HOST}:${port}`,
    child: null,
    out: null,
    output: () => (redis.out ? redis.out.text : ''),
    async start() {
      const child = spawn('redis-server', ['--port', String(port), '--bind', HOST, '--save', '', '--appendonly', 'no'], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      liveProcesses.add(child);
      child.once('exit', () => liveProcesses.delete(child));
      redis.child = child;
      redis.out = captureOutput(child);
      await eventually(async () => (await redisPing(port)) === '+PONG', {
        timeout: 10000,
        message: `redis-server on ${port}`,
      });
      return redis;
    },
    async stop() { await stopChild(redis.child, 3000); },
    async kill() {
      if (redis.child && redis.child.exitCode === null) redis.child.kill('SIGKILL');
      await waitExit(redis.child, 5000);
    },
    async restart() { await redis.stop(); await redis.start(); },
  };
  return redis.start();
}

function redisPing(port) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, HOST);
    let buf = '';
    sock.setTimeout(1000, () => { sock.destroy(); reject(new Error('redis ping timeout')); });
    sock.on('error', reject);
    sock.on('connect', () => sock.write('PING\r\n'));
    sock.on('data', (d) => {
      buf += d.toString();
      if (buf.includes('\r\n')) { sock.end(); resolve(buf.trim()); }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// clients: tracked so each test can close what it opened

const openClients = new Set();

function track(client, close) {
  const entry = { client, close };
  openClients.add(entry);
  return entry;
}

/** Closes every client (pusher-js, Echo, raw) opened since the last call. */
async function cleanupClients() {
  const entries = [...openClients];
  openClients.clear();
  for (const e of entries) {
    try { await e.close(); } catch { /* ignore */ }
  }
}

/** A fixed 32-byte encryption master key per app id (SDK side only). */
function masterKeyFor(app) {
  return app.encryptionMasterKeyBase64 || crypto.createHash('sha256').update(`master-${app.id}`).digest('base64');
}

/** Pusher server SDK pointed at the node. */
function sdk(node, app = node.app, extra = {}) {
  return new PusherSDK({
    appId: app.id,
    key: app.key,
    secret: app.secret,
    host: HOST,
    port: String(node.port),
    useTLS: false,
    encryptionMasterKeyBase64: masterKeyFor(app),
    timeout: 10000,
    ...extra,
  });
}

/**
 * pusher-js client connected to the node. Channel authorization and user authentication are
 * computed locally with the Pusher SDK (no Laravel app).
 * opts: user ({user_id, user_info}) for presence, userData ({id, ...}) for signin,
 *       badAuth (true or (channelName) => bool) to sign with a wrong secret, authorize(override),
 *       pusherOptions (merged into the pusher-js options), connect (default true).
 */
function pusherClient(node, app = node.app, opts = {}) {
  const signer = sdk(node, app);
  const wrongSigner = sdk(node, { ...app, secret: `${app.secret}-wrong` });
  const channelAuthorization = {
    customHandler: ({ socketId, channelName }, callback) => {
      try {
        if (opts.authorize) return callback(null, opts.authorize(socketId, channelName));
        const bad = typeof opts.badAuth === 'function' ? opts.badAuth(channelName) : !!opts.badAuth;
        const s = bad ? wrongSigner : signer;
        const presence = channelName.startsWith('presence-') ? (opts.user || { user_id: `u-${socketId}` }) : undefined;
        callback(null, s.authorizeChannel(socketId, channelName, presence));
      } catch (e) {
        callback(e, null);
      }
    },
  };
  const userAuthentication = {
    customHandler: ({ socketId }, callback) => {
      try {
        if (!opts.userData) throw new Error('no userData given for signin');
        callback(null, signer.authenticateUser(socketId, opts.userData));
      } catch (e) {
        callback(e, null);
      }
    },
  };
  const client = new PusherJS(app.key, {
    wsHost: HOST,
    wsPort: node.port,
    wssPort: node.port,
    wsPath: node.pathPrefix || '',
    forceTLS: false,
    enabledTransports: ['ws'],
    disableStats: true,
    cluster: 'mt1',
    channelAuthorization,
    userAuthentication,
    ...(opts.pusherOptions || {}),
  });
  track(client, () => client.disconnect());
  return client;
}

/** Resolves when the pusher-js client is connected (returns its socket_id). */
function connected(client, timeout = 5000) {
  if (client.connection.state === 'connected') return Promise.resolve(client.connection.socket_id);
  return withTimeout(new Promise((resolve, reject) => {
    const onChange = ({ current }) => {
      if (current === 'connected') {
        client.connection.unbind('state_change', onChange);
        resolve(client.connection.socket_id);
      } else if (current === 'failed') {
        client.connection.unbind('state_change', onChange);
        reject(new Error('pusher-js connection failed'));
      }
    };
    client.connection.bind('state_change', onChange);
  }), timeout, 'pusher-js connected');
}

/** Subscribes a pusher-js client and resolves with the channel once subscription_succeeded arrives. */
function subscribed(client, name, timeout = 5000) {
  const channel = client.subscribe(name);
  if (channel.subscribed) return Promise.resolve(channel);
  return withTimeout(new Promise((resolve, reject) => {
    const ok = () => { off(); resolve(channel); };
    const err = (e) => { off(); const er = new Error(`subscription_error on ${name}: ${JSON.stringify(e)}`); er.data = e; reject(er); };
    const off = () => { channel.unbind('pusher:subscription_succeeded', ok); channel.unbind('pusher:subscription_error', err); };
    channel.bind('pusher:subscription_succeeded', ok);
    channel.bind('pusher:subscription_error', err);
  }), timeout, `subscription to ${name}`);
}

/** Resolves with the data of the next `event` on a pusher-js emitter (channel, connection, user). */
function waitForEvent(target, event, { timeout = 3000, filter } = {}) {
  return withTimeout(new Promise((resolve) => {
    const handler = (data, meta) => {
      if (filter && !filter(data, meta)) return;
      target.unbind(event, handler);
      resolve(data);
    };
    target.bind(event, handler);
  }), timeout, `event ${event}`);
}

/** Collects every `event` on a pusher-js emitter into an array (returns { items, stop }). */
function collect(target, event) {
  const items = [];
  const handler = (data, meta) => items.push({ data, meta });
  target.bind(event, handler);
  return { items, stop: () => target.unbind(event, handler) };
}

/** Throws if `event` fires on the pusher-js emitter within `ms`. */
async function expectNoEvent(target, event, ms = 500) {
  const seen = [];
  const handler = (data) => seen.push(data);
  target.bind(event, handler);
  await sleep(ms);
  target.unbind(event, handler);
  if (seen.length) throw new Error(`expected no ${event} within ${ms} ms, got ${JSON.stringify(seen)}`);
}

let EchoClass;
/** Laravel Echo (ESM package, loaded lazily) wrapping a pusher-js client built by pusherClient(). */
async function echoClient(node, app = node.app, opts = {}) {
  if (!EchoClass) EchoClass = (await import('laravel-echo')).default;
  const client = opts.client || pusherClient(node, app, opts);
  const echo = new EchoClass({
    broadcaster: opts.broadcaster || 'reverb',
    key: app.key,
    wsHost: HOST,
    wsPort: node.port,
    forceTLS: false,
    enabledTransports: ['ws'],
    client,
  });
  track(echo, () => echo.disconnect());
  await connected(client);
  return echo;
}

// ---------------------------------------------------------------------------------------------
// raw WebSocket client

function parseFrame(text) {
  let msg;
  try { msg = JSON.parse(text); } catch { return { raw: text, invalid: true }; }
  const frame = { raw: text, msg, event: msg && msg.event, channel: msg && msg.channel, dataIsString: typeof (msg && msg.data) === 'string' };
  frame.data = msg ? msg.data : undefined;
  if (frame.dataIsString) {
    try { frame.data = JSON.parse(msg.data); } catch { /* keep the string */ }
  }
  return frame;
}

class RawClient {
  constructor(url, { origin, headers, wsOptions } = {}) {
    this.url = url;
    this.frames = [];
    this.cursor = 0;
    this.waiters = [];
    this.closeInfo = null;
    this.ws = new WebSocket(url, { origin, headers, ...(wsOptions || {}) });
    this.opened = new Promise((resolve, reject) => {
      this.ws.once('open', resolve);
      this.ws.once('error', reject);
      this.ws.once('unexpected-response', (req, res) => reject(new Error(`HTTP ${res.statusCode} on upgrade`)));
    });
    this.opened.catch(() => {});
    this.closed = new Promise((resolve) => {
      this.ws.once('close', (code, reason) => {
        this.closeInfo = { code, reason: reason.toString() };
        resolve(this.closeInfo);
        this._notify();
      });
    });
    this.ws.on('error', () => {});
    this.ws.on('message', (data, isBinary) => {
      const frame = isBinary ? { raw: data, binary: true } : parseFrame(data.toString());
      frame.at = Date.now();
      this.frames.push(frame);
      this._notify();
    });
    track(this, () => this.close());
  }

  _notify() {
    for (const w of [...this.waiters]) w();
  }

  /** Next not-yet-taken frame matching `pred` (any frame received so far counts). */
  next(pred = () => true, timeout = 3000, what = 'frame') {
    const p = typeof pred === 'string' ? ((f) => f.event === pred) : pred;
    const label = typeof pred === 'string' ? pred : what;
    return withTimeout(new Promise((resolve, reject) => {
      const check = () => {
        for (let i = 0; i < this.frames.length; i++) {
          const f = this.frames[i];
          if (!f.taken && p(f)) {
            f.taken = true;
            this.waiters = this.waiters.filter((w) => w !== check);
            resolve(f);
            return;
          }
        }
        if (this.closeInfo) {
          this.waiters = this.waiters.filter((w) => w !== check);
          reject(new Error(`socket closed (${this.closeInfo.code} ${this.closeInfo.reason}) while waiting for ${label}; frames: ${this.describe()}`));
        }
      };
      this.waiters.push(check);
      check();
    }), timeout, `${label} on ${this.url}; frames so far: ${this.describe()}`);
  }

  /** Throws if a frame matching `pred` arrives (or already arrived untaken) within `ms`. */
  async expectNone(pred, ms = 500) {
    const p = typeof pred === 'string' ? ((f) => f.event === pred) : pred;
    await sleep(ms);
    const bad = this.frames.filter((f) => !f.taken && p(f));
    if (bad.length) throw new Error(`unexpected frame(s): ${bad.map((f) => f.raw).join(' | ')}`);
  }

  describe() {
    return this.frames.slice(-10).map((f) => (f.binary ? '<binary>' : f.raw)).join(' | ') || '(none)';
  }

  send(obj) {
    this.ws.send(typeof obj === 'string' || Buffer.isBuffer(obj) ? obj : JSON.stringify(obj));
  }

  /** Waits for pusher:connection_established and records the socket id. */
  async established(timeout = 3000) {
    const f = await this.next('pusher:connection_established', timeout);
    this.socketId = f.data.socket_id;
    this.activityTimeout = f.data.activity_timeout;
    this.establishedFrame = f;
    return f;
  }

  /** Sends pusher:subscribe and resolves with the subscription_succeeded or *error frame. */
  async subscribe(channel, extra = {}, timeout = 3000) {
    const from = this.frames.length;
    this.send({ event: 'pusher:subscribe', data: { channel, ...extra } });
    return this.next(
      (f) => this.frames.indexOf(f) >= from && ((f.event === 'pusher_internal:subscription_succeeded' && f.channel === channel) ||
        (f.event === 'pusher:subscription_error' && (f.channel === channel || f.channel === undefined)) ||
        f.event === 'pusher:error'),
      timeout,
      `subscription result for ${channel}`,
    );
  }

  async ping(timeout = 3000) {
    this.send({ event: 'pusher:ping', data: {} });
    return this.next('pusher:pong', timeout);
  }

  get isOpen() { return this.ws.readyState === WebSocket.OPEN; }

  close() {
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) {
      try { this.ws.close(1000); } catch { /* ignore */ }
      setTimeout(() => { try { this.ws.terminate(); } catch { /* ignore */ } }, 500).unref();
    }
    return Promise.race([this.closed, sleep(1000)]);
  }

  terminate() { this.ws.terminate(); }
}

/** Raw client on the app's key, after connection_established. */
async function rawClient(node, app = node.app, options = {}) {
  const c = new RawClient(node.wsUrl(options.key || app.key, options.query), options);
  await c.established(options.timeout || 3000);
  return c;
}

/** Auth fields for a raw subscribe (private/presence/encrypted), signed with the app secret. */
function rawAuth(app, socketId, channel, channelData) {
  const data = channelData === undefined ? undefined : (typeof channelData === 'string' ? channelData : JSON.stringify(channelData));
  const sig = hmacHex(app.secret, data === undefined ? `${socketId}:${channel}` : `${socketId}:${channel}:${data}`);
  const out = { auth: `${app.key}:${sig}` };
  if (data !== undefined) out.channel_data = data;
  return out;
}

/** Data for a raw pusher:signin. */
function rawSignin(app, socketId, userData) {
  const ud = typeof userData === 'string' ? userData : JSON.stringify(userData);
  return { auth: `${app.key}:${hmacHex(app.secret, `${socketId}::user::${ud}`)}`, user_data: ud };
}

// ---------------------------------------------------------------------------------------------
// HTTP

/**
 * A hand-signed API request. opts: method, path (without prefix, e.g. /apps/app1/events),
 * params (extra query), body (object or string), key, secret, timestamp, bodyMd5 (override),
 * signature (override), omit (list of auth params to leave out).
 */
async function signedRequest(node, app, opts) {
  const method = (opts.method || 'GET').toUpperCase();
  const body = opts.body === undefined ? undefined : (typeof opts.body === 'string' ? opts.body : JSON.stringify(opts.body));
  const params = {
    auth_key: opts.key || app.key,
    auth_timestamp: String(opts.timestamp !== undefined ? opts.timestamp : Math.floor(Date.now() / 1000)),
    auth_version: '1.0',
    ...(opts.params || {}),
  };
  if (body) params.body_md5 = opts.bodyMd5 !== undefined ? opts.bodyMd5 : md5Hex(body);
  for (const k of opts.omit || []) delete params[k];
  const query = Object.keys(params).sort().map((k) => `${k.toLowerCase()}=${params[k]}`).join('&');
  const signature = opts.signature || hmacHex(opts.secret || app.secret, `${method}\n${opts.path}\n${query}`);
  const qs = opts.omit && opts.omit.includes('auth_signature') ? query : `${query}&auth_signature=${signature}`;
  const res = await fetch(node.url(`${node.pathPrefix || ''}${opts.path}?${qs}`), {
    method,
    body,
    headers: body ? { 'content-type': 'application/json' } : {},
  });
  const text = await res.text();
  let json;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: res.status, text, json, headers: res.headers };
}

/** Runs an SDK call and returns { status, json, text } whether it succeeded or failed. */
async function sdkResult(promise) {
  try {
    const res = await promise;
    const text = await res.text();
    let json;
    try { json = JSON.parse(text); } catch { /* not JSON */ }
    return { status: res.status, json, text };
  } catch (e) {
    if (e && e.status) {
      let json;
      try { json = JSON.parse(e.body); } catch { /* not JSON */ }
      return { status: e.status, json, text: e.body || '' };
    }
    throw e;
  }
}

/** Status of GET /readyz on a node's metrics port, or `error ...` when it does not answer in 1.5 s. */
async function readyz(node) {
  try {
    const res = await fetch(node.metricsUrl('/readyz'), { signal: AbortSignal.timeout(1500) });
    await res.text();
    return res.status;
  } catch (e) {
    return `error ${e.message}`;
  }
}

async function getMetrics(node) {
  const res = await fetch(node.metricsUrl('/metrics'));
  return { status: res.status, text: await res.text() };
}

/** Value of a Prometheus sample whose labels include every pair in `labels` (undefined if absent). */
function metricValue(text, name, labels = {}) {
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)/);
    if (!m || m[1] !== name) continue;
    const have = {};
    for (const lm of (m[3] || '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) have[lm[1]] = lm[2];
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) return Number(m[4]);
  }
  return undefined;
}

/**
 * Registers node:test hooks for a file: one node for the whole file, clients closed after each
 * test, the node stopped at the end. Its output is kept in $BELFRY_E2E_LOG_DIR (default
 * <tmp>/belfry-e2e-logs) so a failure can be read against the server's log.
 */
function useNode(options = {}, label = 'node') {
  const { before, after, afterEach } = require('node:test');
  const ctx = {};
  before(async () => { ctx.node = await startNode(options); });
  afterEach(() => cleanupClients());
  after(async () => {
    await cleanupClients();
    if (!ctx.node) return;
    await ctx.node.stop();
    saveLog(ctx.node, label);
  });
  return ctx;
}

function saveLog(node, label) {
  try {
    const dir = process.env.BELFRY_E2E_LOG_DIR || path.join(os.tmpdir(), 'belfry-e2e-logs');
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, `${label}.log`), node.output());
  } catch { /* best effort */ }
}

// ---------------------------------------------------------------------------------------------
// cluster mode: coordinator, Redis Cluster, RESP, TCP proxy, whole clusters

const { execFile } = require('node:child_process');

const COORDINATOR_BIN = process.env.BELFRY_COORDINATOR_BIN || path.join(REPO_ROOT, 'target', 'release', 'belfry-coordinator');

function requireCoordinatorBin() {
  if (!fs.existsSync(COORDINATOR_BIN)) {
    throw new Error(`belfry-coordinator binary not found at ${COORDINATOR_BIN}; build it (cargo build --release -p belfry-coordinator) or set BELFRY_COORDINATOR_BIN`);
  }
}

/** Encodes one command as a RESP array of bulk strings. */
function respEncode(args) {
  const parts = [`*${args.length}\r\n`];
  const bufs = [];
  for (const a of args) {
    const b = Buffer.isBuffer(a) ? a : Buffer.from(String(a));
    bufs.push(Buffer.from(`$${b.length}\r\n`), b, Buffer.from('\r\n'));
  }
  return Buffer.concat([Buffer.from(parts.join('')), ...bufs]);
}

/** Parses one RESP value from `buf` at `pos`; returns { value, pos } or null if incomplete. Errors become Error objects. */
function respParse(buf, pos = 0) {
  if (pos >= buf.length) return null;
  const eol = buf.indexOf('\r\n', pos);
  if (eol < 0) return null;
  const type = String.fromCharCode(buf[pos]);
  const line = buf.toString('utf8', pos + 1, eol);
  const next = eol + 2;
  switch (type) {
    case '+': return { value: line, pos: next };
    case '-': return { value: new Error(line), pos: next };
    case ':': return { value: Number(line), pos: next };
    case '$': {
      const len = Number(line);
      if (len < 0) return { value: null, pos: next };
      if (buf.length < next + len + 2) return null;
      return { value: buf.toString('utf8', next, next + len), pos: next + len + 2 };
    }
    case '*': {
      const n = Number(line);
      if (n < 0) return { value: null, pos: next };
      const out = [];
      let p = next;
      for (let i = 0; i < n; i++) {
        const r = respParse(buf, p);
        if (!r) return null;
        out.push(r.value);
        p = r.pos;
      }
      return { value: out, pos: p };
    }
    default: throw new Error(`unexpected RESP type ${JSON.stringify(type)}`);
  }
}

/**
 * Runs one Redis command on 127.0.0.1:`port` over a fresh connection and resolves with its reply
 * (a Redis error reply rejects). Example: redisCommand(port, 'PUBLISH', 'chan', 'msg').
 */
function redisCommand(port, ...args) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, HOST);
    let buf = Buffer.alloc(0);
    const fail = (e) => { sock.destroy(); reject(e); };
    sock.setTimeout(3000, () => fail(new Error(`redis ${args[0]} on ${port}: timeout`)));
    sock.on('error', fail);
    sock.on('connect', () => sock.write(respEncode(args)));
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      let r;
      try { r = respParse(buf); } catch (e) { fail(e); return; }
      if (!r) return;
      sock.end();
      if (r.value instanceof Error) reject(new Error(`redis ${args.join(' ')}: ${r.value.message}`));
      else resolve(r.value);
    });
  });
}

/**
 * Starts a local Redis Cluster of `masters` masters (no replicas) on free ports, each node's
 * cluster bus on its own free port (`cluster-port`, Redis 7+). Fails with a clear message when
 * redis-server lacks cluster support. Returns { ports, url (redis-cluster://...), stop(), kill(), output() }.
 */
async function startRedisCluster(masters = 3, options = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'belfry-rc-'));
  const members = [];
  const cluster = {
    dir,
    members,
    ports: [],
    output: () => members.map((m) => `--- redis ${m.port}\n${m.out.text}`).join('\n'),
    async stop() {
      await Promise.all(members.map((m) => stopChild(m.child, 3000)));
      fs.rmSync(dir, { recursive: true, force: true });
    },
    async kill() {
      for (const m of members) if (m.child.exitCode === null) m.child.kill('SIGKILL');
      await Promise.all(members.map((m) => waitExit(m.child, 5000)));
    },
  };
  try {
    for (let i = 0; i < masters; i++) {
      const port = await freePort();
      let busPort = await freePort();
      while (busPort === port) busPort = await freePort();
      const args = [
        '--port', String(port), '--bind', HOST, '--save', '', '--appendonly', 'no', '--dir', dir,
        '--cluster-enabled', 'yes', '--cluster-config-file', `nodes-${port}.conf`, '--cluster-port', String(busPort),
        '--cluster-node-timeout', String(options.nodeTimeoutMs || 5000),
      ];
      const child = spawn('redis-server', args, { stdio: ['ignore', 'pipe', 'pipe'] });
      liveProcesses.add(child);
      child.once('exit', () => liveProcesses.delete(child));
      const member = { port, busPort, child, out: captureOutput(child) };
      members.push(member);
      cluster.ports.push(port);
      const started = Date.now();
      for (;;) {
        if (child.exitCode !== null || child.signalCode !== null) {
          throw new Error(`redis-server does not support cluster mode here (cluster-enabled/cluster-port need Redis 7+; exit ${child.exitCode}):\n${member.out.text}`);
        }
        try { if ((await redisPing(port)) === '+PONG') break; } catch { /* not yet */ }
        if (Date.now() - started > 10000) throw new Error(`redis-server (cluster) on ${port} did not answer PING:\n${member.out.text}`);
        await sleep(50);
      }
      const mode = await redisCommand(port, 'INFO', 'cluster');
      if (!/cluster_enabled:1/.test(mode)) throw new Error(`redis-server on ${port} started without cluster support: ${mode}`);
    }
    const create = await new Promise((resolve) => {
      execFile('redis-cli', ['--cluster', 'create', ...cluster.ports.map((p) => `${HOST}:${p}`), '--cluster-replicas', '0', '--cluster-yes'],
        { timeout: 30000 }, (err, stdout, stderr) => resolve({ err, stdout, stderr }));
    });
    if (create.err) throw new Error(`redis-cli --cluster create failed: ${create.err.message}\n${create.stdout}\n${create.stderr}`);
    await eventually(async () => {
      for (const p of cluster.ports) {
        const info = await redisCommand(p, 'CLUSTER', 'INFO');
        if (!/cluster_state:ok/.test(info) || !/cluster_known_nodes:(\d+)/.test(info) || Number(info.match(/cluster_known_nodes:(\d+)/)[1]) !== masters) return false;
      }
      return true;
    }, { timeout: 20000, interval: 100, message: 'Redis Cluster state ok on every node' });
  } catch (e) {
    await cluster.kill();
    fs.rmSync(dir, { recursive: true, force: true });
    throw e;
  }
  const [first, ...rest] = cluster.ports;
  cluster.url = `redis-cluster://${HOST}:${first}?${rest.map((p) => `node=${HOST}:${p}`).join('&')}`;
  return cluster;
}

/**
 * Starts `belfry-coordinator run`. options: redisUrl (required), redisPrefix, metricsPort,
 * sweepIntervalMs, leaderTtlMs, instanceId, args, env, readyTimeout.
 * Returns { child, pid, metricsPort, metricsUrl(), output(), alive, leader() (0/1 from
 * belfry_coordinator_leader), metrics(), stop(), kill(), terminate() }.
 */
async function startCoordinator(options = {}) {
  requireCoordinatorBin();
  if (!options.redisUrl) throw new Error('startCoordinator needs redisUrl');
  const metricsPort = options.metricsPort || await freePort();
  const args = ['run', '--redis-url', options.redisUrl, '--host', HOST, '--metrics-port', String(metricsPort)];
  if (options.redisPrefix) args.push('--redis-prefix', options.redisPrefix);
  if (options.sweepIntervalMs) args.push('--sweep-interval-ms', String(options.sweepIntervalMs));
  if (options.leaderTtlMs) args.push('--leader-ttl-ms', String(options.leaderTtlMs));
  if (options.instanceId) args.push('--instance-id', options.instanceId);
  args.push(...(options.args || []));
  const child = spawn(COORDINATOR_BIN, args, {
    env: cleanEnv({ BELFRY_LOG_FORMAT: 'pretty', ...(options.env || {}) }),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  liveProcesses.add(child);
  child.once('exit', () => liveProcesses.delete(child));
  const out = captureOutput(child);
  const coord = {
    child,
    pid: child.pid,
    metricsPort,
    args,
    instanceId: options.instanceId,
    output: () => out.text,
    metricsUrl: (p = '/metrics') => `http://${HOST}:${metricsPort}${p}`,
    get alive() { return child.exitCode === null && child.signalCode === null; },
    async metrics() {
      const res = await fetch(coord.metricsUrl('/metrics'), { signal: AbortSignal.timeout(2000) });
      return res.text();
    },
    /** belfry_coordinator_leader (0/1), or undefined if the metric is missing or the process is gone. */
    async leader() {
      if (!coord.alive) return undefined;
      try { return metricValue(await coord.metrics(), 'belfry_coordinator_leader'); } catch { return undefined; }
    },
    async stop(graceMs = 5000) { await stopChild(child, graceMs); },
    async kill() {
      if (coord.alive) child.kill('SIGKILL');
      await waitExit(child, 5000);
    },
    terminate() { if (coord.alive) child.kill('SIGTERM'); },
  };
  const deadline = Date.now() + (options.readyTimeout || 15000);
  for (;;) {
    if (!coord.alive) throw new Error(`belfry-coordinator exited early (code ${child.exitCode}, signal ${child.signalCode}); args ${args.join(' ')}\nOutput:\n${out.text}`);
    try {
      const res = await fetch(coord.metricsUrl('/healthz'), { signal: AbortSignal.timeout(1000) });
      await res.text();
      if (res.status === 200) break;
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) {
      await stopChild(child, 1000);
      throw new Error(`belfry-coordinator did not answer /healthz on ${metricsPort}. Output:\n${out.text}`);
    }
    await sleep(50);
  }
  return coord;
}

/**
 * `belfry-coordinator publish`: options redisUrl, app, channel, event, data (string or object,
 * objects are JSON-encoded), socketId, redisPrefix. Resolves { code, stdout, stderr }.
 */
function coordinatorPublish(options) {
  requireCoordinatorBin();
  const data = typeof options.data === 'string' ? options.data : JSON.stringify(options.data);
  const args = ['publish', '--redis-url', options.redisUrl, '--app', options.app, '--channel', options.channel, '--event', options.event, '--data', data];
  if (options.socketId) args.push('--socket-id', options.socketId);
  if (options.redisPrefix) args.push('--redis-prefix', options.redisPrefix);
  return new Promise((resolve) => {
    execFile(COORDINATOR_BIN, args, { timeout: 15000, env: cleanEnv() }, (err, stdout, stderr) => {
      resolve({ code: err ? (err.code === undefined ? -1 : err.code) : 0, stdout: String(stdout), stderr: String(stderr), error: err });
    });
  });
}

/**
 * A tiny TCP load balancer on a free port. `targets` are belfry nodes (or {port, readyUrl}); a new
 * connection goes to the first target whose /readyz answered 200 at the last check (every 100 ms),
 * falling back to the next one if connecting fails. Existing connections are piped as they are.
 * Returns a node-like object ({ port, pathPrefix, app, apps, url(), wsUrl() } from the first
 * target) so pusherClient(proxy) works, plus { connections, routed: [port...], close() }.
 */
async function startProxy(targets, options = {}) {
  const port = await freePort();
  const list = targets.map((t) => ({
    port: t.port,
    readyUrl: t.readyUrl || (t.metricsUrl ? t.metricsUrl('/readyz') : undefined),
    healthy: true,
  }));
  const sockets = new Set();
  const base = targets[0];
  const proxy = {
    ...(base.apps ? { apps: base.apps, app: base.app } : {}),
    port,
    pathPrefix: base.pathPrefix || '',
    connections: 0,
    routed: [],
    url: (p) => `http://${HOST}:${port}${p}`,
    wsUrl: (key, query = 'protocol=7&client=js&version=8.4.0&flash=false') => `ws://${HOST}:${port}${proxy.pathPrefix}/app/${key}${query ? `?${query}` : ''}`,
  };
  let closed = false;
  const check = async () => {
    while (!closed) {
      await Promise.all(list.map(async (t) => {
        if (!t.readyUrl) return;
        try {
          const res = await fetch(t.readyUrl, { signal: AbortSignal.timeout(500) });
          await res.text();
          t.healthy = res.status === 200;
        } catch { t.healthy = false; }
      }));
      await sleep(options.checkIntervalMs || 100);
    }
  };
  check();
  const server = net.createServer((client) => {
    proxy.connections++;
    sockets.add(client);
    client.pause();
    const order = [...list.filter((t) => t.healthy), ...list.filter((t) => !t.healthy)];
    const tryTarget = (i) => {
      if (i >= order.length || closed) { client.destroy(); return; }
      const upstream = net.connect(order[i].port, HOST);
      upstream.once('error', () => { upstream.destroy(); if (!upstream.connectedOnce) tryTarget(i + 1); });
      upstream.once('connect', () => {
        upstream.connectedOnce = true;
        proxy.routed.push(order[i].port);
        sockets.add(upstream);
        const done = () => { client.destroy(); upstream.destroy(); sockets.delete(client); sockets.delete(upstream); };
        upstream.on('error', done);
        upstream.on('close', done);
        client.on('error', done);
        client.on('close', done);
        client.pipe(upstream);
        upstream.pipe(client);
        client.resume();
      });
    };
    client.on('error', () => {});
    tryTarget(0);
  });
  await new Promise((resolve, reject) => { server.once('error', reject); server.listen(port, HOST, resolve); });
  proxy.close = () => {
    closed = true;
    for (const s of sockets) s.destroy();
    return new Promise((resolve) => server.close(() => resolve()));
  };
  track(proxy, () => proxy.close());
  return proxy;
}

/**
 * Starts Redis (or uses options.redis / options.redisUrl), `nodes` belfry nodes on it and,
 * with coordinator: true, one coordinator. options: nodes (2), coordinator (false), presenceTtl
 * (secs, default 3), apps, node (extra top-level config for every node), nodeOptions (array of
 * per-node startNode options), redisPrefix, sweepIntervalMs (default 250), leaderTtlMs,
 * redisCluster (masters count: start a Redis Cluster instead of one server).
 * Returns { redis, redisUrl, nodes, coordinators, coordinator, apps, app, prefix, addNode(),
 * addCoordinator(), stop(), saveLogs(label) }.
 */
async function startCluster(options = {}) {
  const cluster = { nodes: [], coordinators: [], prefix: options.redisPrefix || 'belfry' };
  try {
    if (options.redis) cluster.redis = options.redis;
    else if (options.redisUrl) cluster.redis = null;
    else if (options.redisCluster) cluster.redis = await startRedisCluster(options.redisCluster);
    else cluster.redis = await startRedis();
    cluster.redisUrl = options.redisUrl || cluster.redis.url;
    const apps = options.apps || ['app1'];
    let seq = 0;
    cluster.addNode = async (extra = {}) => {
      const i = seq++;
      const node = await startNode({
        apps,
        redisUrl: cluster.redisUrl,
        ...((options.nodeOptions && options.nodeOptions[i]) || {}),
        ...extra,
        node: {
          node_id: `n${i}-${crypto.randomBytes(3).toString('hex')}`,
          presence_ttl_secs: options.presenceTtl || 3,
          ...(options.redisPrefix ? { redis_prefix: options.redisPrefix } : {}),
          ...(options.node || {}),
          ...(((options.nodeOptions && options.nodeOptions[i]) || {}).node || {}),
          ...(extra.node || {}),
        },
      });
      node.index = i;
      cluster.nodes.push(node);
      return node;
    };
    cluster.addCoordinator = async (extra = {}) => {
      const c = await startCoordinator({
        redisUrl: cluster.redisUrl,
        redisPrefix: options.redisPrefix,
        sweepIntervalMs: options.sweepIntervalMs || 250,
        leaderTtlMs: options.leaderTtlMs,
        ...extra,
      });
      cluster.coordinators.push(c);
      return c;
    };
    // Nodes start one after another: each may seed Redis state at start.
    for (let i = 0; i < (options.nodes === undefined ? 2 : options.nodes); i++) await cluster.addNode();
    if (options.coordinator) cluster.coordinator = await cluster.addCoordinator();
  } catch (e) {
    await stopCluster(cluster);
    throw e;
  }
  const first = cluster.nodes[0];
  if (first) { cluster.apps = first.apps; cluster.app = first.app; }
  cluster.stop = () => stopCluster(cluster);
  cluster.saveLogs = (label) => saveClusterLogs(cluster, label);
  return cluster;
}

async function stopCluster(cluster) {
  await Promise.all(cluster.nodes.map(async (n) => {
    try { await n.stop(3000); } catch { /* ignore */ }
  }));
  await Promise.all(cluster.coordinators.map(async (c) => {
    try { await c.stop(3000); } catch { /* ignore */ }
  }));
  if (cluster.redis) { try { await cluster.redis.stop(); } catch { /* ignore */ } }
}

function saveClusterLogs(cluster, label) {
  cluster.nodes.forEach((n) => saveLog(n, `${label}-node${n.index}`));
  cluster.coordinators.forEach((c, i) => saveLog(c, `${label}-coordinator${i}`));
  if (cluster.redis) saveLog(cluster.redis, `${label}-redis`);
}

/** Registers node:test hooks for a file: one cluster for the file, clients closed after each test. */
function useCluster(options = {}, label = 'cluster') {
  const { before, after, afterEach } = require('node:test');
  const ctx = {};
  before(async () => { ctx.cluster = await startCluster(options); });
  afterEach(() => cleanupClients());
  after(async () => {
    await cleanupClients();
    if (!ctx.cluster) return;
    await ctx.cluster.stop();
    ctx.cluster.saveLogs(label);
  });
  return ctx;
}

/** The last `lines` lines of a process's output, for failure messages. */
function tail(proc, lines = 30) {
  const text = proc && proc.output ? proc.output() : '';
  return text.split('\n').slice(-lines).join('\n');
}

/**
 * pusher-js client signed in as `id` with a watchlist; `events` records its
 * watchlist events as {name, ids}.
 */
async function watchlistClient(node, id, watchlist = []) {
  const client = pusherClient(node, node.app, { userData: { id, watchlist } });
  const events = [];
  client.user.watchlist.bind('online', (e) => events.push({ name: 'online', ids: e.user_ids }));
  client.user.watchlist.bind('offline', (e) => events.push({ name: 'offline', ids: e.user_ids }));
  await connected(client);
  client.signin();
  await eventually(() => client.user.user_data && client.user.user_data.id === id, { message: `signin of ${id}` });
  return { client, events };
}

module.exports = {
  watchlistClient,
  useNode,
  saveLog,
  NODE_BIN,
  HOST,
  sleep,
  freePort,
  withTimeout,
  eventually,
  hmacHex,
  md5Hex,
  uniq,
  toToml,
  makeApp,
  startNode,
  startRedis,
  sdk,
  masterKeyFor,
  pusherClient,
  echoClient,
  connected,
  subscribed,
  waitForEvent,
  collect,
  expectNoEvent,
  RawClient,
  rawClient,
  rawAuth,
  rawSignin,
  parseFrame,
  signedRequest,
  sdkResult,
  getMetrics,
  readyz,
  metricValue,
  cleanupClients,
  COORDINATOR_BIN,
  respEncode,
  respParse,
  redisCommand,
  startRedisCluster,
  startCoordinator,
  coordinatorPublish,
  startProxy,
  startCluster,
  stopCluster,
  useCluster,
  tail,
};
