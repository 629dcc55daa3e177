'use strict';
// A real SOFARPC (Bolt v1, Hessian2) client for moorline's tests and the bolt bench scenario.
//
//   node client.js <host:port> [scenario.json | -]      (default: the scenario on stdin)
//
// The scenario is JSON:
//   {"service": "com.alipay.test.HelloService", "version": "1.0",
//    "steps": [
//      {"kind": "call", "method": "echo", "args": [{"string": "hi"}], "count": 1, "concurrency": 1,
//       "timeout": 3000, "distinct": false},
//      {"kind": "oneway", "method": "note", "args": [{"string": "x"}], "count": 3},
//      {"kind": "heartbeat", "count": 1, "timeout": 3000},
//      {"kind": "load", "method": "echo", "args": [{"string": "..."}], "connections": 100,
//       "concurrency": 1, "seconds": 10, "timeout": 3000}]}
// Arguments are typed for Hessian2: {"string": s}, {"int": n}, {"bytes": n} (n bytes, a fixed
// pattern) or {"bytes_hex": "..."}. "distinct" appends "#<call index>" to a first string argument.
// "raw_call" is a "call" on the raw connection (below).
//
// "call" goes through sofa-rpc-node's RpcClient (a consumer with a static serverHost, no registry,
// one connection, request ids from sofa-rpc-node's counter). sofa-rpc-node has no oneway or
// explicit heartbeat API, so "oneway" and "heartbeat" use sofa-bolt-node's encoder and decoder on
// a raw socket of their own; "load" opens `connections` such sockets and keeps `concurrency`
// requests in flight on each for `seconds`.
//
// Output, one JSON document on stdout: {"results": [...]}, one entry per call in step order:
//   {"step": i, "kind": k, "ok": true, "size": <reply length>, "value": <reply if a short
//    string/number>, "bytes_match" / "string_match": <reply == the first argument, when it has
//    that type>}
//   {"step": i, "kind": k, "ok": false, "error": <error name>, "code": <resultCode>, "message": ...}
// a heartbeat entry has "ok" when its ack arrived in time; a load step gives one entry
//   {"kind": "load", "calls", "errors", "seconds", "qps", "first_error"}.
// The raw socket's frames nobody asked for (a reply to a oneway, say) are counted in
// {"unsolicited": n}.
const net = require('net');
const pump = require('pump');
const protocol = require('sofa-bolt-node');
const { RpcClient } = require('sofa-rpc-node').client;

const quiet = { info() {}, debug() {}, warn() {}, error() {} };

function readScenario(arg) {
  const fs = require('fs');
  const text = !arg || arg === '-' ? fs.readFileSync(0, 'utf8') : fs.readFileSync(arg, 'utf8');
  return JSON.parse(text);
}

function javaArg(a) {
  if ('string' in a) return { $class: 'java.lang.String', $: a.string };
  if ('int' in a) return { $class: 'int', $: a.int };
  // A bare Buffer: sofa-bolt-node names it byte[] ("[B") and hessian.js writes it as binary.
  if ('bytes' in a) return pattern(a.bytes);
  if ('bytes_hex' in a) return Buffer.from(a.bytes_hex, 'hex');
  throw new Error('unknown argument shape: ' + JSON.stringify(a));
}

function pattern(n) {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + 7) & 0xff;
  return b;
}

// The Java arguments of call number i of a step: with "distinct", a first string argument gets
// "#<i>" appended, so every reply of an echo step can be matched to its own request.
function stepArgs(step, i) {
  const args = (step.args || []).map(javaArg);
  if (step.distinct && args.length && args[0].$class === 'java.lang.String') {
    args[0] = { $class: 'java.lang.String', $: args[0].$ + '#' + i };
  }
  return args;
}

