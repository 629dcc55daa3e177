'use strict';
// A real SOFARPC (Bolt v1, Hessian2) server for moorline's tests: sofa-rpc-node's RpcServer, no
// registry, on the port given as argv[2] (0: one the kernel picks). Prints "listening <port>" on
// stdout once it accepts, with the real port.
//
// com.alipay.test.HelloService:1.0
//   echo(String) -> the same string
//   echoBytes(byte[]) -> the same bytes (1 MiB payloads in the tests)
//   sleep(int ms) -> ms, answered after ms milliseconds
//   die() -> the process exits while the request is in flight (no reply is ever written)
//   note(String) -> null; counts calls (the oneway target), notes() -> how many note() calls arrived
//   whoami() -> "<port>" of this server, so a test can tell two upstreams apart
// Heartbeats (cmdcode 0) are answered by sofa-rpc-node's server connection itself.
const { RpcServer } = require('sofa-rpc-node').server;

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port < 0 || process.argv.length !== 3) {
  process.stderr.write('usage: node server.js <port>\n');
  process.exit(2);
}

// sofa-rpc-node logs every connection and idle event through this; keep stdout for the ready line.
const logger = {
  info() {},
  debug() {},
  warn(...args) { process.stderr.write('warn: ' + args.map(String).join(' ') + '\n'); },
  error(...args) { process.stderr.write('error: ' + args.map(String).join(' ') + '\n'); },
};

let notes = 0;
const server = new RpcServer({ logger, port, killTimeout: 1000 });
server.addService({ interfaceName: 'com.alipay.test.HelloService', version: '1.0' }, {
  async echo(s) { return s; },
  async echoBytes(b) { return b; },
  async sleep(ms) {
    await new Promise(resolve => setTimeout(resolve, ms));
    return ms;
  },
  async die() {
    // Exit with the request read and unanswered: the peer sees the connection close mid-request.
    process.exit(3);
  },
  async note() { notes += 1; return null; },
  async notes() { return notes; },
  async whoami() { return String(server._servers[0].address().port); },
});

server.start().then(() => {
  // sofa-rpc-node keeps its net.Server list private; the one listener it opened for `port`.
  process.stdout.write('listening ' + server._servers[0].address().port + '\n');
}, err => {
  process.stderr.write('start failed: ' + err.message + '\n');
  process.exit(1);
});

for (const sig of [ 'SIGTERM', 'SIGINT' ]) {
  process.on(sig, () => process.exit(0));
}