function describeValue(args, value) {
  const out = { ok: true, size: 0 };
  const first = args[0];
  if (Buffer.isBuffer(value)) {
    out.size = value.length;
    if (Buffer.isBuffer(first)) out.bytes_match = first.equals(value);
  } else if (typeof value === 'string') {
    out.size = Buffer.byteLength(value);
    if (value.length <= 256) out.value = value;
    if (first && first.$class === 'java.lang.String') out.string_match = first.$ === value;
  } else if (value === null || value === undefined) {
    out.value = null;
  } else if (typeof value === 'number' || typeof value === 'boolean') {
    out.value = value;
  } else {
    out.value = String(value);
  }
  return out;
}

function describeError(err) {
  return {
    ok: false,
    error: err && err.name || 'Error',
    code: err && err.resultCode || null,
    message: String(err && err.message || err),
  };
}

// N tasks, at most `concurrency` running at once; results kept in issue order.
async function pool(count, concurrency, fn) {
  const results = new Array(count);
  let next = 0;
  async function worker() {
    while (next < count) {
      const i = next++;
      results[i] = await fn(i);
    }
  }
  const workers = [];
  for (let w = 0; w < Math.max(1, Math.min(concurrency, count)); w++) workers.push(worker());
  await Promise.all(workers);
  return results;
}

// One raw Bolt connection: sofa-bolt-node's encoder and decoder on a socket, ids of its own.
class RawConnection {
  constructor(host, port, counters) {
    this.nextId = 0;
    this.pending = new Map();
    this.counters = counters;
    this.closed = null;
    const opts = { sentReqs: new Map(), classCache: new Map(), logger: quiet };
    this.sentReqs = opts.sentReqs;
    this.encoder = protocol.encoder(opts);
    this.decoder = protocol.decoder(opts);
    this.socket = net.connect(port, host);
    this.socket.setNoDelay(true);
    this.ready = new Promise((resolve, reject) => {
      this.socket.once('connect', resolve);
      this.socket.once('error', reject);
    });
    this.socket.on('error', () => {});
    this.socket.once('close', () => {
      this.closed = new Error('the connection closed');
      this.closed.name = 'RawSocketCloseError';
      for (const [ id, p ] of this.pending) {
        clearTimeout(p.timer);
        this.sentReqs.delete(id);
        p.resolve(describeError(this.closed));
      }
      this.pending.clear();
    });
    pump(this.encoder, this.socket, this.decoder, () => {});
    const settle = res => {
      const p = this.pending.get(res.packetId);
      if (!p) {
        this.counters.unsolicited += 1;
        return;
      }
      this.pending.delete(res.packetId);
      this.sentReqs.delete(res.packetId);
      clearTimeout(p.timer);
      p.resolve(p.describe(res));
    };
    this.decoder.on('response', settle);
    this.decoder.on('heartbeat_ack', settle);
  }

  _track(id, timeout, describe) {
    return new Promise(resolve => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        this.sentReqs.delete(id);
        const err = new Error('no response in ' + timeout + 'ms');
        err.name = 'RawResponseTimeoutError';
        resolve(describeError(err));
      }, timeout);
      this.pending.set(id, { resolve, timer, describe });
    });
  }

  request(service, step, oneway, i = 0) {
    if (this.closed) return Promise.resolve(describeError(this.closed));
    const id = ++this.nextId;
    const timeout = step.timeout || 3000;
    const args = stepArgs(step, i);
    const req = {
      serverSignature: service,
      methodName: step.method,
      args,
      requestProps: { service },
      timeout,
      oneway,
    };
    if (oneway) {
      return new Promise(resolve => {
        this.encoder.writeRequest(id, req, err => resolve(err ? describeError(err) : { ok: true, size: 0 }));
      });
    }
    // The decoder looks the request up by id to know how to decode the reply.
    this.sentReqs.set(id, { req });
    const done = this._track(id, timeout, res => {
      if (res.data && res.data.error) return describeError(res.data.error);
      return describeValue(args, res.data && res.data.appResponse);
    });
    this.encoder.writeRequest(id, req, err => {
      if (err) {
        const p = this.pending.get(id);
        if (p) { this.pending.delete(id); clearTimeout(p.timer); p.resolve(describeError(err)); }
      }
    });
    return done;
  }

  heartbeat(timeout) {
    if (this.closed) return Promise.resolve(describeError(this.closed));
    const id = ++this.nextId;
    const done = this._track(id, timeout, () => ({ ok: true, size: 0 }));
    this.encoder.writeHeartbeat(id, { timeout, clientUrl: this.socket.localAddress + ':' + this.socket.localPort });
    return done;
  }

  close() {
    this.socket.destroy();
  }
}

async function runLoad(host, port, service, step, counters) {
  const conns = [];
  for (let i = 0; i < (step.connections || 1); i++) conns.push(new RawConnection(host, port, counters));
  await Promise.all(conns.map(c => c.ready));
  const deadline = Date.now() + (step.seconds || 5) * 1000;
  let calls = 0;
  let errors = 0;
  let firstError = null;
  const start = process.hrtime.bigint();
  async function lane(conn) {
    while (Date.now() < deadline) {
      const r = await conn.request(service, step, false);
      calls += 1;
      if (!r.ok) {
        errors += 1;
        if (!firstError) firstError = r;
        if (conn.closed) return;
      }
    }
  }
  const lanes = [];
  for (const c of conns) for (let k = 0; k < (step.concurrency || 1); k++) lanes.push(lane(c));
  await Promise.all(lanes);
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  for (const c of conns) c.close();
  return { ok: errors === 0, calls, errors, seconds, qps: calls / seconds, first_error: firstError };
}

async function main() {
  const target = process.argv[2];
  if (!target || !target.includes(':')) {
    process.stderr.write('usage: node client.js <host:port> [scenario.json | -]\n');
    process.exit(2);
  }
  const host = target.slice(0, target.lastIndexOf(':'));
  const port = Number(target.slice(target.lastIndexOf(':') + 1));
  const scenario = readScenario(process.argv[3]);
  const interfaceName = scenario.service || 'com.alipay.test.HelloService';
  const version = scenario.version || '1.0';
  const service = interfaceName + ':' + version;
  const counters = { unsolicited: 0 };

  let client = null;
  let consumer = null;
  let raw = null;
  const results = [];
  for (const [ index, step ] of (scenario.steps || []).entries()) {
    const kind = step.kind || 'call';
    const count = step.count === undefined ? 1 : step.count;
    const concurrency = step.concurrency || 1;
    let out;
    if (kind === 'call') {
      if (!consumer) {
        client = new RpcClient({ logger: quiet });
        consumer = client.createConsumer({ interfaceName, version, serverHost: target });
        await consumer.ready();
      }
      out = await pool(count, concurrency, async i => {
        const args = stepArgs(step, i);
        try {
          const value = await consumer.invoke(step.method, args, { responseTimeout: step.timeout || 3000 });
          return describeValue(args, value);
        } catch (err) {
          return describeError(err);
        }
      });
    } else if (kind === 'oneway' || kind === 'heartbeat' || kind === 'raw_call') {
      if (!raw) {
        raw = new RawConnection(host, port, counters);
        await raw.ready;
      }
      out = await pool(count, concurrency, i => {
        if (kind === 'heartbeat') return raw.heartbeat(step.timeout || 3000);
        return raw.request(service, step, kind === 'oneway', i);
      });
    } else if (kind === 'load') {
      out = [ await runLoad(host, port, service, step, counters) ];
    } else {
      throw new Error('unknown step kind: ' + kind);
    }
    for (const r of out) results.push(Object.assign({ step: index, kind }, r));
  }
  if (raw) {
    // Give a reply nobody asked for (to a oneway request) a moment to show up before counting.
    await new Promise(resolve => setTimeout(resolve, scenario.settle_ms === undefined ? 100 : scenario.settle_ms));
    raw.close();
  }
  if (client) await client.close();
  process.stdout.write(JSON.stringify({ results, unsolicited: counters.unsolicited }) + '\n');
}

main().then(() => process.exit(0), err => {
  process.stderr.write('client failed: ' + (err && err.stack || err) + '\n');
  process.exit(1);
});
